"""Config loading, overrides and the error messages users see."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import config, storage
from pipeline.config import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate_and_say_how_to_run(path: Path):
    cfg = config.load(path)
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#"), f"{path.name} must start with a comment giving its command"
    assert "dcgan" in path.read_text().split("\n\n")[0] or "make" in first_line + path.read_text()[:400]
    assert cfg.run.name


def test_defaults_and_resolved_dump_round_trip(tmp_path: Path):
    cfg = config.load(None)
    assert (cfg.backend, cfg.data.source, cfg.train.lr, cfg.train.beta1) == ("torch", "digits", 2e-4, 0.5)
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(cfg.dump_yaml())
    assert config.load(dumped) == cfg


def test_overrides_are_typed(tmp_path: Path):
    cfg = config.load(None, ["train.steps=10", "train.lr=1e-3", "train.precision=fp16", "run.name=abc"])
    assert (cfg.train.steps, cfg.train.lr, cfg.train.precision, cfg.run.name) == (10, 1e-3, "fp16", "abc")
    assert isinstance(cfg.train.steps, int)


def test_default_prepared_dir_names_source_size_and_channels():
    cfg = config.load(None, ["data.image_size=64", "data.channels=3"])
    assert cfg.data.resolved_prepared_dir() == "data/prepared/digits-64px-3ch"


def _write(tmp_path: Path, raw) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


# (config content, overrides, fragments every one of which the message must contain)
BAD = [
    ({"train": {"steps": 0}}, [], ["train.steps", "greater than 0", "got 0"]),
    ({"train": {"stpes": 10}}, [], ["train.stpes", "unknown field; allowed: steps, global_batch_size"]),
    ({"trian": {"steps": 10}}, [], ["trian", "unknown field; allowed: run, backend, data"]),
    ({"backend": "jax"}, [], ["backend", "'torch' or 'tensorflow'", "got 'jax'"]),
    ({"data": {"image_size": 48}}, [], ["data.image_size", "32", "64", "128", "got 48"]),
    ({"data": {"channels": 2}}, [], ["data.channels", "got 2"]),
    ({"data": {"source": "folder"}}, [], ["data.root is required", "folder"]),
    ({"data": {"source": "imagenet"}}, [], ["data.source", "'digits'", "got 'imagenet'"]),
    ({"checkpoint": {"keep": 1}}, [], ["checkpoint.keep", "greater than or equal to 2", "got 1"]),
    ({"train": {"lr": -1}}, [], ["train.lr", "greater than 0", "got -1"]),
    ({"train": {"lr": ".inf"}}, [], ["train.lr"]),
    ({"train": {"beta1": 1.5}}, [], ["train.beta1", "less than 1", "got 1.5"]),
    ({"train": {"global_batch_size": "many"}}, [], ["train.global_batch_size", "integer", "got 'many'"]),
    ({"run": {"name": "a/b"}}, [], ["run.name", "pattern", "got 'a/b'"]),
    ({"runtime": {"runner": "slurm"}}, [], ["runtime.runner", "'local', 'ray' or 'horovodrun'", "got 'slurm'"]),
    ({"distributed": {"strategy": "fsdp"}}, [], ["distributed.strategy", "'ddp' or 'horovod'", "got 'fsdp'"]),
    (
        {"backend": "tensorflow", "distributed": {"strategy": "horovod"}},
        [],
        ["distributed.strategy='horovod'", "backend='tensorflow'", "TensorFlow 2.21", "MirroredStrategy"],
    ),
    ({"runtime": {"runner": "horovodrun"}}, [], ["runtime.runner='horovodrun'", "distributed.strategy='horovod'", "not 'ddp'"]),
    ({"scaling": {"num_workers": 3}}, [], ["train.global_batch_size=64 is not divisible by scaling.num_workers=3"]),
    ({"scaling": {"num_workers": 0}}, [], ["scaling.num_workers", "greater than 0", "got 0"]),
    (
        {"runtime": {"runner": "ray"}, "train": {"max_failures": 3}, "scaling": {"num_workers": [1, 3]}},
        [],
        ["scaling.num_workers=[1, 3]", "train.global_batch_size=64 does not split over 3 workers", "counts that split it: 1, 2"],
    ),
    ({"scaling": {"num_workers": [3, 2]}}, [], ["scaling.num_workers", "min <= max, got [3, 2]"]),
    ({"scaling": {"num_workers": [1, 2]}}, [], ["scaling.num_workers=[1, 2]", "runtime.runner='local'", "needs runtime.runner='ray'"]),
    (
        {"runtime": {"runner": "ray"}, "distributed": {"strategy": "horovod"}, "train": {"max_failures": 1},
         "scaling": {"num_workers": [1, 2]}},
        [],
        ["scaling.num_workers=[1, 2]", "distributed.strategy='horovod'", "Ray Train V1, which cannot resize"],
    ),
    ({"runtime": {"runner": "ray"}, "train": {"global_batch_size": 48}, "scaling": {"num_workers": [2, 4]}}, [],
     ["scaling.num_workers=[2, 4]", "train.max_failures=0"]),
    ({"runtime": {"runner": "ray", "device": "cuda"}}, [], ["runtime.device='cuda'", "needs scaling.use_gpu=true"]),
    ({"runtime": {"runner": "ray", "device": "cpu"}, "scaling": {"use_gpu": True}}, [], ["scaling.use_gpu=true", "idle"]),
    ({"runtime": {"deterministic": "sometimes"}}, [], ["runtime.deterministic", "got 'sometimes'"]),
    ({"train": {"max_failures": -1}}, [], ["train.max_failures", "greater than or equal to 0", "got -1"]),
    ({"logging": {"every": 2.5}}, [], ["logging.every", "got 2.5"]),
    ({"train": 5}, [], ["train", "valid dictionary"]),
    ("train: {steps: [1, 2\n", [], ["not valid YAML", "bad.yaml"]),
    ("- just\n- a list\n", [], ["top level must be a mapping"]),
    ({}, ["train.steps=abc"], ["train.steps", "got 'abc'", "--set train.steps=abc"]),
    ({}, ["train.steps"], ["train.steps", "expected section.key=value"]),
    ({}, ["train.steps.x=1"], ["train.steps", "valid integer", "got a section"]),
    ({"train": {"steps": 5}}, ["train.steps.x=1"], ["train.steps", "is a value, not a section"]),
    ({}, ["model.depth=3"], ["model.depth", "unknown field; allowed: nz, ngf, ndf"]),
]


@pytest.mark.parametrize(
    "field, uri, where",
    [
        ("runtime.storage_path", "s3://AKIAEXAMPLE:hunter2@bucket/runs", "user info before '@'"),
        ("runtime.storage_path", "s3://bucket/runs?access_key=AKIAEXAMPLE&secret_key=hunter2", "query parameter 'secret_key'"),
        ("data.prepared_dir", "s3://bucket/data?endpoint_override=127.0.0.1:9000&session_token=hunter2", "query parameter 'session_token'"),
    ],
)
def test_credentials_in_a_storage_uri_are_refused_without_echoing_them(tmp_path: Path, field: str, uri: str, where: str):
    """A run's address is copied into config.yaml, manifests, TensorBoard and logs."""
    with pytest.raises(ConfigError) as caught:
        config.load(_write(tmp_path, {}), [f"{field}={uri}"])
    message = str(caught.value)
    assert field in message and where in message and "AWS_ACCESS_KEY_ID" in message, message
    assert "hunter2" not in message and "AKIAEXAMPLE" not in message, message
    with pytest.raises(ValueError, match="carries credentials") as direct:
        storage.location(uri)  # every other way in (--checkpoint of sample, export, evaluate) too
    assert "hunter2" not in str(direct.value)


