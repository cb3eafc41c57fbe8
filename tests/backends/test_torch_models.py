"""DCGAN architecture: shapes, the paper's initialisation, and state-dict compatibility with
the canonical PyTorch example (pytorch/examples dcgan/main.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.backends.torch_backend.models import Discriminator, Generator, build_models, count_parameters


# --- the canonical example's networks, as published (64 px, `ngpu` plumbing left out) -------
class ExampleGenerator(nn.Module):
    def __init__(self, nz=100, ngf=64, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),
        )  # fmt: skip

    def forward(self, x):
        return self.main(x)


class ExampleDiscriminator(nn.Module):
    def __init__(self, ndf=64, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid(),
        )  # fmt: skip

    def forward(self, x):
        return self.main(x).view(-1, 1).squeeze(1)


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(size: int, channels: int):
    netG, netD = build_models(nz=16, ngf=8, ndf=8, channels=channels, image_size=size, seed=0)
    images = netG(torch.randn(3, 16, 1, 1))
    assert images.shape == (3, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1  # Tanh
    assert netD(images).shape == (3,)


def test_discriminator_returns_logits_and_first_layer_has_no_batchnorm():
    netD = Discriminator(ndf=8, channels=3, image_size=64)
    assert isinstance(netD.main[0], nn.Conv2d) and isinstance(netD.main[1], nn.LeakyReLU)
    assert netD.main[1].negative_slope == 0.2
    assert not isinstance(netD.main[-1], nn.Sigmoid)
    batchnorms = [m for m in netD.main if isinstance(m, nn.BatchNorm2d)]
    assert len(batchnorms) == 3
    netG = Generator(nz=16, ngf=8, channels=3, image_size=64)
    assert isinstance(netG.main[-1], nn.Tanh)
    assert sum(isinstance(m, nn.ReLU) for m in netG.main) == 4


def test_init_statistics():
    netG, netD = build_models(nz=100, ngf=64, ndf=64, channels=3, image_size=64, seed=1)
    for net in (netG, netD):
        conv = torch.cat([m.weight.flatten() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
        bn_w = torch.cat([m.weight for m in net.modules() if isinstance(m, nn.BatchNorm2d)])
        bn_b = torch.cat([m.bias for m in net.modules() if isinstance(m, nn.BatchNorm2d)])
        assert abs(conv.mean().item()) < 1e-3 and conv.std().item() == pytest.approx(0.02, rel=0.02)
        assert bn_w.mean().item() == pytest.approx(1.0, abs=0.01) and bn_w.std().item() == pytest.approx(0.02, rel=0.15)
        assert torch.count_nonzero(bn_b) == 0


def test_init_is_a_function_of_the_seed_alone():
    torch.manual_seed(123)
    a, _ = build_models(16, 8, 8, 1, 32, seed=5)
    torch.manual_seed(999)
    b, _ = build_models(16, 8, 8, 1, 32, seed=5)
    c, _ = build_models(16, 8, 8, 1, 32, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.main[0].weight, c.main[0].weight)


def test_parameter_counts_match_the_canonical_example():
    netG, netD = build_models(100, 64, 64, 3, 64, seed=0)
    assert count_parameters(netG) == count_parameters(ExampleGenerator()) == 3_576_704
    assert count_parameters(netD) == count_parameters(ExampleDiscriminator()) == 2_765_568


def test_state_dicts_load_both_ways_with_the_canonical_example():
    ours_G, ours_D = build_models(100, 64, 64, 3, 64, seed=0)
    theirs_G, theirs_D = ExampleGenerator(), ExampleDiscriminator()

    theirs_G.load_state_dict(ours_G.state_dict())  # strict: every key and shape must match
    theirs_D.load_state_dict(ours_D.state_dict())
    ours_G.eval(), theirs_G.eval(), ours_D.eval(), theirs_D.eval()
    z = torch.randn(4, 100, 1, 1)
    torch.testing.assert_close(theirs_G(z), ours_G(z), rtol=0, atol=0)
    images = ours_G(z)
    # Ours returns logits, theirs probabilities: the same numbers through a sigmoid.
    torch.testing.assert_close(theirs_D(images), torch.sigmoid(ours_D(images)))

    fresh_G, fresh_D = ExampleGenerator(), ExampleDiscriminator()
    ours_G.load_state_dict(fresh_G.state_dict())
    ours_D.load_state_dict(fresh_D.state_dict())
    fresh_G.eval()
    torch.testing.assert_close(ours_G(z), fresh_G(z), rtol=0, atol=0)
