"""FID by the literature's protocol (not CI): the standard InceptionV3, N generated images of
G's average against the whole training set, TensorFlow 1's resize, uint8 quantisation, with
the provenance card and the noise (bootstrap std; mean ± std over sample sets).

The published DCGAN anchors are on CIFAR-10 (FID 48.3 in StudioGAN v0.4, 42.7 in
pytorch-gan-collections, both 50k generated against the 50k training images). With CIFAR-10's
python batches on disk (--cifar10-root) this trains configs/cifar10-32.yaml; without them the
embedded digits (configs/digits-torch.yaml, all 1,797 images as the reference set), whose
numbers have no published anchor: the protocol, not the number, is what carries over. N is
what the machine affords: 10k and 50k on a GPU; on this 2-core CPU the largest set that fits
in about 20 minutes (InceptionV3 takes 135 s per 1,000 images here: bench/evaluation.py).

    .venv/bin/python bench/fid_protocol.py [--cifar10-root DIR] [--samples 5000] [--repeats 1]
                                           [--steps 4000] [--out runs/bench/fid_protocol.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar10-root", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="default: the config's train.steps")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/fid_protocol.json"))
    args = parser.parse_args()

    runs = (ROOT / "runs" / "bench-fid-protocol").resolve()
    if args.cifar10_root is not None:
        config, overrides = "configs/cifar10-32.yaml", [f"data.root={args.cifar10_root.resolve()}"]
    else:
        config, overrides = "configs/digits-torch.yaml", []
    overrides += [f"run.dir={runs}", "eval.every=0"] + ([f"train.steps={args.steps}"] if args.steps else [])
    sets = [part for override in overrides for part in ("--set", override)]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", config, "--fresh", *sets], cwd=ROOT, check=True)
    train_s = time.perf_counter() - started

    sys.path.insert(0, str(ROOT))
    from pipeline import config as configuration
    from pipeline.checkpoint import CheckpointManager

    cfg = configuration.load(ROOT / config, overrides)
    checkpoint = CheckpointManager(cfg.run_dir / "checkpoints", None).latest()
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "evaluate", "--checkpoint", str(checkpoint.path), "--extractor", "inception",
         "--num-samples", str(args.samples), "--repeats", str(args.repeats), "--device", args.device, "--json"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    evaluate_s = time.perf_counter() - started
    result = {"config": config, "train_s": round(train_s, 1), "evaluate_s": round(evaluate_s, 1), **json.loads(done.stdout)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    metrics, card = result["metrics"], result["card"]
    print(f"{config}, step {result['step']}: FID {metrics['eval/fid']:.2f} ± {metrics['eval/fid_std']:.2f} (bootstrap), "
          f"KID {metrics['eval/kid']:.4f} ± {metrics['eval/kid_std']:.4f}, precision {metrics['eval/precision']:.3f}, "
          f"recall {metrics['eval/recall']:.3f}; {card['num_generated']} generated ({card['generator']}) against "
          f"{card['reference']['num_real']} real ({card['reference']['split']}); evaluation {evaluate_s:.0f} s")  # fmt: skip
    print(f"card: {json.dumps(card)}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
