"""DDP arithmetic of the torch backend on real processes over gloo (no Ray involved)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.backends.torch_backend import TorchBackend
from pipeline.context import RankContext
from pipeline.data import ensure_prepared
from tests.backends.rank_programs import one_rank_infinite_loss, saved_name, train_and_save
from tests.conftest import small_config
from tests.ddp_harness import run_ranks

pytestmark = pytest.mark.integration

STEPS = 5


def _prepare(tmp: Path) -> None:
    ensure_prepared(small_config(tmp).data)  # once, before the ranks start


def test_two_ranks_end_with_identical_replicas(tmp_path: Path):
    _prepare(tmp_path)
    run_ranks(2, train_and_save, tmp_path, "ddp", False, 3)
    rank0 = torch.load(tmp_path / saved_name("ddp", "float32", 2, 0), weights_only=True)
    rank1 = torch.load(tmp_path / saved_name("ddp", "float32", 2, 1), weights_only=True)
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
    run_ranks(2, train_and_save, tmp_path, "ddp", True, STEPS, False, "float64")
    run_ranks(1, train_and_save, tmp_path, "ddp", False, STEPS, False, "float64")
    two = torch.load(tmp_path / saved_name("ddp", "float64", 2, 0), weights_only=True)
    one = torch.load(tmp_path / saved_name("ddp", "float64", 1, 0), weights_only=True)
    assert two.keys() == one.keys()
    worst = max((two[k].double() - one[k].double()).abs().max().item() for k in one if one[k].is_floating_point())
    print(f"largest difference after {STEPS} steps: {worst:.3g}")
    assert worst <= 1e-5, f"largest difference {worst:.3g}"
    moved = (one["G.main.0.weight"] - TorchBackend(small_config(tmp_path), RankContext()).netG.main[0].weight).abs()
    assert moved.max() > 1e-4, "the comparison must be after real updates"


def test_a_diverged_replica_is_named_before_saving(tmp_path: Path):
    _prepare(tmp_path)
    run_ranks(2, train_and_save, tmp_path, "ddp", False, 1, True)
    for rank in (0, 1):
        message = (tmp_path / f"error-rank{rank}.txt").read_text()
        assert "first differing tensor discriminator.pt.main.2.weight" in message


def test_an_infinite_loss_on_one_rank_skips_the_update_on_every_rank(tmp_path: Path):
    _prepare(tmp_path)
    run_ranks(2, one_rank_infinite_loss, tmp_path, "ddp")
    for rank in (0, 1):
        assert (tmp_path / f"skip-rank{rank}.txt").read_text() == "1.0 True", f"rank {rank} applied the update"
