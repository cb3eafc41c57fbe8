"""One framework per process: a torch run never loads TensorFlow, a TensorFlow run never torch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, small_config
from tests.helpers import write_config

pytestmark = pytest.mark.integration

SCRIPT = """
import sys
from pipeline.cli import main
code = main(["train", "--config", sys.argv[1], "--dry-run", "--dry-run-steps", "2", "--runner", "local"])
loaded = sorted(name for name in ("torch", "tensorflow") if sys.modules.get(name) is not None)
print("loaded:", ",".join(loaded))
sys.exit(code)
"""


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_a_run_loads_only_its_own_framework(tmp_path: Path, backend: str):
    if importlib.util.find_spec(backend) is None:  # find, never import: this process runs torch
        pytest.skip(f"{backend} is not installed")
    config_file = write_config(tmp_path / "c.yaml", small_config(tmp_path, backend=backend))
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(config_file)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"loaded: {backend}\n" in done.stdout
    assert "cuda_platform" not in done.stderr and "oneDNN" not in done.stderr  # no start-up banners
