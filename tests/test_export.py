"""`dcgan export` of a torch checkpoint, `dcgan sample --interpolate`, and slerp."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.backends import create_backend
from pipeline.backends.base import latent_noise
from pipeline.context import LOCAL
from pipeline.latents import slerp
from tests.conftest import small_config
from tests.helpers import dcgan, write_config

# Rounding to uint8 can land on the other side of .5 where ONNX Runtime's float32 arithmetic
# differs from torch's in the last bits: at most this many of the 16*3*32*32 values, by 1.
MAX_ROUNDING_FLIPS = 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 4-step torch run (32 px, 3 channels), its checkpoint, and that checkpoint exported.

    The large learning rate moves G's outputs well away from 0 in 4 steps: at the default
    every pixel is 127 or 128, and a wrong graph would pass as a right one."""
    tmp_path = tmp_path_factory.mktemp("export")
    cfg = small_config(tmp_path, train={"steps": 4, "lr": 0.05}, data={"channels": 3})
    trained = dcgan("train", "--config", write_config(tmp_path / "t.yaml", cfg), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    checkpoint = cfg.run_dir / "checkpoints" / "step-00000004"
    out = tmp_path / "exported"
    done = dcgan("export", "--checkpoint", checkpoint, "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "generator.onnx" in done.stdout and "generator.safetensors" in done.stdout
    backend = create_backend(cfg, LOCAL)
    backend.load(checkpoint)
    yield cfg, checkpoint, out, backend
    backend.close()


def _torch_images(net: torch.nn.Module, z: np.ndarray) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        return net(torch.from_numpy(z)[:, :, None, None]).numpy()


def _to_uint8(images_nchw: np.ndarray) -> np.ndarray:
    return np.round((np.clip(images_nchw, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)


def test_onnx_computes_what_the_checkpoint_samples(exported):
    import onnxruntime

    cfg, _, out, backend = exported
    z = latent_noise(16, cfg.model.nz, seed=3)
    session = onnxruntime.InferenceSession(str(out / "generator.onnx"), providers=["CPUExecutionProvider"])
    (images,) = session.run(["images"], {"z": z})
    assert images.shape == (16, 3, 32, 32)
    expected = _torch_images(backend.sampling_net, z)
    assert np.abs(images - expected).max() <= 1e-4
    assert images.std() > 0.1, "small outputs would hide a wrong graph"
    (few,) = session.run(["images"], {"z": z[:3]})  # the batch axis is dynamic
    np.testing.assert_allclose(few, images[:3], atol=1e-6)

    ours, theirs = _to_uint8(images), backend.sample(num=16, seed=3)
    difference = np.abs(ours.astype(np.int16) - theirs)
    assert difference.max() <= 1 and np.count_nonzero(difference) <= MAX_ROUNDING_FLIPS


def test_safetensors_rebuild_the_generator_exactly(exported):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pipeline.backends.torch_backend.feed import to_uint8_images
    from pipeline.backends.torch_backend.models import build_models

    cfg, _, out, backend = exported
    with safe_open(str(out / "generator.safetensors"), "pt") as weights:
        metadata = weights.metadata()
    assert metadata == {"nz": "16", "ngf": "8", "image_size": "32", "channels": "3", "step": "4"}
    shape = {key: int(value) for key, value in metadata.items() if key != "step"}
    netG, _ = build_models(shape["nz"], shape["ngf"], cfg.model.ndf, shape["channels"], shape["image_size"], seed=0)
    netG.load_state_dict(load_file(str(out / "generator.safetensors")))
    netG.eval()
    with torch.no_grad():
        images = to_uint8_images(netG(torch.from_numpy(latent_noise(16, cfg.model.nz, seed=3))[:, :, None, None]))
    np.testing.assert_array_equal(images, backend.sample(num=16, seed=3))


def test_export_json_and_a_second_export_is_refused(exported):
    _, checkpoint, out, _ = exported
    summary = json.loads((out / "export.json").read_text())
    assert (summary["framework"], summary["step"], summary["nz"], summary["image_size"], summary["channels"]) == (
        "torch", 4, 16, 32, 3
    )
    assert summary["input"]["shape"] == [None, 16]
    assert summary["output"]["layout"] == "NCHW" and summary["output"]["shape"] == [None, 3, 32, 32]
    assert summary["output"]["range"] == [-1.0, 1.0]
    assert sorted(summary["files"]) == ["generator.onnx", "generator.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "generator.onnx", "generator.safetensors"]
    assert not list(out.parent.glob("*.tmp-*")), "the staging directory must be gone"

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = dcgan("export", "--checkpoint", checkpoint, "--out", out, cwd=out.parent)
    assert again.returncode == 2 and f"--out {out} exists and is not empty" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_sample_interpolate_writes_one_strip_per_row(exported):
    cfg, checkpoint, out, backend = exported
    strip = out.parent / "strip.png"
    done = dcgan("sample", "--checkpoint", checkpoint, "--interpolate", "6", "--rows", "3", "--seed", "5",
                 "--out", strip, cwd=out.parent)  # fmt: skip
    assert done.returncode == 0, done.stderr
    grid = np.asarray(Image.open(strip))
    assert grid.shape == (3 * 34 + 2, 6 * 34 + 2, 3)  # 3 rows of 6 images of 32 px, 2 px padding

    def tile(row: int, column: int) -> np.ndarray:
        top, left = 2 + row * 34, 2 + column * 34
        return grid[top : top + 32, left : left + 32]

    ends = backend.generate(latent_noise(6, cfg.model.nz, seed=5))  # row r: latents 2r -> 2r + 1
    for row in range(3):
        np.testing.assert_array_equal(tile(row, 0), ends[2 * row])
        np.testing.assert_array_equal(tile(row, 5), ends[2 * row + 1])
    assert not np.array_equal(tile(0, 2), tile(0, 0)) and not np.array_equal(tile(0, 2), tile(0, 5))

    refused = dcgan("sample", "--checkpoint", checkpoint, "--interpolate", "1", "--out", strip, cwd=out.parent)
    assert refused.returncode == 2 and "--interpolate must be >= 2" in refused.stderr


def test_slerp_keeps_its_ends_exactly_and_walks_the_sphere():
    rng = np.random.default_rng(0)
    start, end = rng.standard_normal((2, 4, 100)).astype(np.float32)
    path = slerp(start, end, 7)
    assert path.shape == (4, 7, 100) and path.dtype == np.float32
    np.testing.assert_array_equal(path[:, 0], start)
    np.testing.assert_array_equal(path[:, -1], end)

    # Equal norms: every point keeps the norm, in equal angles (a straight line would shrink
    # the midpoint's norm by about 1/sqrt(2) and take unequal angles).
    on_sphere = end * (np.linalg.norm(start, axis=-1) / np.linalg.norm(end, axis=-1))[:, None]
    path = slerp(start, on_sphere, 7).astype(np.float64)
    norms = np.linalg.norm(path, axis=-1)
    np.testing.assert_allclose(norms, norms[:, :1].repeat(7, axis=1), rtol=1e-5)
    unit = path / norms[..., None]
    angles = np.arccos(np.clip(np.sum(unit[:, 1:] * unit[:, :-1], axis=-1), -1, 1))
    np.testing.assert_allclose(angles, angles[:, :1].repeat(6, axis=1), rtol=1e-3)
    assert angles.min() > 0.1

    # Parallel latents have no arc: the path is the straight line, without NaNs.
    np.testing.assert_allclose(slerp(start[0], 3 * start[0], 3), [start[0], 2 * start[0], 3 * start[0]], rtol=1e-6)
