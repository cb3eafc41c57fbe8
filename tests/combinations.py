"""The combination matrix: the options that change how a run trains, read from the config schema.

Every `Literal` or `bool` field of the config is an axis unless `EXCLUDED` says why not, so a new
option joins the matrix by being declared; fields with open ranges join through `SAMPLED`, with
the values that switch their code paths. The full product (thousands of combinations) is split
by `config.validate`: every invalid combination must be refused naming its fields, and the valid
ones are covered pairwise (every two values of every two axes train together in some row: the
defects found so far each sat where two options meet), greedily, in a fixed order.

Each row runs the way its runner runs ranks, without Ray where Ray adds nothing to what the row
proves (tests/test_ray_*.py prove Ray's part): runner local in the test process; ray with DDP as
2 gloo ranks, with Horovod (or runner horovodrun) as 2 horovodrun ranks, with TensorFlow as 2
MultiWorkerMirroredStrategy workers. All rows of one kind share one launch of their ranks
(TensorFlow's workers keep one strategy for their cluster, which every row reuses).
On its ranks a row trains 4 steps, resumes to 6, and dry-runs 2 (the dry run reloads its
checkpoint and compares every tensor); the test process then samples, exports and evaluates the
last checkpoint, and converts it to the other framework and back.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
import typing
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, Iterator, Optional

from pydantic import BaseModel

from pipeline import config

# Enumerable fields that are not axes of the training matrix, and why.
EXCLUDED = {
    "data.source": "what is read, not how it trains: tests/data",
    "data.image_size": "a shape: every backend test builds several (tests/backends, tests/tf/test_tf_models)",
    "data.channels": "a shape, as data.image_size",
    "data.download": "torchvision's download needs the network",
    "eval.extractor": "what evaluation measures: tests/quality",
    "eval.score_raw_generator": "what evaluation measures, as eval.extractor",
    "eval.runs": "where the Ray runner evaluates: tests/test_ray_runner.py runs both",
    "scaling.use_gpu": "reserves GPUs, which this machine has not (bench/gpu_check.sh)",
    "runtime.device": "cuda needs a GPU and auto is the CPU here (bench/gpu_check.sh covers cuda)",
}

# Fields with open ranges whose values switch code paths; "runtime.storage_path" stands for
# where runs live: a path or object storage (the test's S3-compatible server).
SAMPLED = {
    "model.g_ema_decay": (0.0, 0.9),
    "runtime.storage_path": ("path", "object"),
}

# Combinations of more than two options that broke once: rows hold them before pairs are counted.
REGRESSIONS = (
    # G's average deep-copied G after Horovod's global BatchNorm had bound its collectives into it.
    {"distributed.strategy": "horovod", "runtime.runner": "ray", "model.sync_batchnorm": True, "model.g_ema_decay": 0.9},
    # Global BatchNorm over ranks updated float32 statistics with half-precision ones.
    {"backend": "torch", "runtime.runner": "ray", "model.sync_batchnorm": True, "train.precision": "fp16"},
)

STEPS, RESUMED_STEPS, DRY_RUN_STEPS = 4, 6, 2


def _fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", annotation


def enumerable_fields() -> dict[str, tuple]:
    """Every Literal or bool field of the config, with its values."""
    found = {}
    for name, annotation in _fields(config.Config):
        if annotation is bool:
            found[name] = (False, True)
        elif typing.get_origin(annotation) is typing.Literal:
            found[name] = typing.get_args(annotation)
    return found


@cache
def axes() -> dict[str, tuple]:
    enumerable = {name: values for name, values in enumerable_fields().items() if name not in EXCLUDED}
    return {**enumerable, **SAMPLED}


def row_raw(row: dict[str, Any]) -> dict[str, Any]:
    """The row as a raw config (before validation): its axes and the ranks its runner starts."""
    raw: dict[str, Any] = {}
    for dotted, value in row.items():
        if dotted == "runtime.storage_path":
            value = None if value == "path" else "s3://bucket/runs"
        config.apply_override(raw, dotted.split("."), value)
    raw.setdefault("scaling", {})["num_workers"] = 2 if row["runtime.runner"] != "local" else 1
    return raw


def refusal(row: dict[str, Any]) -> Optional[str]:
    """config.validate's message for the row, or None when it is valid."""
    try:
        config.validate(row_raw(row), "matrix")
    except config.ConfigError as err:
        return str(err)
    return None


