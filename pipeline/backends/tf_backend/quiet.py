"""Import TensorFlow without its start-up banners on the user's terminal.

TF 2.21 prints oneDNN / CUDA-stub notices from C++ before absl logging is initialised, so
TF_CPP_MIN_LOG_LEVEL does not reach them; the file descriptor is silenced for the import only.
"""

from __future__ import annotations

import logging
import os
import sys


def import_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("absl").setLevel(logging.WARNING)  # per-step INFO notes from tf.data
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tf
