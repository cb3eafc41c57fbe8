"""The combination matrix, TensorFlow rows (tests/combinations.py says how it is built): local
rows train in a process of their own (one CPU device, as the local runner here), ray rows as two
MultiWorkerMirroredStrategy workers; each then samples, exports, evaluates, and converts to
torch and back."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import combinations

# The launch of every row is one fixture: up to 10 minutes while the other lane of
# `make test` shares the cores (measured: 581 s for the TensorFlow rows on 2 cores).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]

FRAMEWORK = "tensorflow"
ROWS = combinations.rows_of(FRAMEWORK)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    with combinations.launched(FRAMEWORK, tmp_path_factory.mktemp("matrix")) as launched:
        yield launched


@pytest.mark.parametrize("name", [combinations.row_id(row) for row in ROWS], ids=str)
def test_row(matrix, name: str, tmp_path: Path):
    combinations.check_launched_row(matrix, name, tmp_path)


def test_every_row_converts_to_torch_and_back(matrix):
    combinations.check_conversions(matrix, FRAMEWORK)
