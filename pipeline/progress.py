"""Progress on the chief: a live rich bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Mapping, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichBar

log = logging.getLogger("pipeline.train")

_SHOWN = (("loss/d", "loss_D"), ("loss/g", "loss_G"), ("d/real", "D(x)"), ("d/fake", "D(G(z))"))


def format_metrics(metrics: Mapping[str, float]) -> str:
    parts = [f"{label} {metrics[tag]:.4f}" for tag, label in _SHOWN if tag in metrics]
    if "perf/images_per_sec" in metrics:
        parts.append(f"{metrics['perf/images_per_sec']:.0f} img/s")
    return "  ".join(parts)


class Progress:
    """The null progress, held by non-chief ranks."""

    def start(self, total: int, done: int) -> None:
        pass

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class LogProgress(Progress):
    """One log line per log window, with an ETA from the steps run so far in this process."""

    def start(self, total: int, done: int) -> None:
        self.total, self.first, self.started = total, done, time.perf_counter()

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        elapsed = time.perf_counter() - self.started
        rate = (step - self.first) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        log.info("step %d/%d  %s  eta %s", step, self.total, format_metrics(metrics), format_seconds(eta))


class BarProgress(Progress):
    def __init__(self, console: Console):
        self.bar = RichBar(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=console,
            transient=False,
        )
        self.task: Optional[int] = None

    def start(self, total: int, done: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=done, metrics="")

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        self.bar.update(self.task, completed=step, metrics=format_metrics(metrics))

    def close(self) -> None:
        self.bar.stop()


def make_progress(is_chief: bool, console: Optional[Console] = None) -> Progress:
    if not is_chief:
        return Progress()
    console = console or Console(file=sys.stderr)
    return BarProgress(console) if console.is_terminal else LogProgress()


def format_seconds(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN or unknown
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
