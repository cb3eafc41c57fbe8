"""TensorFlow without its start-up banners on the user's terminal.

TF 2.21 prints oneDNN / CUDA notices from C++, some before absl logging is initialised, so
TF_CPP_MIN_LOG_LEVEL does not reach them: stderr's file descriptor is silenced while TF is
imported and while it discovers devices.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("absl").setLevel(logging.WARNING)  # per-step INFO notes from tf.data
    if "tensorflow" not in sys.modules:
        with native_stderr_silenced():
            import tensorflow  # noqa: F401
    return sys.modules["tensorflow"]