@pytest.mark.parametrize("content, overrides, fragments", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_config_names_field_value_and_allowed(tmp_path: Path, content, overrides, fragments):
    path = _write(tmp_path, content)
    with pytest.raises(ConfigError) as caught:
        config.load(path, overrides)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from:\n{message}"


def test_missing_file_names_the_path(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        config.load(tmp_path / "nope.yaml")


def test_model_mismatch_lists_shape_fields():
    saved = config.load(None).to_dict()
    wanted = config.load(None, ["model.ngf=32", "data.image_size=64"])
    diffs = config.model_mismatch(saved, wanted)
    assert any("model.ngf: checkpoint has 64, config asks for 32" in d for d in diffs)
    assert any("data.image_size" in d for d in diffs)
    assert config.model_mismatch(saved, config.load(None, ["train.lr=0.001"])) == []


@pytest.mark.parametrize("amp, replacement", [(True, "precision: fp16"), (False, "precision: fp32")])
def test_the_old_amp_key_names_its_replacement(amp: bool, replacement: str):
    with pytest.raises(ConfigError) as caught:
        config.load(None, [f"train.amp={str(amp).lower()}"])
    assert "train.amp was replaced by train.precision" in str(caught.value)
    assert replacement in str(caught.value)


def test_an_elastic_range_reads_from_yaml_and_from_set(tmp_path: Path):
    path = _write(tmp_path, {"runtime": {"runner": "ray"}, "train": {"max_failures": 5, "global_batch_size": 48},
                             "scaling": {"num_workers": [2, 4]}})  # fmt: skip
    scaling = config.load(path, []).scaling
    assert (scaling.min_workers, scaling.max_workers, scaling.elastic, list(scaling.world_sizes)) == (2, 4, True, [2, 3, 4])
    overridden = config.load(path, ["scaling.num_workers=[1, 2]", "train.global_batch_size=32"]).scaling
    assert (overridden.min_workers, overridden.max_workers) == (1, 2)
    fixed = config.load(path, ["scaling.num_workers=2"]).scaling
    assert (fixed.min_workers, fixed.max_workers, fixed.elastic) == (2, 2, False)
    pinned = config.load(path, ["scaling.num_workers=[3, 3]"]).scaling  # a range of one count: a fixed run
    assert (pinned.min_workers, pinned.max_workers, pinned.elastic) == (3, 3, False)
    round_trip = config.validate(config.load(path, []).to_dict())
    assert round_trip.scaling.num_workers == (2, 4)


def test_speed_settings_validate_with_their_field_names():
    cfg = config.load(None, ["train.precision=bf16", "train.channels_last=false", "train.compile=true", "data.device_cache=true"])
    assert (cfg.train.precision, cfg.train.channels_last, cfg.train.compile, cfg.data.device_cache) == ("bf16", False, True, True)
    assert config.load(None).data.device_cache == "auto" and config.load(None).train.precision == "auto"
    with pytest.raises(ConfigError, match=r"train\.precision: .*'fp32'.*\(got 'fp8'\)"):
        config.load(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"data\.device_cache: .*\(got 'gpu'\)"):
        config.load(None, ["data.device_cache=gpu"])
