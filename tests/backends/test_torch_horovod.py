"""Horovod arithmetic of the torch backend on real processes started by horovodrun (no Ray),
against DDP on the same seed and global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.backends.base import ReplicaMismatchError
from pipeline.backends.torch_backend import TorchBackend
from pipeline.context import RankContext
from pipeline.data import EpochSharder, ShardedImages, ensure_prepared
from tests.conftest import small_config
from tests.ddp_harness import run_ranks
from tests.horovod_harness import run_horovod

pytestmark = pytest.mark.integration

BATCH = 16
STEPS = 5
HERE = "tests.backends.test_torch_horovod"


def _config(tmp: Path, strategy: str, sync_bn: bool):
    return small_config(
        tmp, model={"sync_batchnorm": sync_bn}, train={"global_batch_size": BATCH},
        distributed={"strategy": strategy},
    )  # fmt: skip


def _state(backend: TorchBackend) -> dict[str, torch.Tensor]:
    tensors = {f"G.{k}": v for k, v in backend.netG.state_dict().items()}
    tensors.update({f"D.{k}": v for k, v in backend.netD.state_dict().items()})
    for net, optimizer in (("G", backend.optG), ("D", backend.optD)):
        for index, state in enumerate(optimizer.state.values()):
            tensors.update({f"opt{net}.{index}.{k}": v for k, v in state.items()})
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


def _train(rank: int, world: int, tmp: str, strategy: str, sync_bn: bool, steps: int, perturb: bool, dtype: str) -> None:
    tmp = Path(tmp)
    cfg = _config(tmp, strategy, sync_bn)
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
        torch.save(_state(backend), tmp / f"{strategy}-{dtype}-rank{rank}.pt")
    except ReplicaMismatchError as err:
        (tmp / f"error-rank{rank}.txt").write_text(str(err))
    finally:
        backend.close()


def _load(tmp: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(tmp / f"{name}.pt", weights_only=True)


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    ensure_prepared(small_config(tmp_path).data)  # once, before the ranks start
    return tmp_path


def test_two_horovod_ranks_end_with_identical_replicas_that_trained(prepared: Path):
    run_horovod(2, f"{HERE}:_train", prepared, "horovod", False, 3, False, "float32")
    rank0, rank1 = _load(prepared, "horovod-float32-rank0"), _load(prepared, "horovod-float32-rank1")
    assert rank0.keys() == rank1.keys() and any(k.startswith("optD") for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    initial = TorchBackend(small_config(prepared), RankContext()).netD.main[0].weight
    assert not torch.equal(rank0["D.main.0.weight"], initial), "training must have changed the weights"
    assert rank0["optD.0.step"].item() == 3 and rank0["optG.0.step"].item() == 3  # no extra Adam step from the broadcast


def test_horovod_matches_ddp_for_the_same_seed_and_global_batch(prepared: Path):
    """In float64, with BatchNorm over the global batch (Horovod's differentiable all-reduce in
    it): DDP averages gradients as a/2 + b/2, Horovod as (a + b)/2, which differ in the last bit
    at most; five steps of Adam keep that below 1e-9. (In float32 the same last-bit difference
    flips ReLU kinks and grows to ~1e-3, see test_torch_ddp.)"""
    run_horovod(2, f"{HERE}:_train", prepared, "horovod", True, STEPS, False, "float64")
    run_ranks(2, _train, str(prepared), "ddp", True, STEPS, False, "float64")
    horovod, ddp = _load(prepared, "horovod-float64-rank0"), _load(prepared, "ddp-float64-rank0")
    assert horovod.keys() == ddp.keys()
    worst = max((horovod[k].double() - ddp[k].double()).abs().max().item() for k in ddp if ddp[k].is_floating_point())
    print(f"largest Horovod - DDP difference after {STEPS} steps (float64): {worst:.3g}")
    assert worst <= 1e-9, f"largest difference {worst:.3g}"
    moved = (ddp["G.main.0.weight"] - TorchBackend(small_config(prepared), RankContext(), torch.float64).netG.main[0].weight)
    assert moved.abs().max() > 1e-4, "the comparison must be after real updates"


def test_a_diverged_horovod_replica_is_named_before_saving(prepared: Path):
    run_horovod(2, f"{HERE}:_train", prepared, "horovod", False, 1, True, "float32")
    for rank in (0, 1):
        message = (prepared / f"error-rank{rank}.txt").read_text()
        assert "first differing tensor discriminator.pt.main.2.weight" in message


def _one_rank_infinite_loss(rank: int, world: int, tmp: str) -> None:
    tmp = Path(tmp)
    cfg = _config(tmp, "horovod", False)
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


def test_an_infinite_loss_on_one_horovod_rank_skips_the_update_on_every_rank(prepared: Path):
    run_horovod(2, f"{HERE}:_one_rank_infinite_loss", prepared)
    for rank in (0, 1):
        assert (prepared / f"skip-rank{rank}.txt").read_text() == "1.0 True", f"rank {rank} applied the update"
