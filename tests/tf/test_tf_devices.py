"""TensorFlow's devices: runtime.device honoured, the devices reported, errors not swallowed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.backends import check_local_devices
from pipeline.backends.tf_backend import tf
from pipeline.backends.tf_backend.backend import TFBackend
from pipeline.backends.tf_backend.devices import use_devices
from pipeline.config import ConfigError
from pipeline.context import LOCAL
from tests.conftest import ROOT, small_config
from tests.helpers import dcgan

pytestmark = pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="checks a machine without a GPU")


def test_cuda_without_a_gpu_is_a_config_error_that_says_what_tensorflow_saw():
    with pytest.raises(ConfigError, match=r"runtime.device=cuda, but TensorFlow \(.*\) sees no GPU: ") as caught:
        use_devices("cuda")
    said = str(caught.value).split("sees no GPU: ", 1)[1]
    assert "cuda" in said.lower() and "] " not in said, said  # TF's own words, without absl's prefix


def test_the_local_runner_refuses_cuda_on_a_machine_without_one_before_writing(tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    result = dcgan("train", "--config", ROOT / "configs" / "dryrun-tf.yaml", "--runner", "local",
                   "--set", "runtime.device=cuda", cwd=work)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "runtime.device=cuda, but TensorFlow" in result.stderr and "Traceback" not in result.stderr
    assert list(work.iterdir()) == [], "nothing may be written when the device is refused"


def test_a_batch_that_does_not_split_over_this_machines_devices_is_refused_up_front(tmp_path: Path):
    # conftest gives this process two logical CPU devices: the local runner mirrors over both.
    cfg = small_config(tmp_path, backend="tensorflow", train={"global_batch_size": 15})
    with pytest.raises(ConfigError, match="global_batch_size=15 is not divisible by the 2 devices"):
        check_local_devices(cfg)
    check_local_devices(small_config(tmp_path, backend="tensorflow", train={"global_batch_size": 16}))


def test_the_backend_reports_its_strategy_and_devices_and_turns_on_op_determinism(tmp_path: Path):
    from tensorflow.python.framework import config as tf_config  # no public getter exists

    backend = TFBackend(small_config(tmp_path, backend="tensorflow"), LOCAL)
    info = backend.describe()
    assert info["device"] == "cpu, MirroredStrategy, 2 replica(s)"
    assert [d.rsplit("/", 1)[-1] for d in info["devices"]] == ["device:CPU:0", "device:CPU:1"]
    assert tf_config.is_op_determinism_enabled()


def test_what_native_code_printed_reaches_stderr_when_the_quiet_block_fails():
    script = textwrap.dedent("""
        import os
        from pipeline.backends.tf_backend.quiet import native_stderr_captured
        with native_stderr_captured() as native:
            os.write(2, b"banner\\n")
        assert native.text == "banner\\n" and native.lines("BAN") == ["banner"]
        with native_stderr_captured():
            os.write(2, b"libcudnn.so.9: cannot open shared object file\\n")
            raise ImportError("DLL load failed")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "banner" not in done.stderr, "a quiet block that succeeds stays quiet"
    assert "libcudnn.so.9: cannot open shared object file" in done.stderr and "ImportError: DLL load failed" in done.stderr
