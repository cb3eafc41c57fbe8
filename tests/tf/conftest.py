"""TensorFlow tests run in their own pytest process (`make test` runs `pytest tests/tf` beside
the rest's): torch and TensorFlow must never share a process (docs/ARCHITECTURE.md, traps). Nothing here imports
torch; the torch side of a comparison runs in a subprocess."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("KERAS_HOME", os.path.join(os.environ.get("TMPDIR", "/tmp"), "dcgan-keras-home"))

from pipeline.backends.tf_backend import tf  # noqa: E402

# Two logical CPU devices, so MirroredStrategy has two replicas; this must precede any TF op.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)
