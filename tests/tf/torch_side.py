"""The PyTorch half of a cross-framework comparison, run as its own process.

    python tests/tf/torch_side.py WEIGHTS INPUTS.npz OUT.npz NZ NGF NDF CHANNELS SIZE

WEIGHTS is a neutral .npz ("generator.main.0.weight", ...) or a torch checkpoint directory;
INPUTS holds `z` and NHWC `images`; OUT gets the outputs in both BatchNorm modes (NHWC).
"""

import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.backends.torch_backend.models import build_models
from pipeline.backends.torch_backend.weights import from_neutral

weights, inputs, target = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
nz, ngf, ndf, channels, size = map(int, sys.argv[4:9])
netG, netD = build_models(nz, ngf, ndf, channels, size, seed=0)
if weights.is_dir():
    netG.load_state_dict(torch.load(weights / "generator.pt", weights_only=True))
    netD.load_state_dict(torch.load(weights / "discriminator.pt", weights_only=True))
else:
    from_neutral({"generator": netG, "discriminator": netD}, dict(np.load(weights)))
data = dict(np.load(inputs))
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
