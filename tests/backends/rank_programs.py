"""What each rank runs in the data-parallel arithmetic tests, for either strategy: DDP ranks
start through tests/ddp_harness.run_ranks, Horovod ranks through tests/horovod_harness.run_horovod
(which passes arguments as JSON: paths and dtypes by name)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.backends.base import ReplicaMismatchError
from pipeline.backends.torch_backend import TorchBackend
from pipeline.context import RankContext
from pipeline.data import EpochSharder, ShardedImages, ensure_prepared
from tests.conftest import small_config

BATCH = 16


def config(tmp: Path, strategy: str = "ddp", sync_bn: bool = False):
    return small_config(
        tmp, model={"sync_batchnorm": sync_bn}, train={"global_batch_size": BATCH},
        distributed={"strategy": strategy},
    )  # fmt: skip


def replica_state(backend: TorchBackend) -> dict[str, torch.Tensor]:
    tensors = {f"G.{k}": v for k, v in backend.netG.state_dict().items()}
    tensors.update({f"D.{k}": v for k, v in backend.netD.state_dict().items()})
    for net, optimizer in (("G", backend.optG), ("D", backend.optD)):
        for index, state in enumerate(optimizer.state.values()):
            tensors.update({f"opt{net}.{index}.{k}": v for k, v in state.items()})
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


def saved_name(strategy: str, dtype: str, world: int, rank: int) -> str:
    return f"{strategy}-{dtype}-world{world}-rank{rank}.pt"


def train_and_save(
    rank: int, world: int, tmp: str | Path, strategy: str, sync_bn: bool, steps: int,
    perturb: bool = False, dtype: str = "float32",
) -> None:  # fmt: skip
    """`steps` steps, then the checkpoint's replica check; the state (or the check's error) to `tmp`.
    float64 lets tests check the data-parallel arithmetic exactly, where float32 rounding is
    amplified by ReLU kinks and Adam."""
    tmp = Path(tmp)
    cfg = config(tmp, strategy, sync_bn)
    backend = TorchBackend(cfg, RankContext(rank, rank, world), getattr(torch, dtype))
    images = ShardedImages(ensure_prepared(cfg.data))
    sharder = EpochSharder(len(images), BATCH, cfg.train.seed, rank, world)
    for step in range(1, steps + 1):
        backend.train_step(images.gather(next(sharder)), step)
    if perturb and rank == 1:
        with torch.no_grad():
            backend.netD.main[2].weight[0, 0, 0, 0] += 1e-3
    try:
        backend.synchronize_replicas()
        torch.save(replica_state(backend), tmp / saved_name(strategy, dtype, world, rank))
    except ReplicaMismatchError as err:
        (tmp / f"error-rank{rank}.txt").write_text(str(err))
    finally:
        backend.close()


def one_rank_infinite_loss(rank: int, world: int, tmp: str | Path, strategy: str) -> None:
    """One D update whose loss is infinite on rank 1 only; writes "<flag> <D unchanged>" per rank."""
    tmp = Path(tmp)
    cfg = config(tmp, strategy)
    backend = TorchBackend(cfg, RankContext(rank, rank, world))
    images = ShardedImages(ensure_prepared(cfg.data))
    real = torch.from_numpy(images.gather(next(EpochSharder(len(images), BATCH, cfg.train.seed, rank, world))))
    real = real.permute(0, 3, 1, 2).float().div(127.5).sub(1)
    before = [p.detach().clone() for p in backend.netD.parameters()]
    # Rank 1's loss is infinite while its gradients are finite (the constant adds none).
    loss = backend.trainD(real).mean() + (float("inf") if rank == 1 else 0.0)
    flag = backend._step(backend.optD, loss, backend.netD.parameters())
    unchanged = all(torch.equal(a, b) for a, b in zip(before, backend.netD.parameters()))
    (tmp / f"skip-rank{rank}.txt").write_text(f"{float(flag)} {unchanged}")
    backend.close()
