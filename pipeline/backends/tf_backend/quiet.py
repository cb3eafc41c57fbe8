"""TensorFlow without its start-up banners on the user's terminal, and with its errors.

TF 2.21 prints oneDNN / CUDA notices from C++, some before absl logging is initialised, so
TF_CPP_MIN_LOG_LEVEL does not reach them: stderr's file descriptor is captured while TF is
imported and while it discovers devices. What was captured is kept: when the block fails it
is written back to stderr, and `NativeStderr.text` lets a caller quote it (why no GPU was found).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator


_ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\] ")


class NativeStderr:
    """What native code wrote to file descriptor 2 inside `native_stderr_captured`."""

    def __init__(self) -> None:
        self.text = ""

    def lines(self, *keywords: str) -> list[str]:
        """The distinct captured lines that mention any of `keywords` (case-insensitive), without
        the absl prefix ("I0000 00:00:1795776769.648437   28205 cudart_stub.cc:31] ")."""
        wanted = [k.lower() for k in keywords]
        found = (_ABSL_PREFIX.sub("", line).strip() for line in self.text.splitlines())
        return list(dict.fromkeys(line for line in found if any(k in line.lower() for k in wanted)))


@contextmanager
def native_stderr_captured() -> Iterator[NativeStderr]:
    captured = NativeStderr()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        except BaseException:
            _restore(saved, sink, captured)
            sys.stderr.write(captured.text)  # the native side of the failure
            raise
        else:
            _restore(saved, sink, captured)


def _restore(saved: int, sink, captured: NativeStderr) -> None:
    os.dup2(saved, 2)
    os.close(saved)
    sink.seek(0)
    captured.text = sink.read().decode("utf-8", "replace")


# What TensorFlow printed while it was imported (its CUDA libraries are looked for then).
import_output = NativeStderr()


def import_tensorflow():
    global import_output
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("absl").setLevel(logging.WARNING)  # per-step INFO notes from tf.data
    if "tensorflow" not in sys.modules:
        with native_stderr_captured() as import_output:
            import tensorflow  # noqa: F401
    return sys.modules["tensorflow"]
