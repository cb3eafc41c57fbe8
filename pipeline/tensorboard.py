"""TensorBoard event files on the chief; a null writer everywhere else.

tensorboardX, not torch.utils.tensorboard: torch's writer imports TensorFlow when it is
installed, and torch + TensorFlow in one process crashes (docs/ARCHITECTURE.md, traps). The tag names
are the contract shared by both backends.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from pipeline.images import save_png

TAG_LOSS_D = "loss/d"
TAG_LOSS_G = "loss/g"
TAG_D_REAL = "d/real"
TAG_D_FAKE = "d/fake"
TAG_IMAGES_PER_SEC = "perf/images_per_sec"
TAG_STEP_TIME_MS = "perf/step_time_ms"
TAG_SAMPLES = "samples/fixed_noise"
SCALAR_TAGS = (TAG_LOSS_D, TAG_LOSS_G, TAG_D_REAL, TAG_D_FAKE, TAG_IMAGES_PER_SEC, TAG_STEP_TIME_MS)
# Sample quality (eval.every): FID and KID against the real set; with the digits classifier
# also mode coverage (share of the 10 classes hit) and the KL of the class histogram from
# uniform. With model.g_ema_decay they score the EMA generator, and fid_without_ema G itself.
TAG_EVAL_FID = "eval/fid"
TAG_EVAL_KID = "eval/kid"
TAG_EVAL_COVERAGE = "eval/coverage"
TAG_EVAL_CLASS_KL = "eval/class_kl"
TAG_EVAL_FID_WITHOUT_EMA = "eval/fid_without_ema"  # with eval.score_raw_generator
# The noise of the two distances: FID's std over bootstrap resamples of the generated features
# (eval.bootstrap), KID's over its subsets.
TAG_EVAL_FID_STD = "eval/fid_std"
TAG_EVAL_KID_STD = "eval/kid_std"
EVAL_TAGS = (TAG_EVAL_FID, TAG_EVAL_FID_STD, TAG_EVAL_KID, TAG_EVAL_KID_STD, TAG_EVAL_COVERAGE, TAG_EVAL_CLASS_KL)
# Optional (eval.extra_metrics; `dcgan evaluate` always): improved precision and recall, and
# the memorisation-informed FID.
TAG_EVAL_PRECISION = "eval/precision"
TAG_EVAL_RECALL = "eval/recall"
TAG_EVAL_MIFID = "eval/mifid"
# Each evaluation's provenance card (pipeline.quality.evaluator), as text at its step.
TAG_EVAL_CARD = "eval/card"


class NullWriter:
    """What non-chief ranks hold, so call sites never branch on the rank."""

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        pass

    def image(self, tag: str, step: int, image_hwc: np.ndarray) -> None:
        pass

    def text(self, tag: str, step: int, text: str) -> None:
        pass

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, str]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class EventWriter(NullWriter):
    """Event files under `logdir`; sample grids also as PNG files under `samples_dir`."""

    def __init__(self, logdir: Path, samples_dir: Optional[Path] = None, purge_step: Optional[int] = None):
        SummaryWriter = _summary_writer_class()

        # purge_step: after a resume, TensorBoard hides what a crashed run logged past it.
        # The suffix keeps two writers opened within one second (a quick resume) from sharing
        # a file name, and keeps their files in the order TensorBoard must read them.
        self._writer = SummaryWriter(
            logdir=str(logdir), purge_step=purge_step, flush_secs=30, filename_suffix=f".{time.time_ns()}"
        )
        self.samples_dir = samples_dir

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def image(self, tag: str, step: int, image_hwc: np.ndarray) -> None:
        self._writer.add_image(tag, image_hwc, step, dataformats="HWC")
        if self.samples_dir is not None:
            save_png(image_hwc, self.samples_dir / f"step-{step:08d}.png")

    def text(self, tag: str, step: int, text: str) -> None:
        self._writer.add_text(tag, text, step)

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, str]) -> None:
        """Into this run's own event file (add_hparams would open a second run directory).
        `metrics`: the HParams dashboard's metric columns, tag -> the run below this one that
        holds it ("" = this run, EVAL_RUN = the eval/* scores). Pointed at a parent directory
        (a sweep's trials), the dashboard compares the runs below it."""
        from tensorboardX.proto.api_pb2 import MetricInfo, MetricName
        from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
        from tensorboardX.summary import hparams as hparams_summary

        experiment, start, end = hparams_summary(dict(hparams), dict.fromkeys(metrics, 0.0))
        plugin = experiment.value[0].metadata.plugin_data
        data = HParamsPluginData.FromString(plugin.content)
        del data.experiment.metric_infos[:]
        data.experiment.metric_infos.extend(MetricInfo(name=MetricName(tag=tag, group=group)) for tag, group in metrics.items())
        plugin.content = data.SerializeToString()
        for summary in (experiment, start, end):
            self._writer.file_writer.add_summary(summary)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch in a TensorFlow process.

    tensorboardX imports torch whenever it can; beside TensorFlow that must not happen
    (docs/ARCHITECTURE.md, traps). A None entry in sys.modules makes that one `import torch` fail, and
    tensorboardX falls back to numpy; the entry is removed again at once."""
    if "tensorflow" in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
        return SummaryWriter
    from tensorboardX import SummaryWriter

    return SummaryWriter


EVAL_RUN = "eval"  # <run>/tb/eval: TensorBoard's run of the eval/* scores


def open_writer(run_dir: Path, is_chief: bool, purge_step: Optional[int] = None) -> NullWriter:
    """<run>/tb for events and <run>/samples for PNG grids, on the chief only."""
    return EventWriter(run_dir / "tb", run_dir / "samples", purge_step) if is_chief else NullWriter()


def open_eval_writer(run_dir: Path, purge_step: Optional[int] = None) -> EventWriter:
    """<run>/tb/eval: the scores of evaluations, a TensorBoard run of their own beside the
    training's (as Keras writes train/ and validation/), whether the chief scores in-line or a
    task apart scores later: TensorBoard follows only the newest event file of a directory, so
    a second writer in <run>/tb would hide the training's live curves."""
    return EventWriter(run_dir / "tb" / EVAL_RUN, None, purge_step)


def flat_hparams(config: Mapping[str, Any]) -> dict[str, Any]:
    """Nested config -> {"train.lr": 0.0002, ...} with values TensorBoard's hparams can show."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in flat_hparams(value).items()})
        elif isinstance(value, (bool, int, float, str)):
            flat[key] = value
        elif value is not None:
            flat[key] = str(value)
    return flat
