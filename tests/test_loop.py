"""The framework-free loop over the real torch backend: cadence and the non-finite guard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.backends.base import NonFiniteError
from pipeline.loop import every
from pipeline.data import ensure_prepared
from pipeline.session import TrainingSession
from pipeline.stopping import Stop
from tests.conftest import small_config


def test_every():
    assert [s for s in range(1, 11) if every(s, 3)] == [3, 6, 9]
    assert not any(every(s, 0) for s in range(1, 5))


def test_run_ends_at_the_configured_step_with_checkpoints_at_cadence(tmp_path: Path):
    cfg = small_config(tmp_path, train={"steps": 6}, checkpoint={"every": 4, "keep": 3})
    ensure_prepared(cfg.data)  # the driver's part (pipeline.job.plan)
    with TrainingSession(cfg) as session:
        summary = session.run()
    assert (summary.start_step, summary.end_step) == (0, 6)
    assert [p.name for p in summary.checkpoints] == ["step-00000004", "step-00000006"]
    assert set(summary.last_metrics) >= {"loss/d", "loss/g", "d/real", "d/fake", "perf/images_per_sec"}
    assert "nonfinite" not in summary.last_metrics


def test_a_drain_notice_checkpoints_once_at_the_agreed_step_and_training_goes_on(tmp_path: Path):
    """Ray's reaction to a preemption notice: a checkpoint now, and no stop; the node's death
    is Ray's to recover (from that checkpoint) without a charge to max_failures."""
    cfg = small_config(tmp_path, train={"steps": 12}, checkpoint={"every": 8, "keep": 5, "stop_check_every": 2})
    ensure_prepared(cfg.data)
    notice_from_step = 5  # sticky, as Ray's is: the notice stays until the node goes
    seen = []

    def drained_from_step_5() -> Stop:
        seen.append(None)
        return Stop.DRAIN if len(seen) >= notice_from_step // 2 + 1 else Stop.NONE  # asked at steps 2, 4, 6...

    with TrainingSession(cfg, stop_requested=drained_from_step_5) as session:
        summary = session.run()
    assert summary.end_step == 12
    assert [p.name for p in summary.checkpoints] == ["step-00000006", "step-00000008", "step-00000012"]


def test_a_non_finite_step_is_skipped_on_the_device_and_stops_the_run(tmp_path: Path):
    cfg = small_config(tmp_path, train={"steps": 8}, logging={"every": 2})
    ensure_prepared(cfg.data)  # the driver's part (pipeline.job.plan)
    with TrainingSession(cfg) as session:
        backend = session.backend
        with torch.no_grad():
            backend.netG.main[0].weight[0, 0, 0, 0] = float("nan")  # G now emits NaN images
        d_before = {k: v.detach().clone() for k, v in backend.netD.named_parameters()}
        with pytest.raises(NonFiniteError, match=r"steps 1\.\.2: .* no checkpoint was written"):
            session.run()
        # D's loss was NaN in both steps: neither update was applied.
        for name, value in backend.netD.named_parameters():
            assert torch.equal(value, d_before[name]), f"{name} was updated by a non-finite step"
        assert all(int(s["step"]) == 0 for s in backend.optD.state.values())
    assert not list((cfg.run_dir / "checkpoints").glob("step-*"))


def test_a_finite_step_does_update(tmp_path: Path):
    cfg = small_config(tmp_path, train={"steps": 1})
    ensure_prepared(cfg.data)  # the driver's part (pipeline.job.plan)
    with TrainingSession(cfg) as session:
        before = session.backend.netD.main[0].weight.clone()
        session.run()
        assert not torch.equal(before, session.backend.netD.main[0].weight)
        assert all(int(s["step"]) == 1 for s in session.backend.optD.state.values())


def test_progress_is_a_live_bar_on_a_terminal_and_log_lines_otherwise(caplog):
    import io

    from rich.console import Console

    from pipeline.progress import BarProgress, LogProgress, Progress, make_progress

    terminal = io.StringIO()
    bar = make_progress(True, Console(file=terminal, force_terminal=True, width=120))
    assert isinstance(bar, BarProgress)
    bar.start(10, 0)
    bar.update(5, {"loss/d": 0.5, "loss/g": 2.0, "perf/images_per_sec": 123.0})
    bar.close()
    assert "5/10" in terminal.getvalue() and "loss_D 0.5000" in terminal.getvalue()

    plain = make_progress(True, Console(file=io.StringIO(), force_terminal=False))
    assert isinstance(plain, LogProgress)
    with caplog.at_level("INFO", logger="pipeline.train"):
        plain.start(10, 0)
        plain.update(5, {"loss/d": 0.5})
    assert "step 5/10  loss_D 0.5000" in caplog.text

    assert type(make_progress(False)) is Progress  # non-chief ranks print nothing


def test_only_the_chief_draws_the_fixed_noise_grid(tmp_path: Path):
    """The others hold a null writer: a grid drawn there would cost a G forward for nothing."""
    from pipeline.context import RankContext

    cfg = small_config(tmp_path, train={"steps": 8}, logging={"samples_every": 4})
    ensure_prepared(cfg.data)
    drawn = {}
    for ctx in (RankContext(0, 0, 2), RankContext(1, 1, 2)):  # the loop's view; one backend trains here
        with TrainingSession(cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": f"r{ctx.rank}"})})) as session:
            session.ctx = ctx
            calls = []
            sample = session.backend.sample
            session.backend.sample = lambda *args, **kwargs: calls.append(1) or sample(*args, **kwargs)
            session.run()
        drawn[ctx.rank] = len(calls)
    assert drawn == {0: 2, 1: 0}
