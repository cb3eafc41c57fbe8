"""The TensorFlow backend: training, checkpoints, strategies, and the contract it shares with torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.backends.tf_backend import tf
from pipeline.backends.tf_backend.backend import TFBackend
from pipeline.checkpoint import CheckpointManager
from pipeline.context import LOCAL
from pipeline.data import EpochSharder, ShardedImages, ensure_prepared
from tests.conftest import small_config
from tests.helpers import dcgan, read_scalars, write_config

SINGLE = "/device:CPU:0"


def _with_backend(tmp_path: Path, **sections):
    return small_config(tmp_path, backend="tensorflow", **sections)


def _train(backend: TFBackend, cfg, steps: int, start: int = 1) -> list[dict[str, float]]:
    images = ShardedImages(ensure_prepared(cfg.data))
    sharder = EpochSharder(len(images), cfg.train.global_batch_size, cfg.train.seed)
    batches = backend.batches(images, sharder)
    return [backend.to_host(backend.train_step(next(batches), step)) for step in range(start, start + steps)]


def test_this_process_has_two_logical_cpu_devices_for_mirrored_strategy():
    assert len(tf.config.list_logical_devices("CPU")) == 2  # tests/tf/conftest.py


def test_checkpoint_round_trip(tmp_path: Path):
    cfg = _with_backend(tmp_path)
    backend = TFBackend(cfg, LOCAL, tf.distribute.OneDeviceStrategy(SINGLE))
    losses = _train(backend, cfg, 2)
    assert all(np.isfinite(list(step.values())).all() for step in losses)
    manager = CheckpointManager(tmp_path / "ckpt", keep=2)
    path = manager.save(2, backend.save, {"framework": "tensorflow", "world_size": 1, "config": cfg.to_dict()}).path
    fresh = TFBackend(cfg, LOCAL, tf.distribute.OneDeviceStrategy(SINGLE))
    assert fresh.fingerprint() != backend.fingerprint()
    fresh.load(path)
    assert fresh.fingerprint() == backend.fingerprint()


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """2 steps on one device and on a MirroredStrategy over two, from the same weights, with
    synchronized BatchNorm (both compute statistics over the same 16 images). One strategy over
    two devices serves the module: a second one that runs collectives in this process can
    clash with the first's (docs/ARCHITECTURE.md, traps)."""
    cfg = _with_backend(tmp_path_factory.mktemp("mirrored"), model={"sync_batchnorm": True})
    one = TFBackend(cfg, LOCAL, tf.distribute.OneDeviceStrategy(SINGLE))
    two = TFBackend(cfg, LOCAL, tf.distribute.MirroredStrategy(["/device:CPU:0", "/device:CPU:1"]))
    assert two.strategy.num_replicas_in_sync == 2
    assert one.fingerprint() == two.fingerprint(), "both start from the same weights"
    return one, two, _train(one, cfg, 2), _train(two, cfg, 2)


def test_mirrored_over_two_devices_matches_one_device_on_the_same_global_batch(mirrored):
    """Tolerance: float32 reductions in another order differ by ~1e-7, and over a few Adam steps
    ReLU kinks amplify that (see tests/backends/test_torch_ddp.py); step 1 and 2 losses agree to 1e-5."""
    one, two, a, b = mirrored
    for step_a, step_b in zip(a, b):
        for name in ("loss/d", "loss/g", "d/real", "d/fake"):
            assert step_a[name] == pytest.approx(step_b[name], abs=1e-5), name
    gen_a = np.concatenate([w.numpy().ravel() for w in one.netG.trainable_weights])
    gen_b = np.concatenate([w.numpy().ravel() for w in two.netG.trainable_weights])
    assert np.abs(gen_a - gen_b).max() < 1e-3