def product() -> Iterator[dict[str, Any]]:
    names = list(axes())
    for values in itertools.product(*axes().values()):
        yield dict(zip(names, values))


@cache
def split() -> tuple[tuple[dict, ...], tuple[tuple[dict, str], ...]]:
    """(every valid combination, every invalid one with its refusal)."""
    valid, invalid = [], []
    for row in product():
        message = refusal(row)
        if message is None:
            valid.append(row)
        else:
            invalid.append((row, message))
    return tuple(valid), tuple(invalid)


def _pairs(row: dict[str, Any]) -> set[tuple]:
    items = sorted(row.items(), key=lambda item: item[0])
    return {(a, b) for a, b in itertools.combinations([(k, repr(v)) for k, v in items], 2)}


@cache
def pairwise_rows() -> tuple[dict[str, Any], ...]:
    """Valid rows that together hold every pair of values that some valid combination holds."""
    valid, _ = split()
    candidates = [(row, _pairs(row)) for row in valid]
    uncovered = set().union(*(pairs for _, pairs in candidates))
    chosen = []
    for regression in REGRESSIONS:
        matching = [c for c in candidates if all(c[0][k] == v for k, v in regression.items())]
        assert matching, f"no valid combination holds {regression}"
        row, pairs = max(matching, key=lambda candidate: (-_cost(candidate[0]), len(candidate[1] & uncovered)))
        chosen.append(row)
        uncovered -= pairs
    while uncovered:
        # The row adding most pairs; of equals, the cheapest to run; of those, the first (deterministic).
        row, pairs = max(candidates, key=lambda candidate: (len(candidate[1] & uncovered), -_cost(candidate[0])))
        chosen.append(row)
        uncovered -= pairs
    return tuple(chosen)


def _cost(row: dict[str, Any]) -> int:
    """Relative cost of running a row: torch.compile (seconds of inductor per network, per
    start) and ranks in processes of their own dominate."""
    compiled = row["train.compile"] and row["backend"] == "torch"
    processes = {"local": 0, "ddp": 1, "horovod": 1, "mwms": 3}[launch_kind(row)]  # mwms: TF workers, slow collectives
    return 4 * compiled + processes


def row_id(row: dict[str, Any]) -> str:
    """A readable name: torch-...-fp16-...-horovod-ray-... (values alone where they say enough)."""
    bare = ("runtime.runner", "distributed.strategy", "backend", "train.precision")
    parts = []
    for name, value in row.items():
        label = name.rsplit(".", 1)[-1]
        if name in bare:
            parts.append(str(value))
        elif isinstance(value, bool):
            parts.append(label if value else f"no_{label}")
        else:
            parts.append(f"{label}={value}")
    return "-".join(parts)


def launch_kind(row: dict[str, Any]) -> str:
    """How the row's ranks start: local, ddp, horovod or mwms."""
    if row["runtime.runner"] == "local":
        return "local"
    if row["backend"] == "tensorflow":
        return "mwms"
    return row["distributed.strategy"]


def row_config(row: dict[str, Any], index: int, tmp: Path, s3_base: Optional[str], prepared: Path) -> dict[str, Any]:
    """The row's config, small and fast: the embedded digits (what the digits FID scores)."""
    raw = row_raw(row)
    base = {
        "run": {"name": f"row{index:02d}", "dir": str(tmp / "runs")},
        "data": {"source": "digits", "image_size": 32, "channels": 1, "prepared_dir": str(prepared)},
        "model": {"nz": 8, "ngf": 4, "ndf": 4},
        "train": {"steps": STEPS, "global_batch_size": 8, "seed": 1},
        "checkpoint": {"every": 2, "keep": 2, "stop_check_every": 2},
        "logging": {"every": 2, "samples_every": 2, "num_samples": 4},
        "eval": {"num_samples": 10},
        "scaling": {"cpus_per_worker": 1},
    }  # fmt: skip
    for section, values in base.items():
        raw.setdefault(section, {})
        for key, value in values.items():
            raw[section].setdefault(key, value)
    if raw.get("runtime", {}).get("storage_path"):
        raw["runtime"]["storage_path"] = s3_base
    config.validate(raw, row_id(row))
    return raw


# --- on the ranks --------------------------------------------------------------------------


