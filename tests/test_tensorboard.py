"""TensorBoard: the tag contract, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline import tensorboard as tb
from pipeline.data import ensure_prepared
from pipeline.session import TrainingSession
from tests.conftest import small_config
from tests.helpers import read_scalars


def _accumulator(tb_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_a_training_run_writes_every_tag(tmp_path: Path):
    cfg = small_config(tmp_path, train={"steps": 6}, logging={"every": 2, "samples_every": 3})
    ensure_prepared(cfg.data)  # the driver's part (pipeline.job.plan)
    with TrainingSession(cfg) as session:
        session.run()
    accumulator = _accumulator(cfg.run_dir / "tb")
    tags = accumulator.Tags()
    assert set(tb.SCALAR_TAGS) <= set(tags["scalars"])
    assert tags["images"] == [tb.TAG_SAMPLES]
    images = accumulator.Images(tb.TAG_SAMPLES)
    assert [image.step for image in images] == [3, 6]
    assert images[0].width > cfg.data.image_size * 2  # a grid, not one image
    assert (cfg.run_dir / "samples" / "step-00000006.png").is_file()
    assert "_hparams_/experiment" in accumulator.PluginTagToContent("hparams")

    scalars = read_scalars(cfg.run_dir / "tb")
    # log every 2, plus the checkpoint steps (every 4) and the last step
    assert sorted(scalars["loss/d"]) == [2, 4, 6]
    assert all(0 < v < 1 for v in scalars["d/real"].values())
    assert all(v > 0 for v in scalars["perf/images_per_sec"].values())


def test_null_writer_writes_nothing(tmp_path: Path):
    writer = tb.open_writer(tmp_path / "run", is_chief=False)
    writer.scalars(1, {"loss/d": 1.0})
    writer.image(tb.TAG_SAMPLES, 1, np.zeros((8, 8, 3), np.uint8))
    writer.close()
    assert not (tmp_path / "run").exists()


def test_purge_step_hides_what_a_crashed_run_logged_past_the_checkpoint(tmp_path: Path):
    writer = tb.open_writer(tmp_path, is_chief=True)
    for step in range(1, 7):
        writer.scalars(step, {"loss/d": float(step)})
    writer.close()
    resumed = tb.open_writer(tmp_path, is_chief=True, purge_step=5)  # resumed from step 4
    resumed.scalars(5, {"loss/d": 50.0})
    resumed.close()
    assert read_scalars(tmp_path / "tb")["loss/d"] == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 50.0}


def test_flat_hparams():
    assert tb.flat_hparams({"train": {"lr": 0.1, "amp": False}, "data": {"root": None, "classes": ["a"]}}) == {
        "train.lr": 0.1,
        "train.amp": False,
        "data.classes": "['a']",
    }


def test_hparams_name_the_run_below_that_holds_each_metric(tmp_path: Path):
    """The HParams dashboard finds eval/fid in <run>/tb/eval: its metric names that group."""
    from tensorboard.plugins.hparams import metadata

    writer = tb.open_writer(tmp_path, is_chief=True)
    writer.hparams({"train.lr": 2e-4, "model.ngf": 8}, {tb.TAG_LOSS_D: "", tb.TAG_EVAL_FID: tb.EVAL_RUN})
    writer.close()
    content = _accumulator(tmp_path / "tb").PluginTagToContent("hparams")
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert [(m.name.tag, m.name.group) for m in experiment.metric_infos] == [("loss/d", ""), ("eval/fid", "eval")]
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["train.lr"].number_value == 2e-4
