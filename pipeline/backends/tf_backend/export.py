"""The TensorFlow side of `dcgan export`: the generator as a SavedModel with a serving signature."""

from __future__ import annotations

from pathlib import Path

import keras

from pipeline.backends.tf_backend import tf

OUTPUT_LAYOUT = "NHWC"
SAVED_MODEL_DIR = "saved_model"
ENDPOINT = "serve"  # also the signature "serving_default", which TF Serving calls


def write_generator(net: keras.Model, nz: int, out: Path, metadata: dict[str, str]) -> dict[str, str]:
    """Write `net` (in inference mode) into `out`; returns {file name: what it holds}.

    The endpoint returns {"images": ...}, so the signature's output has the same name as the
    ONNX graph's instead of Keras' generic output_0."""
    archive = keras.export.ExportArchive()
    archive.track(net)
    archive.add_endpoint(
        ENDPOINT, lambda z: {"images": net(z, training=False)},
        input_signature=[tf.TensorSpec((None, nz), tf.float32, name="z")],
    )  # fmt: skip
    archive.write_out(str(out / SAVED_MODEL_DIR), verbose=False)
    return {
        SAVED_MODEL_DIR: f"TensorFlow SavedModel: endpoint {ENDPOINT} and signature serving_default take z and "
        "return {'images': ...}; " + ", ".join(f"{key}={value}" for key, value in sorted(metadata.items())),
    }
