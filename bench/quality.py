"""The quality target: each backend's digits config, trained for at most 10 minutes on this
machine, must cover all 10 digit classes with a digits-FID at most 5x the FID between two
disjoint halves of the real digits.

For each config the run is `dcgan train` as a user starts it, stopped (SIGTERM: it checkpoints
and exits) if it is still going at the budget. Its curves come back from its own TensorBoard
events: eval/fid (of the EMA generator), eval/fid_without_ema (of G itself), eval/coverage and
eval/kid, each with the seconds since the command started (TensorBoard's eval run, <run>/tb/eval). The reference FID is computed here,
with the same extractor and the same features of the real set.

The pictures go to bench/results/ (the README shows them): quality-fid.png, the FID-by-step
curves of both frameworks, of G's average and of G itself, and quality-samples-<backend>.png,
64 samples of each run's BEST checkpoint.

    .venv/bin/python bench/quality.py [--backends torch tensorflow] [--budget-s 600]
                                      [--out runs/bench/quality.json] [--pictures bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# TensorBoard's reader imports TensorFlow when it is installed; this process runs torch.
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))

FID_FACTOR = 5.0  # target: FID <= 5x the FID of the two real halves
CURVE_TAGS = ("eval/fid", "eval/fid_without_ema", "eval/coverage", "eval/kid", "eval/class_kl")


def reference_fid(cfg) -> dict[str, Any]:
    """FID between the even and odd halves of the real digits (disjoint, about 900 each)."""
    import numpy as np

    from pipeline.data import ensure_prepared, local_prepared_dir
    from pipeline.data.shards import ShardedImages
    from pipeline.quality import metrics
    from pipeline.quality.evaluator import Evaluator

    ensure_prepared(cfg.data)
    evaluator = Evaluator(cfg, local_prepared_dir(cfg.data))
    images = ShardedImages(local_prepared_dir(cfg.data))
    real = images.gather(np.arange(len(images)))
    even, _ = evaluator.extractor.embed(real[0::2])
    odd, _ = evaluator.extractor.embed(real[1::2])
    return {"fid_two_real_halves": metrics.frechet_distance(even, odd), "half_size": len(odd),
            "extractor": evaluator.extractor.name}  # fmt: skip


def train(config_path: Path, runs: Path, budget_s: float) -> dict[str, Any]:
    """`dcgan train`, SIGTERMed at the budget; returns the wall time and how it ended."""
    command = [sys.executable, "-m", "pipeline", "train", "--config", str(config_path), "--fresh",
               "--set", f"run.dir={runs}", "--set", "eval.score_raw_generator=true"]  # fmt: skip
    log = (runs / f"{config_path.stem}.log").open("w")
    started = time.time()
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        code = process.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # it checkpoints at the next step boundary and exits 143
        code = process.wait()
    return {"started": started, "seconds": round(time.time() - started, 1), "exit_code": code}


def curves(tb_dir: Path, started: float) -> list[dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    points: dict[int, dict[str, float]] = {}
    for tag in CURVE_TAGS:
        if tag not in accumulator.Tags()["scalars"]:
            continue
        for event in accumulator.Scalars(tag):
            point = points.setdefault(event.step, {"step": event.step, "seconds": round(event.wall_time - started, 1)})
            point[tag] = round(event.value, 4)
    return [points[step] for step in sorted(points)]


def judge(curve: list[dict[str, float]], fid_limit: float, budget_s: float) -> dict[str, Any]:
    """The first evaluation within the budget that meets both targets, and the best one."""
    within = [p for p in curve if p["seconds"] <= budget_s]
    met = [p for p in within if p["eval/coverage"] == 1.0 and p["eval/fid"] <= fid_limit]
    best = min(within, key=lambda p: p["eval/fid"]) if within else None
    return {"target_met": bool(met), "first_met": met[0] if met else None, "best": best,
            "last": within[-1] if within else None}  # fmt: skip


COLOURS = {("torch", "eval/fid"): "navy", ("torch", "eval/fid_without_ema"): "cornflowerblue",
           ("tensorflow", "eval/fid"): "darkred", ("tensorflow", "eval/fid_without_ema"): "salmon"}  # fmt: skip


def plot_fid(runs: dict[str, Any], fid_limit: float, out: Path) -> None:
    """FID (log scale) by step for each backend: G's average solid, G itself light; the target
    as a grey line. PIL only."""
    import math

    from PIL import Image, ImageDraw

    width, height, pad = 1000, 560, 60
    lines = {(backend, tag): [(p["step"], p[tag]) for p in run["curve"] if tag in p and p[tag] > 0]
             for backend, run in runs.items() for tag in ("eval/fid", "eval/fid_without_ema")}  # fmt: skip
    points = [point for line in lines.values() for point in line]
    if not points:
        return
    top_step = max(step for step, _ in points)
    low, high = math.log10(min(min(v for _, v in points), fid_limit) / 1.2), math.log10(max(v for _, v in points) * 1.2)
    x = lambda step: pad + step / top_step * (width - 2 * pad)  # noqa: E731
    y = lambda value: height - pad - (math.log10(value) - low) / (high - low) * (height - 2 * pad)  # noqa: E731
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([pad, pad, width - pad, height - pad], outline="black")
    for decade in range(math.floor(low), math.ceil(high) + 1):
        for mark in (10**decade, 2 * 10**decade, 5 * 10**decade):
            if low <= math.log10(mark) <= high:
                draw.line([(pad, y(mark)), (width - pad, y(mark))], fill="lightgray")
                draw.text((8, y(mark) - 6), f"{mark:g}", fill="black")
    draw.line([(pad, y(fid_limit)), (width - pad, y(fid_limit))], fill="gray", width=2)
    for (backend, tag), line in lines.items():
        if len(line) > 1:
            draw.line([(x(s), y(v)) for s, v in line], fill=COLOURS[(backend, tag)], width=3 if tag == "eval/fid" else 2)
    draw.text((pad, height - pad + 10), f"step (0..{top_step})", fill="black")
    legend = "; ".join(f"{backend} {'average' if tag == 'eval/fid' else 'G'}: {COLOURS[(backend, tag)]}" for backend, tag in lines)
    draw.text((pad, 15), f"digits-FID by step (log scale), grey: target {fid_limit:.1f}", fill="black")
    draw.text((pad, 32), legend, fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)


def sample_best(run_dir: Path, out: Path) -> str:
    """64 samples of the run's BEST checkpoint (of either framework), through `dcgan sample`."""
    best = (run_dir / "checkpoints" / "BEST").read_text().strip()
    subprocess.run([sys.executable, "-m", "pipeline", "sample", "--checkpoint", str(run_dir / "checkpoints" / best),
                    "--num", "64", "--out", str(out)], cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "tensorflow"], choices=["torch", "tensorflow"])
    parser.add_argument("--budget-s", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/quality.json"))
    parser.add_argument("--pictures", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    from pipeline import config

    runs = (ROOT / "runs" / "bench-quality").resolve()
    runs.mkdir(parents=True, exist_ok=True)
    names = {"torch": "digits-torch", "tensorflow": "digits-tf"}
    reference = reference_fid(config.load(ROOT / "configs" / "digits-torch.yaml"))
    fid_limit = FID_FACTOR * reference["fid_two_real_halves"]
    print(f"reference: FID of two real halves ({reference['half_size']} images each) "
          f"{reference['fid_two_real_halves']:.3f}; target FID <= {fid_limit:.3f} with all 10 classes covered")  # fmt: skip
    result: dict[str, Any] = {"reference": reference, "fid_limit": fid_limit, "budget_s": args.budget_s, "runs": {}}
    for backend in args.backends:
        config_path = ROOT / "configs" / f"{names[backend]}.yaml"
        cfg = config.load(config_path)
        ran = train(config_path, runs, args.budget_s)
        curve = curves(runs / cfg.run.name / "tb" / "eval", ran.pop("started"))
        verdict = judge(curve, fid_limit, args.budget_s)
        best = sample_best(runs / cfg.run.name, args.pictures / f"quality-samples-{backend}.png")
        result["runs"][backend] = {"config": str(config_path.relative_to(ROOT)), **ran, **verdict, "best_checkpoint": best,
                                   "curve": curve}  # fmt: skip
        print(f"\n{backend} ({config_path.name}): {ran['seconds']} s, exit {ran['exit_code']}")
        print(f"{'step':>6} {'s':>6} {'fid':>9} {'fid(G)':>9} {'coverage':>8} {'kid':>9}")
        for p in curve:
            print(f"{p['step']:>6} {p['seconds']:>6} {p.get('eval/fid', float('nan')):>9.3f} "
                  f"{p.get('eval/fid_without_ema', float('nan')):>9.3f} {p.get('eval/coverage', float('nan')):>8.2f} "
                  f"{p.get('eval/kid', float('nan')):>9.2f}")  # fmt: skip
        met = verdict["first_met"]
        print(f"target met: {verdict['target_met']}" + (f" at step {met['step']} after {met['seconds']} s" if met else ""))
    plot_fid(result["runs"], fid_limit, args.pictures / "quality-fid.png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} and the pictures in {args.pictures}")


if __name__ == "__main__":
    main()
