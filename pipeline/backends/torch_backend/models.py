"""The DCGAN of Radford et al. (2015), with no distributed code.

Layer order and parameter names follow the widely used PyTorch DCGAN example
(pytorch/examples `dcgan/main.py`): an `nn.Sequential` named `main`, so at 64 px a `netG` /
`netD` state dict from that example loads here and ours loads there. The one difference is
that D returns logits (no final Sigmoid, which has no parameters): the loss is
BCE-with-logits, which stays safe under autocast where BCELoss does not.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.backends.base import num_resolution_doublings



class Generator(nn.Module):
    """z (N, nz, 1, 1) -> image (N, channels, size, size) in [-1, 1]."""

    def __init__(self, nz: int = 100, ngf: int = 64, channels: int = 3, image_size: int = 64):
        super().__init__()
        hidden = num_resolution_doublings(image_size) - 1  # the last upsampling emits the image
        width = ngf * 2**hidden  # 64 px: ngf * 8, as in the canonical example
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(nz, width, 4, 1, 0, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(True),
        ]
        for _ in range(hidden):
            layers += [
                nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width // 2),
                nn.ReLU(True),
            ]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        self.nz = nz

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class Discriminator(nn.Module):
    """image (N, channels, size, size) -> logits (N,). No BatchNorm on the first layer."""

    def __init__(self, ndf: int = 64, channels: int = 3, image_size: int = 64):
        super().__init__()
        downsamplings = num_resolution_doublings(image_size)
        layers: list[nn.Module] = [
            nn.Conv2d(channels, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width = ndf
        for _ in range(downsamplings - 1):
            layers += [
                nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width * 2),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width *= 2
        layers += [nn.Conv2d(width, 1, 4, 1, 0, bias=False)]
        self.main = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.main(image).view(-1)


def dcgan_init_(module: nn.Module) -> None:
    """The paper's init: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_models(
    nz: int, ngf: int, ndf: int, channels: int, image_size: int, seed: int
) -> tuple[Generator, Discriminator]:
    """G and D initialised from `seed` alone, so every rank builds the same replicas."""
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        netG = Generator(nz, ngf, channels, image_size)
        netD = Discriminator(ndf, channels, image_size)
        netG.apply(dcgan_init_)
        netD.apply(dcgan_init_)
    finally:
        torch.random.set_rng_state(rng_state)
    return netG, netD


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
