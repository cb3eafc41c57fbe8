"""Backends: one per framework, chosen by `backend:` in the config and imported lazily.

Lazy imports keep the rule that one process never loads two frameworks (docs/ARCHITECTURE.md, traps).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from pipeline.backends.base import Backend, NonFiniteError
from pipeline.config import Config, ConfigError
from pipeline.context import LOCAL, RankContext


def create_backend(cfg: Config, ctx: RankContext) -> Backend:
    if cfg.backend == "torch":
        from pipeline.backends.torch_backend import TorchBackend

        return TorchBackend(cfg, ctx)
    if cfg.backend == "tensorflow":
        from pipeline.backends.tf_backend.backend import TFBackend

        return TFBackend(cfg, ctx)
    raise AssertionError(f"config validation admits no backend {cfg.backend!r}")


@contextmanager
def loaded_checkpoint(address: str, device: str) -> Iterator[tuple[Backend, Config, int]]:
    """(the backend of a checkpoint's own framework with its state loaded on `device`, the
    checkpoint's config, its step), closed on exit: what sample, export and evaluate start from."""
    from pipeline import config
    from pipeline.checkpoint import fetch

    info = fetch(address)
    cfg = config.validate(info.config, f"{address}/manifest.json")
    cfg.runtime.device = device
    backend = create_backend(cfg, LOCAL)
    try:
        backend.load(info.path)
        yield backend, cfg, info.step
    finally:
        backend.close()


def check_local_devices(cfg: Config) -> None:
    """For the local runner, before anything is written: the device asked for exists, and the
    global batch splits evenly over TensorFlow's replicas on this machine's devices. (Under Ray
    each worker trains on one GPU or the CPU, so the config's own check covers the split.)"""
    if cfg.backend == "torch":
        from pipeline.backends.torch_backend.device import pick_device

        pick_device(cfg.runtime.device)
        return
    from pipeline.backends.tf_backend.devices import local_replicas

    replicas = local_replicas(cfg.runtime.device)
    if cfg.train.global_batch_size % replicas:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by the {replicas} "
            "devices TensorFlow would mirror over on this machine (runtime.device selects them)"
        )


__all__ = ["Backend", "NonFiniteError", "check_local_devices", "create_backend", "loaded_checkpoint"]