def shared_job(directory: Path, name: str, rank: int, planner) -> Any:
    """Rank 0 plans (the driver's part) and hands the job to the others through a file."""
    from pipeline.job import Job

    path = directory / f"{name}.job.json"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        job = planner()
        staged = path.with_suffix(".tmp")
        staged.write_text(json.dumps({"config": job.config, "start": job.start,
                                      "dry_run_steps": job.dry_run_steps, "id": job.id}))  # fmt: skip
        staged.rename(path)
        return job
    deadline = time.monotonic() + 600
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 never planned {path}")
        time.sleep(0.05)
    return Job(**json.loads(path.read_text()))


PHASES = ("train", "resume", "dry_run")


def run_row(rank: int, world: int, raw: dict[str, Any], scratch: str) -> None:
    """A row's phases on one rank: train, resume further, dry-run; each rank records what it
    saw (rank<N>.json, phase by phase)."""
    from pipeline.context import RankContext
    from pipeline.job import plan

    scratch_dir = Path(scratch)
    scratch_dir.mkdir(parents=True, exist_ok=True)
    ctx = RankContext(rank, rank, world, "cpu")
    cfg = config.validate(raw, "matrix row")
    resumed = cfg.model_copy(deep=True)
    resumed.train.steps = RESUMED_STEPS
    planners = {
        "train": lambda: plan(cfg),
        "resume": lambda: plan(resumed),
        "dry_run": lambda: plan(cfg, dry_run_steps=DRY_RUN_STEPS),
    }
    record = scratch_dir / f"rank{rank}.json"
    outcome: dict[str, Any] = {}
    for phase in PHASES:
        job = shared_job(scratch_dir, phase, rank, planners[phase]) if world > 1 else planners[phase]()
        outcome[phase] = {"start": job.start, "result": job.run(ctx)}
        record.write_text(json.dumps(outcome, default=str))


def run_rows(rank: int, world: int, rows_file: str) -> None:
    """Every row in `rows_file` (a JSON list of [config, scratch]) in turn, on this rank."""
    for raw, scratch in json.loads(Path(rows_file).read_text()):
        run_row(rank, world, raw, scratch)


def _mwms_worker(rank: int, rows_file: str, ports: list[str]) -> None:
    """Every row on one MultiWorkerMirroredStrategy worker, every phase: the process keeps one
    strategy for its cluster (pipeline/backends/tf_backend/devices.py says why), which each
    row's backend reuses."""
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
        "task": {"type": "worker", "index": rank},
    })  # fmt: skip
    run_rows(rank, len(ports), rows_file)




# --- in the test process ---------------------------------------------------------------------


def launch(kind: str, rows: list[tuple[dict[str, Any], str]], work: Path) -> None:
    """Run `rows` ([config, scratch directory]) on the ranks of `kind`, all in one launch."""
    rows_file = work / f"{kind}-rows.json"
    rows_file.write_text(json.dumps(rows))
    if kind == "local" and rows[0][0]["backend"] == "tensorflow":
        # A process of its own: the TF test process mirrors over two logical CPUs, and two
        # MirroredStrategy trainings in one process can clash (docs/ARCHITECTURE.md, traps).
        _run_module(["local", str(rows_file)])
    elif kind == "local":
        run_rows(0, 1, str(rows_file))
    elif kind == "ddp":
        from tests.ddp_harness import run_ranks

        run_ranks(2, run_rows, str(rows_file))
    elif kind == "horovod":
        from tests.horovod_harness import run_horovod

        run_horovod(2, "tests.combinations:run_rows", rows_file, timeout=900)
    elif kind == "mwms":
        _launch_mwms(rows_file)
    else:
        raise AssertionError(kind)


def _launch_mwms(rows_file: Path) -> None:
    """Two workers, which run every row in turn."""
    import subprocess
    import sys

    from tests.ddp_harness import free_port

    root = Path(__file__).resolve().parents[1]
    ports = ",".join(str(free_port()) for _ in range(2))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    workers = [
        subprocess.Popen([sys.executable, "-m", "tests.combinations", str(rank), str(rows_file), ports],
                         cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        for rank in range(2)
    ]
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=900)[0])
    finally:
        for worker in workers:
            worker.kill()
    failed = [(rank, w.returncode) for rank, w in enumerate(workers) if w.returncode != 0]
    assert not failed, f"MultiWorkerMirroredStrategy workers failed {failed}:\n" + "\n".join(o[-4000:] for o in outputs)


