"""The combination matrix, torch rows (tests/combinations.py says how it is built): every row
trains, checkpoints, resumes, dry-runs (a checkpoint round trip), samples, exports, evaluates
and converts to TensorFlow and back; every invalid combination is refused naming its fields."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import cli
from tests import combinations

# The launch of every row is one fixture: up to 10 minutes while the other lane of
# `make test` shares the cores (measured: 581 s for the TensorFlow rows on 2 cores).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]

FRAMEWORK = "torch"
ROWS = combinations.rows_of(FRAMEWORK)


def test_the_matrix_is_the_schema():
    """A new Literal or bool option is an axis unless excluded with a reason; exclusions name real fields."""
    enumerable = combinations.enumerable_fields()
    assert set(combinations.EXCLUDED) <= set(enumerable), set(combinations.EXCLUDED) - set(enumerable)
    assert set(combinations.axes()) == (set(enumerable) - set(combinations.EXCLUDED)) | set(combinations.SAMPLED)
    valid, invalid = combinations.split()
    assert len(valid) + len(invalid) == len(list(combinations.product()))
    # Pairwise: every two values that train together anywhere train together in some row.
    covered = set().union(*(combinations._pairs(row) for row in combinations.pairwise_rows()))
    assert covered == set().union(*(combinations._pairs(row) for row in valid))


def test_every_invalid_combination_is_refused_naming_its_fields():
    _, invalid = combinations.split()
    assert invalid
    fields = [*combinations.axes(), "scaling.num_workers"]
    for row, message in invalid:
        reason = message.splitlines()[1]
        named = [field for field in fields if f"{field}=" in reason]
        assert len(named) >= 2, (combinations.row_id(row), reason)


def test_an_invalid_combination_exits_2_and_writes_nothing(tmp_path: Path, monkeypatch, capsys):
    """One combination of each kind of refusal through `dcgan train`."""
    monkeypatch.chdir(tmp_path)
    seen = set()
    for row, message in combinations.split()[1]:
        reason = message.splitlines()[1].strip()
        field = reason.split("=")[0]
        if field in seen:
            continue
        seen.add(field)
        raw = combinations.row_raw(row)
        raw["run"] = {"name": "bad", "dir": str(tmp_path / "runs")}
        raw.get("runtime", {}).pop("storage_path", None)
        config_file = tmp_path / "c.yaml"
        config_file.write_text(yaml.safe_dump(raw))
        assert cli.main(["train", "--config", str(config_file)]) == 2
        assert reason in capsys.readouterr().err
    assert len(seen) == 3, seen  # horovod with tensorflow, horovodrun without horovod, TF float16 on Ray workers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    with combinations.launched(FRAMEWORK, tmp_path_factory.mktemp("matrix")) as launched:
        yield launched


@pytest.mark.parametrize("name", [combinations.row_id(row) for row in ROWS], ids=str)
def test_row(matrix, name: str, tmp_path: Path):
    combinations.check_launched_row(matrix, name, tmp_path)


def test_every_row_converts_to_tensorflow_and_back(matrix):
    combinations.check_conversions(matrix, FRAMEWORK)
