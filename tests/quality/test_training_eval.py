"""Evaluation during training (local runner): eval/* scalars, the BEST checkpoint kept by
retention, and `dcgan evaluate` reproducing the run's numbers from the checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline import cli
from pipeline import tensorboard as tb
from tests.conftest import small_config
from tests.helpers import dcgan, read_scalars, read_texts, write_config

pytestmark = pytest.mark.integration

EVAL_EVERY, STEPS = 10, 40


# A run that degrades late: it resumes at step 20 with a learning rate far too high.
DEGRADE = ["--set", f"train.steps={STEPS}", "--set", "train.lr=0.5"]


def eval_config(tmp_path: Path, **sections):
    """Digits (the classifier judges them) with a small, fast net, 20 steps; evaluated every
    10 steps, only the newest 2 checkpoints kept by retention."""
    return small_config(
        tmp_path,
        data={"source": "digits", "prepared_dir": str(tmp_path / "digits")},
        model={"nz": 32, "ngf": 16, "ndf": 16, "g_ema_decay": 0.5},
        # NCHW: the trajectory whose late degradation these tests were calibrated on (channels-last
        # kernels round differently, and a GAN amplifies that into another run).
        train={"steps": 20, "global_batch_size": 32, "lr": 2e-2, "channels_last": False},
        checkpoint={"every": 1000, "keep": 2},
        logging={"every": 10, "samples_every": 1000},
        eval={"every": EVAL_EVERY, "num_samples": 200, "score_raw_generator": True},
        **sections,
    )


def checkpoint_scores(checkpoints: Path) -> dict[int, float]:
    scores = {}
    for manifest in checkpoints.glob("step-*/manifest.json"):
        content = json.loads(manifest.read_text())
        scores[content["step"]] = content["scores"][tb.TAG_EVAL_FID]
    return scores


def expected_best(fid: dict[int, float], std: dict[int, float], margin: float = 1.0) -> int:
    """BEST's rule (eval.best_margin): the first score, then each that beats BEST's by more
    than `margin` standard deviations of the difference."""
    best = min(fid)
    for step in sorted(fid)[1:]:
        if fid[step] < fid[best] - margin * math.hypot(std[step], std[best]):
            best = step
    return best


def check_best_survived(checkpoints: Path, logged_fid: dict[int, float], logged_std: dict[int, float]) -> str:
    """BEST names the checkpoint BEST's rule picks from the logged scores, from before the
    degradation; retention (keep 2) kept it beside the newest two. Returns its directory name."""
    best_step = expected_best(logged_fid, logged_std)
    assert best_step <= 20 and logged_fid[STEPS] > logged_fid[best_step], logged_fid  # the run degraded
    best = (checkpoints / "BEST").read_text().strip()
    assert best == f"step-{best_step:08d}", (best, logged_fid)
    assert (checkpoints / best / "manifest.json").is_file()
    kept = sorted(p.name for p in checkpoints.glob("step-*"))
    assert kept == sorted({best, f"step-{STEPS - EVAL_EVERY:08d}", f"step-{STEPS:08d}"}), kept
    return best


def test_training_logs_eval_scores_keeps_the_best_and_evaluate_reproduces_them(tmp_path: Path, capsys):
    cfg = eval_config(tmp_path)
    config_file = write_config(tmp_path / "eval.yaml", cfg)
    for args in ([], DEGRADE):
        done = dcgan("train", "--config", config_file, *args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr

    scalars = read_scalars(cfg.run_dir / "tb" / tb.EVAL_RUN)
    steps = list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    for tag in (*tb.EVAL_TAGS, tb.TAG_EVAL_FID_WITHOUT_EMA):
        assert sorted(scalars[tag]) == steps, tag
        assert all(math.isfinite(v) for v in scalars[tag].values()), tag
    assert all(0 <= v <= 1 for v in scalars[tb.TAG_EVAL_COVERAGE].values())
    cards = {step: json.loads(text) for step, text in read_texts(cfg.run_dir / "tb" / tb.EVAL_RUN)[tb.TAG_EVAL_CARD].items()}
    assert sorted(cards) == steps and len({card["key"] for card in cards.values()}) == 1  # one card all along
    card = cards[STEPS]
    assert card["extractor"] == "digits" and card["generator"] == "ema" and card["num_generated"] == 200
    assert card["reference"]["num_real"] == 1797 and card["reference"]["split"] == "all" and card["quantisation"] == "uint8"

    checkpoints = cfg.run_dir / "checkpoints"
    fid = scalars[tb.TAG_EVAL_FID]
    best = check_best_survived(checkpoints, fid, scalars[tb.TAG_EVAL_FID_STD])
    # The manifests record what was logged: float32 event values against the exact scores.
    for step, score in checkpoint_scores(checkpoints).items():
        assert score == pytest.approx(fid[step], rel=1e-6)

    # The command scores checkpoints, several in one go, as training scored them.
    newest = f"step-{STEPS:08d}"
    done = dcgan("evaluate", "--checkpoint", checkpoints / best, "--checkpoint", checkpoints / newest, "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [r["step"] for r in results] == [int(best[5:]), STEPS]
    for name, result in zip((best, newest), results):
        assert result["framework"] == "torch" and result["generator"] == "ema"
        manifest = json.loads((checkpoints / name / "manifest.json").read_text())
        assert result["card"] == manifest["card"] and manifest["card_key"] == manifest["card"]["key"]
        recorded = json.loads((checkpoints / name / "manifest.json").read_text())["scores"]
        for tag, value in recorded.items():
            assert result["metrics"][tag] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, tag)

    assert cli.main(["evaluate", "--checkpoint", str(checkpoints / best)]) == 0
    assert "eval/coverage" in capsys.readouterr().out  # the table

    # Noise over sample sets, precision / recall and MiFID, and the nearest training images.
    grid = tmp_path / "nearest.png"
    args = ["evaluate", "--checkpoint", str(checkpoints / best), "--repeats", "3", "--nearest", "4", "--out", str(grid), "--json"]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    spread = result["repeats"][tb.TAG_EVAL_FID]
    assert len(spread["values"]) == 3 and spread["values"][0] == result["metrics"][tb.TAG_EVAL_FID] and spread["std"] > 0
    scores = result["metrics"]
    assert 0 <= scores[tb.TAG_EVAL_PRECISION] <= 1 and 0 <= scores[tb.TAG_EVAL_RECALL] <= 1
    assert scores[tb.TAG_EVAL_MIFID] >= scores[tb.TAG_EVAL_FID] * (1 - 1e-9)  # divided by a penalty of at most 1
    from PIL import Image

    assert Image.open(grid).size == (5 * 34 + 2, 4 * 34 + 2)  # 4 rows: a sample and its 4 nearest, 32 px + padding


def test_evaluate_refuses_a_missing_checkpoint_by_name(tmp_path: Path):
    done = dcgan("evaluate", "--checkpoint", tmp_path / "nowhere", cwd=tmp_path)
    assert done.returncode == 2 and "nowhere" in done.stderr
