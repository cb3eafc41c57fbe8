"""The PyTorch half of a cross-framework comparison, run as its own process.

    python tests/tf/torch_side.py IN.npz OUT.npz NZ NGF NDF CHANNELS SIZE

IN holds neutral weights ("generator.main.0.weight", ...) plus `z` and NHWC `images`; OUT gets
the PyTorch outputs for both BatchNorm modes, images back in NHWC.
"""

import sys

import numpy as np
import torch

from pipeline.backends.torch_backend.models import build_models
from pipeline.backends.torch_backend.weights import from_neutral

source, target = sys.argv[1], sys.argv[2]
nz, ngf, ndf, channels, size = map(int, sys.argv[3:8])
data = dict(np.load(source))
netG, netD = build_models(nz, ngf, ndf, channels, size, seed=0)
from_neutral(netG, netD, data)
z = torch.from_numpy(data["z"]).view(-1, nz, 1, 1)
images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2)
out = {}
with torch.no_grad():
    for mode, training in (("eval", False), ("train", True)):
        netG.train(training)
        netD.train(training)
        out[f"g_{mode}"] = netG(z).permute(0, 2, 3, 1).numpy()
        out[f"d_{mode}"] = netD(images).numpy()
np.savez(target, **out)
