"""Backends: one per framework, chosen by `backend:` in the config and imported lazily.

Lazy imports keep the rule that one process never loads two frameworks (docs/ARCHITECTURE.md, traps).
"""

from __future__ import annotations

from pipeline.backends.base import Backend, NonFiniteError
from pipeline.config import Config
from pipeline.context import RankContext


def create_backend(cfg: Config, ctx: RankContext) -> Backend:
    if cfg.backend == "torch":
        from pipeline.backends.torch_backend import TorchBackend

        return TorchBackend(cfg, ctx)
    if cfg.backend == "tensorflow":
        from pipeline.backends.tf_backend.backend import TFBackend

        return TFBackend(cfg, ctx)
    raise AssertionError(f"config validation admits no backend {cfg.backend!r}")


__all__ = ["Backend", "NonFiniteError", "create_backend"]
