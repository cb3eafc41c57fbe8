"""G's moving average in the torch backend: its arithmetic, its checkpoint, what samples from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.backends.base import warmed_up_decay
from pipeline.backends.torch_backend import TorchBackend
from pipeline.backends.torch_backend.backend import GENERATOR_EMA_FILE
from pipeline.context import LOCAL
from tests.conftest import small_config

DECAY = 0.9


def batch(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(16, 32, 32, 1), dtype=np.uint8)


def floats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def test_the_average_follows_the_warmed_up_recurrence(tmp_path: Path):
    backend = TorchBackend(small_config(tmp_path, model={"g_ema_decay": DECAY}), LOCAL)
    expected = floats(backend.netG)  # the average starts as G
    for step in range(1, 6):
        backend.train_step(batch(step), step)
        decay = warmed_up_decay(DECAY, step)
        current = floats(backend.netG)
        expected = {k: decay * expected[k] + (1 - decay) * current[k] for k in expected}
    averaged = floats(backend.netG_ema.module)
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(averaged["main.0.weight"], backend.netG.state_dict()["main.0.weight"])
    assert warmed_up_decay(0.999, 1) == pytest.approx(2 / 11) and warmed_up_decay(0.999, 10**6) == 0.999


def test_sampling_uses_the_average_and_a_checkpoint_keeps_it(tmp_path: Path):
    cfg = small_config(tmp_path, model={"g_ema_decay": DECAY})
    backend = TorchBackend(cfg, LOCAL)
    for step in range(1, 4):
        backend.train_step(batch(step), step)
    assert backend.sampling_net is backend.netG_ema.module
    z = np.random.default_rng(0).standard_normal((8, cfg.model.nz)).astype(np.float32)
    assert not np.array_equal(backend.generate(z), backend.generate(z, averaged=False))

    backend.save(tmp_path)
    fresh = TorchBackend(cfg, LOCAL)
    fresh.load(tmp_path)
    assert fresh.fingerprint() == backend.fingerprint()
    assert np.array_equal(fresh.generate(z), backend.generate(z))

    # A checkpoint written without an average (EMA switched on later): it starts from G.
    (tmp_path / GENERATOR_EMA_FILE).unlink()
    fresh.load(tmp_path)
    assert np.array_equal(fresh.generate(z), backend.generate(z, averaged=False))


def test_without_a_decay_there_is_no_average(tmp_path: Path):
    backend = TorchBackend(small_config(tmp_path), LOCAL)
    backend.save(tmp_path)
    assert backend.sampling_net is backend.netG and not (tmp_path / GENERATOR_EMA_FILE).exists()


def test_standing_statistics_are_those_of_the_average_on_fresh_latents_and_leave_it_as_it_was(tmp_path: Path):
    """Inside the block every BatchNorm layer of the average normalizes its inputs over the
    standing latents to mean 0 and variance 1, as its statistics are theirs; after it, the
    averaged statistics are back, and sampling differs between the two."""
    from pipeline.backends.base import STANDING_SEED, latent_noise

    cfg = small_config(tmp_path, model={"g_ema_decay": DECAY, "g_ema_standing_statistics": 512})
    backend = TorchBackend(cfg, LOCAL)
    for step in range(1, 4):
        backend.train_step(batch(step), step)
    net = backend.netG_ema.module
    layers = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
    z = latent_noise(512, cfg.model.nz, STANDING_SEED)
    normalized = []

    def record(module, inputs, output):
        weight, bias = module.weight.view(1, -1, 1, 1), module.bias.view(1, -1, 1, 1)
        normalized.append(((output - bias) / weight).double())

    with backend.standing_statistics(), torch.no_grad():
        assert not net.training
        handles = [layer.register_forward_hook(record) for layer in layers]  # after the estimation's passes
        net(torch.from_numpy(z).view(512, -1, 1, 1))
        for handle in handles:
            handle.remove()
    assert len(normalized) == len(layers) == 3
    for values in normalized:
        torch.testing.assert_close(values.mean(dim=(0, 2, 3)), torch.zeros(values.shape[1], dtype=torch.float64), atol=1e-4, rtol=0)
        torch.testing.assert_close(values.var(dim=(0, 2, 3)), torch.ones(values.shape[1], dtype=torch.float64), atol=1e-2, rtol=0)
    for layer, (mean, var) in zip(layers, before):
        assert torch.equal(layer.running_mean, mean) and torch.equal(layer.running_var, var)
    plain = TorchBackend(small_config(tmp_path / "plain", model={"g_ema_decay": DECAY}), LOCAL)
    plain.netG.load_state_dict(backend.netG.state_dict())
    plain.netG_ema.module.load_state_dict(net.state_dict())
    assert not np.array_equal(backend.generate(z[:16]), plain.generate(z[:16]))


def test_d_has_its_own_learning_rate_and_a_resume_takes_the_configs_rates(tmp_path: Path):
    """train.lr_d (TTUR): D's Adam has its own rate; a resume with other rates (a sweep's PBT
    perturbation) trains on with the config's, not the checkpoint's."""
    backend = TorchBackend(small_config(tmp_path, train={"lr": 1e-4, "lr_d": 4e-4}), LOCAL)
    backend.train_step(batch(1), 1)
    assert [g["lr"] for g in backend.optG.param_groups] == [1e-4]
    assert [g["lr"] for g in backend.optD.param_groups] == [4e-4]
    backend.save(tmp_path)
    resumed = TorchBackend(small_config(tmp_path, train={"lr": 3e-4}), LOCAL)
    resumed.load(tmp_path)
    assert [g["lr"] for g in resumed.optG.param_groups] == [3e-4]
    assert [g["lr"] for g in resumed.optD.param_groups] == [3e-4]  # lr_d unset: D follows lr
