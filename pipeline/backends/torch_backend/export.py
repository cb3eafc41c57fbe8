"""The torch side of `dcgan export`: the generator as safetensors weights and as an ONNX graph."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

OUTPUT_LAYOUT = "NCHW"
WEIGHTS_FILE, ONNX_FILE = "generator.safetensors", "generator.onnx"
# The newest opset the TorchScript-based exporter supports: it writes 21 with a warning, and that
# graph computed different images here.
ONNX_OPSET = 20


class _FlatLatent(nn.Module):
    """z (N, nz) -> the generator's images: the ONNX input is a plain matrix, as in the other
    framework and in Backend.generate, not the (N, nz, 1, 1) the convolutions take."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None])


def write_generator(net: nn.Module, nz: int, out: Path, metadata: dict[str, str]) -> dict[str, str]:
    """Write `net` into `out` (the graph in inference mode); returns {file name: what it holds}."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in net.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata=metadata)
    example = torch.zeros(2, nz, device=next(net.parameters()).device)
    with warnings.catch_warnings():
        # dynamo=True needs onnxscript, which is not a dependency; the TorchScript-based
        # exporter handles this plain feed-forward net, but warns that it is not the default.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            _FlatLatent(net), (example,), str(out / ONNX_FILE), dynamo=False, opset_version=ONNX_OPSET,
            training=torch.onnx.TrainingMode.EVAL,  # BatchNorm's running statistics, as sampling uses them
            input_names=["z"], output_names=["images"], dynamic_axes={"z": {0: "batch"}, "images": {0: "batch"}},
        )  # fmt: skip
    return {
        WEIGHTS_FILE: "state dict of pipeline.backends.torch_backend.models.Generator (build_models), metadata: "
        + ", ".join(sorted(metadata)),
        ONNX_FILE: f"ONNX opset {ONNX_OPSET}: input z, output images, batch axis dynamic",
    }
