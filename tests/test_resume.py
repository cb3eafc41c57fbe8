"""Exact resume on CPU: K steps, save, a fresh process resuming to 2K == 2K steps in one go."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import cli
from tests.conftest import small_config
from tests.helpers import dcgan, read_scalars, write_config

pytestmark = pytest.mark.integration

K = 4
TRAINED_TAGS = ("loss/d", "loss/g", "d/real", "d/fake")


def _final_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    checkpoint = run_dir / "checkpoints" / f"step-{step:08d}"
    tensors = {}
    for name in ("generator.pt", "discriminator.pt", "optimizers.pt", "rng.pt"):
        payload = torch.load(checkpoint / name, weights_only=True)
        stack = [(name, payload)]
        while stack:  # flatten nested dicts into dotted names
            prefix, node = stack.pop()
            if isinstance(node, torch.Tensor):
                tensors[prefix] = node
            elif isinstance(node, dict):
                stack.extend((f"{prefix}.{k}", v) for k, v in node.items())
    return tensors


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_resume_in_a_fresh_process_is_bit_exact(tmp_path: Path, precision: str):
    train = {"steps": 2 * K, "precision": precision}
    whole = small_config(tmp_path, run={"name": "whole"}, train=train)
    split = small_config(tmp_path, run={"name": "split"}, train=train)
    whole_yaml = write_config(tmp_path / "whole.yaml", whole)
    split_yaml = write_config(tmp_path / "split.yaml", split)

    # The uninterrupted run and the first half in this process; the second half in a new one,
    # which has only the step-K checkpoint to go on.
    assert cli.main(["train", "--config", str(whole_yaml)]) == 0
    assert cli.main(["train", "--config", str(split_yaml), "--set", f"train.steps={K}"]) == 0  # stops and saves at K
    result = dcgan("train", "--config", split_yaml, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"resuming from {split.run_dir / 'checkpoints' / f'step-{K:08d}'}" in result.stderr

    a, b = _final_tensors(whole.run_dir, 2 * K), _final_tensors(split.run_dir, 2 * K)
    assert a.keys() == b.keys()
    assert any(".state." in name for name in a), "optimizer state must be compared too"
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    scaler_whole, scaler_split = (
        torch.load(run.run_dir / "checkpoints" / f"step-{2 * K:08d}" / "optimizers.pt", weights_only=True)["scaler"]
        for run in (whole, split)
    )
    assert scaler_whole == scaler_split  # plain numbers (scale, growth tracker), not tensors
    if precision == "fp16":  # the dynamic loss scale is part of the checkpoint
        assert scaler_whole["scale"] > 0 and "_growth_tracker" in scaler_whole

    logged_whole, logged_split = read_scalars(whole.run_dir / "tb"), read_scalars(split.run_dir / "tb")
    for tag in TRAINED_TAGS:
        assert sorted(logged_whole[tag]) == list(range(2, 2 * K + 1, 2))
        assert logged_whole[tag] == logged_split[tag], f"{tag} differs after resume"