def launch_all(rows: list[dict[str, Any]], work: Path, s3_base: str) -> tuple[dict[str, tuple], dict[str, Exception]]:
    """Every row, one launch per kind: ({row id: (row, config, scratch)}, {kind: its launch's error})."""
    prepared = work / "prepared"
    planned: dict[str, tuple] = {}
    by_kind: dict[str, list] = {}
    for index, row in enumerate(rows):
        raw = row_config(row, index, work, s3_base, prepared)
        scratch = work / "ranks" / f"row{index:02d}"
        planned[row_id(row)] = (row, raw, scratch)
        by_kind.setdefault(launch_kind(row), []).append([raw, str(scratch)])
    failures: dict[str, Exception] = {}
    for kind, kind_rows in by_kind.items():
        try:
            launch(kind, kind_rows, work)
        except Exception as err:  # reported by each row of that kind
            failures[kind] = err
    return planned, failures


def rows_of(framework: str) -> list[dict[str, Any]]:
    return [row for row in pairwise_rows() if row["backend"] == framework]


@contextmanager
def launched(framework: str, work: Path) -> Iterator[tuple[Path, dict[str, tuple], dict[str, Exception], dict]]:
    """Every row of `framework`, launched by kind beside an S3-compatible server (the
    object-storage rows'); TensorFlow's rows are then evaluated, all in one process."""
    from tests.helpers import s3_server

    with s3_server() as s3_base:
        planned, failures = launch_all(rows_of(framework), work, s3_base)
        evaluations = evaluate_elsewhere(planned, work) if framework == "tensorflow" else {}
        yield work, planned, failures, evaluations


def evaluate_elsewhere(planned: dict[str, tuple], work: Path) -> dict[str, dict]:
    """One `dcgan evaluate` of every row's last checkpoint through `pipeline.cli.main`, in a
    process apart (evaluation scores in torch, which a TensorFlow test process must not
    import): {row id: {"exit": code, "scores": its JSON}}; every row's exit None (and the
    error) when that process failed."""
    addresses = last_checkpoints(planned)
    request = work / "evaluate.json"
    request.write_text(json.dumps(addresses))
    try:
        _run_module(["evaluate", str(request)])
    except AssertionError as err:  # each row reports it
        return {name: {"exit": None, "error": str(err)} for name in addresses}
    return json.loads(request.with_suffix(".out.json").read_text())


def evaluate_each(request_file: str) -> None:
    """In a process of its own: one `dcgan evaluate` of every {row id: address} in
    request_file (their generators sample in one TensorFlow process)."""
    import contextlib
    import io

    from pipeline import cli

    addresses = json.loads(Path(request_file).read_text())
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["evaluate", *(f"--checkpoint={a}" for a in addresses.values()), "--json", "--device", "cpu"])
    scores = json.loads(printed.getvalue()) if code == 0 else [printed.getvalue()] * len(addresses)
    scores = scores if isinstance(scores, list) else [scores]
    evaluations = {name: {"exit": code, "scores": each} for name, each in zip(addresses, scores)}
    Path(request_file).with_suffix(".out.json").write_text(json.dumps(evaluations))


def check_launched_row(matrix: tuple, name: str, out: Path) -> None:
    _, planned, failures, evaluations = matrix
    row, raw, scratch = planned[name]
    kind = launch_kind(row)
    assert kind not in failures, f"the {kind} launch failed: {failures.get(kind)}"
    check_row(row, raw, scratch, out, evaluations.get(name))


def check_conversions(matrix: tuple, framework: str) -> None:
    """Every row's last checkpoint to the other framework and back, bit for bit, G's average
    included where the row keeps one."""
    import numpy as np

    from pipeline.backends.base import holds_average

    work, planned, failures, _ = matrix
    assert not failures, failures
    convert_dir = work / "convert"
    convert_dir.mkdir()
    differing = convert_there_and_back(last_checkpoints(planned), framework, convert_dir)
    assert not any(differing.values()), {k: v[:5] for k, v in differing.items() if v}
    for name, (row, _, _) in planned.items():
        assert holds_average(np.load(convert_dir / f"{name}.npz")) == bool(row["model.g_ema_decay"]), name


def last_checkpoints(planned: dict[str, tuple]) -> dict[str, str]:
    from pipeline import storage
    from pipeline.checkpoint import step_dir_name

    addresses = {}
    for name, (_, raw, _) in planned.items():
        cfg = config.validate(raw, name)
        addresses[name] = storage.join(cfg.run_address, f"checkpoints/{step_dir_name(RESUMED_STEPS)}")
    return addresses


def _run_module(args: list[str]) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "tests.combinations", *args], cwd=root, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    assert done.returncode == 0, f"tests.combinations {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}"