def test_a_replica_that_drifted_is_named_before_a_checkpoint(mirrored):
    """One element of one replica's copy, one bit off: the replicas' fingerprints differ. The
    BatchNorm statistics are averaged first, so a drift there is healed, not reported."""
    from pipeline.backends.base import ReplicaMismatchError

    two = mirrored[1]
    two.synchronize_replicas()  # trained replicas agree
    names = {id(variable): name for name, variable in two._variables()}
    drifting = {
        "weight": two.netD.trainable_weights[0],
        "Adam moment": two.optD.variables[1],
        "BatchNorm statistic": two.netG.non_trainable_weights[0],
    }
    for kind, variable in drifting.items():
        own, other = variable.value.values  # each replica's own copy
        bits = tf.bitcast(tf.reshape(other, [-1]), tf.int32).numpy()
        bits[len(bits) // 2] ^= 1
        other.assign(tf.reshape(tf.bitcast(tf.constant(bits), tf.float32), other.shape))
        if kind == "BatchNorm statistic":
            two.synchronize_replicas()
            np.testing.assert_array_equal(own.numpy(), other.numpy())
            continue
        with pytest.raises(ReplicaMismatchError, match="first differing tensor") as raised:
            two.synchronize_replicas()
        assert str(raised.value).endswith(names[id(variable)]), kind
        other.assign(own)  # agreed again for the next kind


@pytest.mark.integration
def test_same_tags_as_the_torch_backend_and_exact_resume(tmp_path: Path):
    torch_cfg = small_config(tmp_path, run={"name": "torch"}, train={"steps": 8})
    tf_cfg = _with_backend(tmp_path, run={"name": "tf"}, train={"steps": 8})
    split = _with_backend(tmp_path, run={"name": "split"}, train={"steps": 8})
    runs = [
        ["train", "--config", write_config(tmp_path / "torch.yaml", torch_cfg)],
        ["train", "--config", write_config(tmp_path / "tf.yaml", tf_cfg)],
        ["train", "--config", write_config(tmp_path / "split.yaml", split), "--set", "train.steps=4"],
        ["train", "--config", tmp_path / "split.yaml"],
    ]
    for args in runs:
        done = dcgan(*args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = []
    for cfg in (torch_cfg, tf_cfg):
        accumulator = EventAccumulator(str(cfg.run_dir / "tb"))
        accumulator.Reload()
        tags.append({kind: sorted(accumulator.Tags()[kind]) for kind in ("scalars", "images")})
        tags[-1]["hparams"] = sorted(accumulator.PluginTagToContent("hparams"))
    assert tags[0] == tags[1] and tags[0]["scalars"] and tags[0]["images"] == ["samples/fixed_noise"]

    whole, resumed = read_scalars(tf_cfg.run_dir / "tb"), read_scalars(split.run_dir / "tb")
    for tag in ("loss/d", "loss/g", "d/real", "d/fake"):
        assert whole[tag] == resumed[tag], tag
    a = TFBackend(tf_cfg, LOCAL, tf.distribute.OneDeviceStrategy(SINGLE))
    b = TFBackend(split, LOCAL, tf.distribute.OneDeviceStrategy(SINGLE))
    a.load(tf_cfg.run_dir / "checkpoints" / "step-00000008")
    b.load(split.run_dir / "checkpoints" / "step-00000008")
    assert a.fingerprint() == b.fingerprint()


def test_a_global_batch_that_does_not_split_over_the_replicas_is_a_config_error(tmp_path: Path):
    from pipeline.config import ConfigError

    cfg = _with_backend(tmp_path, train={"global_batch_size": 15})
    with pytest.raises(ConfigError, match="global_batch_size=15 is not divisible by the 2 replicas"):
        TFBackend(cfg, LOCAL, tf.distribute.MirroredStrategy(["/device:CPU:0", "/device:CPU:1"]))


def test_xla_and_graph_steps_both_train(tmp_path: Path):
    """train.compile: XLA under the default strategy, a plain graph by default."""
    default = tf.distribute.get_strategy()
    xla = TFBackend(_with_backend(tmp_path, train={"compile": True}), LOCAL, default)
    graph = TFBackend(_with_backend(tmp_path), LOCAL, default)
    assert xla.describe()["compiled"] and not graph.describe()["compiled"]
    # XLA fuses and reorders the arithmetic: its losses differ from the graph's by ~2% at step 1
    # (measured), so only that both train is checked here.
    for losses in (_train(xla, xla.cfg, 3), _train(graph, graph.cfg, 3)):
        assert all(np.isfinite(list(step.values())).all() and step["nonfinite"] == 0 for step in losses)
    mirrored = TFBackend(_with_backend(tmp_path, train={"compile": True}), LOCAL, tf.distribute.MirroredStrategy(["/device:CPU:0", "/device:CPU:1"]))
    assert not mirrored.describe()["compiled"]  # XLA compiles neither per-device copies nor collectives


@pytest.mark.parametrize("precision, scale", [("bf16", 1.0), ("fp16", 2.0**16)])
def test_mixed_precision_policies_keep_float32_weights_and_outputs(tmp_path: Path, precision: str, scale: float):
    cfg = _with_backend(tmp_path, train={"precision": precision})
    backend = TFBackend(cfg, LOCAL, tf.distribute.OneDeviceStrategy(SINGLE))
    assert backend.describe()["precision"] == f"{precision} (set in the config)"
    assert backend.netG.layers[-2].compute_dtype == {"bf16": "bfloat16", "fp16": "float16"}[precision]
    assert all(w.dtype == "float32" for w in backend.netG.trainable_weights + backend.netD.trainable_weights)
    assert backend.netG.outputs[0].dtype == "float32" and backend.netD.outputs[0].dtype == "float32"
    assert float(backend.optG.dynamic_scale.numpy()) == scale  # a dynamic loss scale under fp16 only
    losses = _train(backend, cfg, 3)
    assert all(np.isfinite(list(step.values())).all() and step["nonfinite"] == 0 for step in losses)


def test_d_has_its_own_learning_rate_and_a_resume_takes_the_configs_rates(tmp_path: Path):
    cfg = _with_backend(tmp_path, train={"lr": 1e-4, "lr_d": 4e-4})
    backend = TFBackend(cfg, LOCAL, tf.distribute.OneDeviceStrategy(SINGLE))
    _train(backend, cfg, 1)
    assert np.isclose(float(backend.optG.learning_rate), 1e-4) and np.isclose(float(backend.optD.learning_rate), 4e-4)
    path = CheckpointManager(tmp_path / "ckpt", keep=2).save(1, backend.save, {"framework": "tensorflow", "world_size": 1, "config": cfg.to_dict()}).path
    resumed = TFBackend(_with_backend(tmp_path, train={"lr": 3e-4}), LOCAL, tf.distribute.OneDeviceStrategy(SINGLE))
    resumed.load(path)
    assert np.isclose(float(resumed.optG.learning_rate), 3e-4) and np.isclose(float(resumed.optD.learning_rate), 3e-4)
