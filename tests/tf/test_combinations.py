"""The combination matrix, TensorFlow rows (tests/combinations.py says how it is built): local
rows train here under MirroredStrategy over this process's two logical CPUs, ray rows as two
MultiWorkerMirroredStrategy workers; each then samples, exports, evaluates, and converts to
torch and back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.backends.base import holds_average
from tests import combinations
from tests.helpers import s3_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FRAMEWORK = "tensorflow"
ROWS = [row for row in combinations.pairwise_rows() if row["backend"] == FRAMEWORK]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    work = tmp_path_factory.mktemp("matrix")
    with s3_server() as s3_base:
        planned, failures = combinations.launch_all(ROWS, work, s3_base)
        yield work, planned, failures


@pytest.mark.parametrize("name", [combinations.row_id(row) for row in ROWS], ids=str)
def test_row(matrix, name: str, tmp_path: Path):
    _, planned, failures = matrix
    row, raw, scratch = planned[name]
    kind = combinations.launch_kind(row)
    assert kind not in failures, f"the {kind} launch failed: {failures.get(kind)}"
    combinations.check_row(row, raw, scratch, tmp_path)


def test_every_row_converts_to_torch_and_back(matrix):
    work, planned, failures = matrix
    assert not failures, failures
    convert_dir = work / "convert"
    convert_dir.mkdir()
    differing = combinations.convert_there_and_back(combinations.last_checkpoints(planned), FRAMEWORK, convert_dir)
    assert not any(differing.values()), {k: v[:5] for k, v in differing.items() if v}
    for name, (row, _, _) in planned.items():
        assert holds_average(np.load(convert_dir / f"{name}.npz")) == bool(row["model.g_ema_decay"]), name
