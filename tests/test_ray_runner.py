"""Data-parallel training on a real local Ray cluster (127.0.0.1, 4 logical CPUs, 2 workers),
with runs on disk and in object storage (a real S3-compatible server on 127.0.0.1, moto's
server mode).

One uninterrupted 2-worker run (`reference`, traced) serves every comparison: the disjoint
slices are read from its traces, and the SIGTERM, SIGKILL and object-storage runs must end
bit-identical to its step-12 checkpoint."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.checkpoint import LATEST, MANIFEST, fetch
from pipeline.config import Config, ConfigError
from pipeline.job import Job, plan
from tests.conftest import small_config
from tests.helpers import checkpoint_tensors, local_ray, read_scalars, s3_server, tensors_in, traced_worker

ray = pytest.importorskip("ray")
from pipeline import ray_runner  # noqa: E402  (after the skip: needs ray)
from pipeline.ray_runner import driver  # noqa: E402
from pipeline.ray_runner.probes import Probe  # noqa: E402
from pipeline.stopping import STOP_FILE  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.ray]

BATCH, STEPS_PER_EPOCH = 16, 16  # 256 synthetic images


@pytest.fixture(scope="module")
def s3_base():
    with s3_server() as base:  # first: the Ray workers inherit its AWS variables
        with local_ray(__name__):
            yield base


def ray_config(tmp_path: Path, name: str, workers: int = 2, **sections) -> Config:
    sections.setdefault("train", {})
    sections["train"] = {"global_batch_size": BATCH, "steps": 8, **sections["train"]}
    sections["runtime"] = {"runner": "ray", **sections.get("runtime", {})}
    return small_config(
        tmp_path, run={"name": name}, scaling={"num_workers": workers, "cpus_per_worker": 1}, **sections,
    )  # fmt: skip


def final_state(cfg: Config, step: int) -> dict[str, torch.Tensor]:
    return checkpoint_tensors(cfg.run_dir, step)


def assert_same_as(reference: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    assert reference.keys() == state.keys()
    for name in reference:
        assert torch.equal(reference[name], state[name]), f"{name} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def reference(s3_base, tmp_path_factory) -> tuple[Config, Path, dict]:
    """One epoch on 2 workers, uninterrupted (checkpoints every 4 steps; 12 and 16 kept). As its
    last step ends, a STOP request reaches the driver, as a `ray job stop` would: the run has
    finished, so it ends as finished, not as stopped."""
    tmp_path = tmp_path_factory.mktemp("reference")
    cfg = ray_config(tmp_path, "reference", train={"steps": STEPS_PER_EPOCH})
    traces = tmp_path / "traces"
    traces.mkdir()

    def stop_at_the_end(rank: int, loop_config: dict) -> None:
        if rank == 0:
            storage.location(Job(**loop_config["job"]).run_address).write_text(STOP_FILE, "late\n")

    metrics = ray_runner.run(plan(cfg), train_fn=traced_worker(traces, after=stop_at_the_end))
    assert not (cfg.run_dir / STOP_FILE).exists()
    return cfg, traces, metrics


def test_two_workers_read_disjoint_slices_covering_the_epoch(reference):
    cfg, traces, metrics = reference
    assert metrics["step"] == STEPS_PER_EPOCH and 0 < metrics["d/real"] < 1

    seen = {int(p.name[4]): np.load(p) for p in traces.glob("rank*-pid*.npy")}
    assert sorted(seen) == [0, 1]
    assert seen[0].shape == seen[1].shape == (STEPS_PER_EPOCH, BATCH // 2)
    assert not set(seen[0].ravel()) & set(seen[1].ravel())
    assert set(seen[0].ravel()) | set(seen[1].ravel()) == set(range(256))

    # Every checkpoint step passed the replica check (broadcast from rank 0, compare) and
    # the chief wrote it where Ray's registry points.
    manifest = json.loads((cfg.run_dir / "checkpoints" / "step-00000016" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert sorted(p.name for p in (cfg.run_dir / "checkpoints").glob("step-*")) == ["step-00000012", "step-00000016"]
    assert (cfg.run_dir / "tb").is_dir() and (cfg.run_dir / "config.yaml").is_file()


def test_a_two_worker_run_in_a_bucket_resumes_from_it_after_a_sigkilled_worker(reference, s3_base: str, tmp_path: Path):
    """A SIGKILLed worker costs one checkpoint interval and nothing else, with the run and its
    prepared data in object storage."""
    cfg = ray_config(
        tmp_path, "in-bucket", train={"steps": 12, "max_failures": 1},
        runtime={"storage_path": s3_base},
        data={"prepared_dir": storage.join(s3_base, "prepared/synthetic")},
    )  # fmt: skip
    traces = tmp_path / "traces"
    traces.mkdir()
    metrics = ray_runner.run(plan(cfg), train_fn=traced_worker(traces, kill_rank=1, kill_at_step=7))
    assert (traces / "killed").exists() and metrics["step"] == 12

    run = storage.location(cfg.run_address)
    checkpoints = run.child("checkpoints")
    assert checkpoints.list() == [LATEST, "step-00000008", "step-00000012"]
    assert checkpoints.exists(f"step-00000012/{MANIFEST}") and checkpoints.read_text(LATEST).strip() == "step-00000012"
    # The restart read the step-4 checkpoint back from the bucket: 8 more steps on each rank.
    lengths = sorted(len(np.load(p)) for p in traces.glob("rank*-pid*.npy"))
    assert lengths[-2:] == [8, 8], lengths
    restored = fetch(storage.join(cfg.run_address, "checkpoints/step-00000012"))
    reference_cfg = reference[0]
    assert_same_as(final_state(reference_cfg, 12), tensors_in(restored.path))

    # Events, samples and the resolved config reached the bucket too.
    assert {"config.yaml", "tb", "samples"} <= set(run.list())
    assert "samples" in run.list() and "step-00000012.png" in run.list("samples")
    events = tmp_path / "events"
    run.download("tb", events)
    assert max(read_scalars(events)["loss/d"]) == 12


def test_without_max_failures_a_lost_worker_fails_the_run_clearly(s3_base, tmp_path: Path):
    cfg = ray_config(tmp_path, "fragile", train={"steps": 8, "max_failures": 0})
    with pytest.raises(ray_runner.RunFailed, match="train.max_failures=0"):
        ray_runner.run(plan(cfg), train_fn=traced_worker(tmp_path, kill_rank=0, kill_at_step=3))


def test_resubmitting_resumes_and_a_checkpoint_moves_to_fewer_workers(reference, tmp_path: Path):
    """The reference run, resubmitted under its name on one worker, picks up its step 16."""
    shutil.copytree(reference[0].run_dir, tmp_path / "runs" / "elastic")
    fewer = ray_config(tmp_path, "elastic", workers=1, train={"steps": 20})
    traces = tmp_path / "traces"
    traces.mkdir()
    metrics = ray_runner.run(plan(fewer), train_fn=traced_worker(traces))
    assert metrics["step"] == 20
    (trace,) = [np.load(p) for p in traces.glob("rank0-*.npy")]
    assert trace.shape == (4, BATCH)  # steps 17..20, the whole global batch on one rank
    # The data position carried over: the one rank reads what the two ranks would have read.
    from pipeline.data import DataPosition, EpochSharder

    sharder = EpochSharder(256, BATCH, fewer.train.seed, start=DataPosition(1, 0))
    assert all(np.array_equal(next(sharder), row) for row in trace)
    manifest = json.loads((fewer.run_dir / "checkpoints" / "step-00000020" / "manifest.json").read_text())
    assert manifest["world_size"] == 1


def test_sigterm_to_a_worker_checkpoints_at_a_step_boundary_and_the_retry_loses_no_step(reference, tmp_path: Path):
    # Checkpoints only at 8 and 12: a worker that died on SIGTERM at step 5 would cost 5 steps.
    sections = {"train": {"steps": 12, "max_failures": 1}, "checkpoint": {"every": 8, "keep": 2, "stop_check_every": 1}}
    stopped = ray_config(tmp_path, "sigterm", **sections)
    traces = tmp_path / "traces"
    traces.mkdir()
    metrics = ray_runner.run(plan(stopped), train_fn=traced_worker(traces, kill_rank=1, kill_at_step=5, sig=signal.SIGTERM))
    assert (traces / "killed").exists() and metrics["step"] == 12

    # Each rank ran twice (before and after the stop) and read exactly 12 batches in all: the
    # retry started at the step the ranks agreed to stop at, which they checkpointed.
    for rank in (0, 1):
        runs = sorted(len(np.load(p)) for p in traces.glob(f"rank{rank}-pid*.npy"))
        assert len(runs) == 2 and sum(runs) == 12 and 5 <= max(runs) < 12, runs
    a, b = final_state(reference[0], 12), final_state(stopped, 12)
    for name in a:
        if "running_" in name:
            # The stop's checkpoint averaged the ranks' BatchNorm statistics once more than the
            # uninterrupted run did. The average is linear, so it changes only float rounding.
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-8, msg=name)
        else:  # weights, Adam's moments and step counts: bit for bit
            assert torch.equal(a[name], b[name]), f"{name} differs from the uninterrupted run"


def test_a_process_already_connected_without_the_horovod_environment_is_told_how(s3_base):
    """A notebook's ray.init() without RAY_TRAIN_V2_ENABLED=0 for the workers: Horovod's V1
    workers would never get it, so the run is refused naming what to pass."""
    with pytest.raises(ConfigError, match=r"runtime_env=\{'env_vars': \{'RAY_TRAIN_V2_ENABLED': '0'\}\}"):
        driver.check_connected_env(driver.RAY_TRAINERS["horovod"])
    driver.check_connected_env(driver.RAY_TRAINERS["ddp"])  # needs nothing


def test_a_worker_that_does_not_see_the_shared_storage_fails_the_run_at_once_naming_its_node(s3_base, tmp_path: Path):
    import socket

    def hide_the_share(rank: int, loop_config: dict) -> None:
        # What a node without the shared mount sees: not the file the driver has just written.
        if rank == 1:
            for probe in map(Probe._make, loop_config["probes"]):
                (Path(probe.address) / probe.name).unlink(missing_ok=True)

    cfg = ray_config(tmp_path, "unshared")
    with pytest.raises(ray_runner.RunFailed) as failed:
        ray_runner.run(plan(cfg), train_fn=traced_worker(tmp_path, before=hide_the_share))
    message = str(failed.value)
    assert f"node {socket.gethostname()} (" in message and f"does not see {cfg.run_dir}/.storage-check/" in message
    assert "is not shared storage" in message and "s3://" in message
    assert not list((cfg.run_dir / "checkpoints").glob("step-*"))  # nothing trained onto one node's disk


EVALUATION_S = 6.0  # how long the evaluation of step 10 is made to take, at least


def slow_at_step_10_failing_at_step_20(checkpoint, address: str, step: int, run_address: str, device: str = "cpu"):
    """Ray's validation function as the product's, made slow at step 10, and failing at step 20
    (its generator asked to sample on a device this machine has not)."""
    import time

    from pipeline.ray_runner import validation

    if step == 10:
        time.sleep(EVALUATION_S)
    # In Ray's task process, where this function arrives by value: the product's own.
    return validation.evaluate_apart(checkpoint, address, step, run_address, "cuda:7" if step == 20 else device)


def test_ray_evaluates_checkpoints_apart_while_the_ranks_train_on(s3_base, tmp_path: Path, caplog, monkeypatch):
    """Two workers, eval.every 10: each evaluation runs as Ray's checkpoint validation (step 10's
    made to take 6 s more; the one of step 20 fails). The ranks never wait for it: no step boundary at an
    evaluation step takes long, and step 10's scores arrive while later steps train. Scores
    land at their steps (TensorBoard's eval run, scores.json), the failed one leaves its
    checkpoint unscored and the run going, the last one (pending when training ended) is
    recorded before the fit returns. A second fit evaluates in-line (eval.runs) and degrades
    (lr 0.5): there the ranks wait at each evaluation step; BEST survives retention beside the
    newest two, and Ray's ranking (eval/ranked_fid) agrees with BEST."""
    import time

    from pipeline import tensorboard as tb
    from pipeline.checkpoint import SCORES
    from pipeline.ray_runner import validation

    def quality_config(steps: int, lr: float, runs: str = "apart") -> Config:
        return ray_config(
            tmp_path, "quality",
            data={"source": "digits", "prepared_dir": str(tmp_path / "digits")},
            model={"nz": 32, "ngf": 16, "ndf": 16},
            # NCHW: the trajectory whose late degradation this test was calibrated on (channels-last
            # kernels round differently, and a GAN amplifies that into another run).
            train={"steps": steps, "global_batch_size": 32, "lr": lr, "channels_last": False},
            checkpoint={"every": 1000, "keep": 2},
            logging={"every": 10, "samples_every": 1000},
            eval={"every": 10, "num_samples": 200, "best_margin": 0.0, "runs": runs},
        )  # fmt: skip

    steps_started = tmp_path / "steps.jsonl"

    def stamp(rank: int, step: int) -> None:
        if rank == 0:
            with open(steps_started, "a") as handle:
                handle.write(json.dumps([step, time.time()]) + "\n")

    # A validation task that could never be scheduled would hold the fit's end for ever.
    no_gpu = quality_config(30, 2e-2)
    no_gpu.eval.resources.gpus = 1
    with pytest.raises(ConfigError, match=r"eval.resources=.* the Ray cluster has 0"):
        ray_runner.run(plan(no_gpu))
    assert not (no_gpu.run_dir / "checkpoints").exists()

    first = quality_config(30, 2e-2)
    checkpoint_config = driver.checkpoint_config(first)
    assert (checkpoint_config.checkpoint_score_attribute, checkpoint_config.checkpoint_score_order) == ("eval/ranked_fid", "min")
    monkeypatch.setattr(validation, "evaluate_apart", slow_at_step_10_failing_at_step_20)
    ray_runner.run(plan(first), train_fn=traced_worker(tmp_path, each_step=stamp))
    monkeypatch.undo()

    started = {step: at for step, at in map(json.loads, steps_started.read_text().splitlines())}
    checkpoints = first.run_dir / "checkpoints"
    # The ranks went on at once: an evaluation step's boundary (step n's train, save and
    # report) is as short as any other's, far shorter than one evaluation...
    boundaries = {n: started[n + 1] - started[n] for n in (10, 20)}
    assert max(boundaries.values()) < EVALUATION_S / 2, boundaries
    # ...and step 10's scores were written while the ranks trained on past step 12.
    assert (checkpoints / "step-00000010" / SCORES).stat().st_mtime > started[12]
    scored = {step: json.loads((checkpoints / f"step-{step:08d}" / SCORES).read_text()) for step in (10, 20, 30)}
    assert scored[20]["score"] is None and scored[20]["error"], scored[20]  # failed: unscored
    assert all(scored[step]["card"]["generator"] == "G" and scored[step]["score"] > 0 for step in (10, 30))
    fid = read_scalars(first.run_dir / "tb" / tb.EVAL_RUN)[tb.TAG_EVAL_FID]
    assert sorted(fid) == [10, 30]  # step 30's too: its evaluation was pending when training ended
    assert all(fid[step] == pytest.approx(scored[step]["score"], rel=1e-6) for step in (10, 30))

    # In-line, and it degrades late: resumed at step 30 with a learning rate far too high.
    steps_started.unlink()
    with caplog.at_level("INFO", logger="pipeline.ray_runner"):
        metrics = ray_runner.run(plan(quality_config(50, 0.5, "in-line")), train_fn=traced_worker(tmp_path, each_step=stamp))
    assert metrics["step"] == 50
    # Steps counted from this fit's start (step 30): the boundary of step 40 held an evaluation.
    started = {step + 30: at for step, at in map(json.loads, steps_started.read_text().splitlines())}
    plain = sorted(started[n + 1] - started[n] for n in range(31, 49) if n != 40)
    assert started[41] - started[40] > 3 * plain[len(plain) // 2], (started[41] - started[40], plain)
    assert not (checkpoints / "step-00000040" / SCORES).exists()  # scored before it was written: in its manifest
    fid.update(read_scalars(first.run_dir / "tb" / tb.EVAL_RUN)[tb.TAG_EVAL_FID])
    assert sorted(fid) == [10, 30, 40, 50]
    best_step = min(fid, key=fid.get)
    assert best_step <= 30 and fid[50] > fid[best_step], fid  # older than the newest two
    best = f"step-{best_step:08d}"
    assert (checkpoints / "BEST").read_text().strip() == best
    assert sorted(p.name for p in checkpoints.glob("step-*")) == sorted({"step-00000040", "step-00000050", best})
    # Ray's own ranking of this fit's pointers (steps 40-50; BEST may be older) agrees with BEST.
    assert "Ray ranks" not in caplog.text
