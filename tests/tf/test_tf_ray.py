"""MultiWorkerMirroredStrategy across 2 Ray workers (TensorflowTrainer sets TF_CONFIG)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from pipeline.job import plan
from tests.conftest import small_config
from tests.helpers import local_ray

ray = pytest.importorskip("ray")
from pipeline import ray_runner  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.ray]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    with local_ray(__name__):
        yield


def tf_ray_config(tmp_path: Path, name: str, **train):
    """Two MultiWorkerMirrored workers; G's moving average on, so the replica check and the
    exact resume cover it too."""
    return small_config(
        tmp_path, backend="tensorflow", run={"name": name}, train={"global_batch_size": 16, "steps": 8, **train},
        model={"g_ema_decay": 0.9},
        scaling={"num_workers": 2, "cpus_per_worker": 1}, runtime={"runner": "ray"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """8 uninterrupted steps on two workers (checkpoints at 4 and 8): what the run that loses a
    worker twice must end as."""
    cfg = tf_ray_config(tmp_path_factory.mktemp("mwms"), "mwms")
    return cfg, ray_runner.run(plan(cfg))


def test_two_tensorflow_workers_train_and_checkpoint_replicas_that_agree(reference):
    cfg, metrics = reference
    assert metrics["step"] == 8 and 0 < metrics["d/real"] < 1
    manifest = (cfg.run_dir / "checkpoints" / "step-00000008" / "manifest.json").read_text()
    assert '"framework": "tensorflow"' in manifest and '"world_size": 2' in manifest
    # Every checkpoint passed the replica check (fingerprints all-gathered, compared with replica 0's).


def test_a_sigterm_checkpoints_at_a_step_boundary_a_sigkill_resumes_from_it_and_the_run_ends_as_uninterrupted(reference, tmp_path: Path):
    """One fit, two losses of worker 1: SIGTERM in the first attempt (the ranks agree on a step,
    checkpoint it and end), SIGKILL in the second (no goodbye: Ray restarts the group, which
    resumes from the stop's checkpoint, the newest)."""
    import numpy as np

    from pipeline.backends.tf_backend import tf
    from pipeline.backends.tf_backend.backend import TFBackend
    from pipeline.context import LOCAL
    from tests.helpers import traced_worker

    stopped = tf_ray_config(tmp_path, "tf-stopped", max_failures=2)
    stopped.checkpoint.every, stopped.checkpoint.stop_check_every = 8, 1  # nothing saved before step 8 but the stop's
    traces = tmp_path / "traces"
    traces.mkdir()
    worker = traced_worker(traces, kill_rank=1, kill_at_step=3, sig=signal.SIGTERM, framework="tensorflow",
                           then=((3, signal.SIGKILL),))  # fmt: skip
    metrics = ray_runner.run(plan(stopped), train_fn=worker)
    assert (traces / "killed").exists() and (traces / "killed-2").exists() and metrics["step"] == 8
    steps = sorted(int(p.name[5:]) for p in (stopped.run_dir / "checkpoints").glob("step-*"))
    assert len(steps) == 2 and 0 < steps[0] < 8 and steps[1] == 8, steps  # the stop's checkpoint, then the end

    weights = []
    for run in (reference[0], stopped):  # its checkpoint at 4 averaged BatchNorm statistics once more
        backend = TFBackend(run, LOCAL, tf.distribute.OneDeviceStrategy("/device:CPU:0"))
        backend.load(run.run_dir / "checkpoints" / "step-00000008")
        weights.append(backend.export_weights())
    for name, value in weights[0].items():
        if "running_" in name:  # one more averaging of the replicas' BN statistics: rounding only
            np.testing.assert_allclose(weights[1][name], value, rtol=1e-5, atol=1e-8, err_msg=name)
        else:
            np.testing.assert_array_equal(weights[1][name], value, err_msg=name)


def test_a_sweep_of_a_tensorflow_trial_scores_it_and_names_a_tensorflow_best(tmp_path: Path):
    """A TensorflowTrainer inside a Tune trial, on this module's Ray: `dcgan sweep` runs in a
    process apart (its driver stores the digits classifier, a torch network, and evaluation
    scores in torch), the trial's rank 0 evaluates in its torch process, and the sweep's best
    is a TensorFlow checkpoint that verifies."""
    import json

    from pipeline.checkpoint import fetch
    from tests.helpers import dcgan, write_config

    cfg = small_config(
        tmp_path, backend="tensorflow", run={"name": "tf-sweep"}, data={"source": "digits", "image_size": 32, "channels": 1},
        train={"steps": 8, "global_batch_size": 16}, eval={"every": 8, "num_samples": 200, "runs": "in-line"},
        runtime={"runner": "ray", "ray_address": ray.get_runtime_context().gcs_address},
    )  # fmt: skip
    # One trial: what is TensorFlow's here is the trial, not the scheduling between trials.
    (tmp_path / "space.yaml").write_text("train.lr: {grid: [1.0e-3]}\n")
    done = dcgan("sweep", "--config", str(write_config(tmp_path / "sweep.yaml", cfg)), "--space", str(tmp_path / "space.yaml"),
                 "--scheduler", "none", cwd=tmp_path, timeout=600)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]

    summary = json.loads((cfg.run_dir / "sweep.json").read_text())
    (row,) = summary["trials"]
    assert row["overrides"] == ["train.lr=0.001"] and row["status"] == "finished" and row["last_step"] == 8, row
    assert row["best_fid"] > 0 and row["best_step"] == 8 and summary["best_trial"] == row["trial"], summary
    best = fetch(summary["best_checkpoint"])
    assert best.manifest["framework"] == "tensorflow" and best.manifest["config"]["train"]["lr"] == 1e-3