def outcomes(scratch: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(scratch.glob("rank*.json"))]


def convert_side(pairs_file: str, framework: str) -> None:
    """In a process of `framework`: each [arrays, source checkpoint, out] is imported into a
    checkpoint of `framework` at out, whose arrays are exported again to out.npz."""
    from pipeline.convert import export_arrays, import_arrays

    for arrays, source, out in json.loads(Path(pairs_file).read_text()):
        import_arrays(Path(arrays), Path(source), framework, Path(out))
        export_arrays(Path(out), Path(f"{out}.npz"))


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "convert":  # convert PAIRS_FILE FRAMEWORK
        convert_side(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "evaluate":  # evaluate REQUEST_FILE: {row id: checkpoint address}
        evaluate_each(sys.argv[2])
    elif sys.argv[1] == "local":  # local ROWS_FILE: one rank, this process
        run_rows(0, 1, sys.argv[2])
    else:  # one MultiWorkerMirroredStrategy worker: RANK ROWS_FILE PORT,PORT
        _mwms_worker(int(sys.argv[1]), sys.argv[2], sys.argv[3].split(","))


def check_row(row: dict[str, Any], raw: dict[str, Any], scratch: Path, out: Path, evaluated: Optional[dict] = None) -> str:
    """What every row must show after its launch; returns its last checkpoint's address.
    Evaluation scores in torch: a TensorFlow row's ran in a process apart (`evaluated`)."""
    from pipeline import cli, storage
    from pipeline.checkpoint import step_dir_name

    cfg = config.validate(raw, row_id(row))
    ranks = outcomes(scratch)
    assert len(ranks) == cfg.scaling.num_workers, f"{len(ranks)} of {cfg.scaling.num_workers} ranks reported"
    chief = ranks[0]
    assert chief["train"]["start"] is None and chief["train"]["result"]["step"] == STEPS
    assert step_dir_name(STEPS) in chief["resume"]["start"]  # resumed where training stopped
    assert chief["resume"]["result"]["step"] == RESUMED_STEPS
    report = chief["dry_run"]["result"]
    assert report["steps"] == DRY_RUN_STEPS and report["tensors_checked"] > 0, report
    address = storage.join(cfg.run_address, f"checkpoints/{step_dir_name(RESUMED_STEPS)}")
    out.mkdir(parents=True, exist_ok=True)
    for command in (
        ["sample", "--checkpoint", address, "--num", "4", "--out", str(out / "grid.png"), "--device", "cpu"],
        ["export", "--checkpoint", address, "--out", str(out / "export")],
    ):
        assert cli.main(command) == 0, command
    assert (out / "grid.png").is_file() and any((out / "export").iterdir())
    if cfg.backend == "torch":
        assert cli.main(["evaluate", "--checkpoint", address, "--json", "--device", "cpu"]) == 0
    else:
        assert evaluated is not None and evaluated["exit"] == 0, evaluated
        scores = evaluated["scores"]
        assert scores["step"] == RESUMED_STEPS and scores["framework"] == "tensorflow", scores
        assert scores["metrics"] and all(math.isfinite(value) for value in scores["metrics"].values()), scores
    return address


def convert_there_and_back(checkpoints: dict[str, str], source: str, work: Path) -> dict[str, list[str]]:
    """Every checkpoint (by row id) to the other framework and back in one process of each
    side after this one; returns, per row, the arrays that did not come back identical."""
    import numpy as np

    from pipeline.checkpoint import fetch
    from pipeline.convert import export_arrays

    target = "tensorflow" if source == "torch" else "torch"
    there, back = [], []
    for name, address in checkpoints.items():
        local = fetch(address).path
        export_arrays(local, work / f"{name}.npz")
        there.append([str(work / f"{name}.npz"), str(local), str(work / f"{name}-{target}")])
        back.append([str(work / f"{name}-{target}.npz"), str(work / f"{name}-{target}"), str(work / f"{name}-back")])
    for pairs, framework in ((there, target), (back, source)):
        (work / f"to-{framework}.json").write_text(json.dumps(pairs))
        _run_module(["convert", str(work / f"to-{framework}.json"), framework])
    differing = {}
    for name in checkpoints:
        before, after = np.load(work / f"{name}.npz"), np.load(work / f"{name}-back.npz")
        differing[name] = sorted(
            key for key in set(before.files) | set(after.files)
            if key not in before.files or key not in after.files or not np.array_equal(before[key], after[key])
        )
    return differing
