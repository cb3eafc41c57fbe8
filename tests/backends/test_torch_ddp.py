"""DDP arithmetic of the torch backend on real processes over gloo (no Ray involved)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.backends.torch_backend import TorchBackend
from pipeline.backends.base import ReplicaMismatchError
from pipeline.context import RankContext
from pipeline.data import EpochSharder, ShardedImages, ensure_prepared
from tests.conftest import small_config
from tests.ddp_harness import run_ranks

pytestmark = pytest.mark.integration

BATCH = 16
STEPS = 5


def _state(backend: TorchBackend) -> dict[str, torch.Tensor]:
    tensors = {f"G.{k}": v for k, v in backend.netG.state_dict().items()}
    tensors.update({f"D.{k}": v for k, v in backend.netD.state_dict().items()})
    for net, optimizer in (("G", backend.optG), ("D", backend.optD)):
        for index, state in enumerate(optimizer.state.values()):
            tensors.update({f"opt{net}.{index}.{k}": v for k, v in state.items()})
    return {k: v.detach().clone() for k, v in tensors.items()}


def _train(
    rank: int, world: int, tmp: Path, sync_bn: bool, steps: int, perturb: bool = False, dtype=torch.float32
) -> None:
    cfg = small_config(tmp, model={"sync_batchnorm": sync_bn}, train={"global_batch_size": BATCH})
    backend = TorchBackend(cfg, RankContext(rank, rank, world), dtype)
    images = ShardedImages(ensure_prepared(cfg.data))
    sharder = EpochSharder(len(images), BATCH, cfg.train.seed, rank, world)
    for step in range(1, steps + 1):
        backend.train_step(images.gather(next(sharder)), step)
    if perturb and rank == 1:
        with torch.no_grad():
            backend.netD.main[2].weight[0, 0, 0, 0] += 1e-3
    try:
        backend.synchronize_replicas()
        torch.save(_state(backend), tmp / f"world{world}-rank{rank}.pt")
    except ReplicaMismatchError as err:
        (tmp / f"error-rank{rank}.txt").write_text(str(err))
    finally:
        backend.close()


def _prepare(tmp: Path) -> None:
    ensure_prepared(small_config(tmp).data)  # once, before the ranks start


def test_two_ranks_end_with_identical_replicas(tmp_path: Path):
    _prepare(tmp_path)
    run_ranks(2, _train, tmp_path, False, 3)
    rank0 = torch.load(tmp_path / "world2-rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "world2-rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() and any(k.startswith("optD") for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    initial = TorchBackend(small_config(tmp_path), RankContext()).netD.main[0].weight
    assert not torch.equal(rank0["D.main.0.weight"], initial), "training must have changed the weights"


def test_sync_batchnorm_two_ranks_match_one_rank_with_the_whole_batch(tmp_path: Path):
    """In float64: in float32, rounding differences of ~1e-7 (the halves are reduced in another
    order) flip ReLU / LeakyReLU kinks of near-zero activations, and Adam, which normalises
    gradient size away, turns those into ~1e-3 weight differences within two steps."""
    _prepare(tmp_path)
    run_ranks(2, _train, tmp_path, True, STEPS, False, torch.float64)
    run_ranks(1, _train, tmp_path, False, STEPS, False, torch.float64)
    two = torch.load(tmp_path / "world2-rank0.pt", weights_only=True)
    one = torch.load(tmp_path / "world1-rank0.pt", weights_only=True)
    assert two.keys() == one.keys()
    worst = max((two[k].double() - one[k].double()).abs().max().item() for k in one if one[k].is_floating_point())
    print(f"largest difference after {STEPS} steps: {worst:.3g}")
    assert worst <= 1e-5, f"largest difference {worst:.3g}"
    moved = (one["G.main.0.weight"] - TorchBackend(small_config(tmp_path), RankContext()).netG.main[0].weight).abs()
    assert moved.max() > 1e-4, "the comparison must be after real updates"


def test_a_diverged_replica_is_named_before_saving(tmp_path: Path):
    _prepare(tmp_path)
    run_ranks(2, _train, tmp_path, False, 1, True)
    for rank in (0, 1):
        message = (tmp_path / f"error-rank{rank}.txt").read_text()
        assert "first differing tensor discriminator.pt.main.2.weight" in message


def _one_rank_infinite_loss(rank: int, world: int, tmp: Path) -> None:
    cfg = small_config(tmp, train={"global_batch_size": BATCH})
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


def test_an_infinite_loss_on_one_rank_skips_the_update_on_every_rank(tmp_path: Path):
    _prepare(tmp_path)
    run_ranks(2, _one_rank_infinite_loss, tmp_path)
    for rank in (0, 1):
        assert (tmp_path / f"skip-rank{rank}.txt").read_text() == "1.0 True", f"rank {rank} applied the update"
