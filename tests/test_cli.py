"""The `dcgan` command end to end, each run in a fresh process as a user would start it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline import cli
from tests.conftest import ROOT, small_config
from tests.helpers import dcgan, write_config

pytestmark = pytest.mark.integration


def test_dry_run_of_the_shipped_config(tmp_path: Path, in_process):
    # configs/dryrun.yaml goes through Ray Train (a local Ray on 127.0.0.1), one worker; a
    # RAY_ADDRESS left in the environment (wherever a head was started) does not redirect it.
    result = dcgan("train", "--config", ROOT / "configs" / "dryrun.yaml", "--dry-run", cwd=tmp_path,
                   env={"RAY_ADDRESS": "127.0.0.1:9"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = result.stdout
    for fragment in ("dry run: OK", "on cpu, 1 rank(s)", "digits: 1,797 images 32x32x1", "step time", "images/s",
                     "peak memory", "tensors identical", "2,000 steps, ETA"):  # fmt: skip
        assert fragment in report, f"{fragment!r} missing from the report:\n{report}"
    assert "RayTrainWorker" in result.stderr, "the dry run must have run in a Ray Train worker"
    assert "RAY_ADDRESS=127.0.0.1:9 ignored" in result.stderr
    scratch = tmp_path / "runs" / "dryrun-dryrun"
    checkpoint = scratch / "checkpoints" / "step-00000012"
    assert json.loads((checkpoint / "manifest.json").read_text())["step"] == 12
    assert list((scratch / "tb").glob("events.out.tfevents.*"))
    assert Image.open(scratch / "samples" / "step-00000012.png").size[0] > 32
    assert not (tmp_path / "runs" / "dryrun").exists(), "a dry run must not touch the real run"

    again = in_process("train", "--config", ROOT / "configs" / "dryrun.yaml", "--dry-run", "--runner", "local")
    assert again.returncode == 0, again.stderr
    assert "RayTrainWorker" not in again.stderr and "dry run: OK" in again.stdout
    assert "prepared" not in again.stderr  # the shards of the first run are reused


LONG_NAME = "n" * 231


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--set", "train.steps=-5"], "train.steps: Input should be greater than 0 (got -5)"),
        (["--set", "data.image_size=40"], "data.image_size"),
        (["--set", "checkpoint.keep=1"], "checkpoint.keep"),
        (["--set", "model.widht=3"], "model.widht: unknown field"),
        # Hostile input: each used to end in a traceback.
        (["--set", "scaling.cpus_per_worker=.inf"], "scaling.cpus_per_worker: Input should be a finite number"),
        (["--set", "train.steps=.nan"], "train.steps: Input should be a finite number"),
        (["--set", "runtime.storage_path=ftp://host/runs"], "runtime.storage_path: storage URI scheme 'ftp'"),
        (["--set", "data.prepared_dir=webdav://x/y"], "data.prepared_dir: storage URI scheme 'webdav'"),
        (["--set", f"run.name={LONG_NAME}"], "run.name: String should have at most 230 characters"),
        (["--runner", "local", "--set", "data.source=synthetic", "--set", "eval.every=2",
          "--set", "eval.inception_weights=/no/such/inception.pth"], "eval.inception_weights='/no/such/inception.pth' is not a file"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_before_writing_anything(tmp_path: Path, monkeypatch, capsys, args, fragment):
    monkeypatch.chdir(tmp_path)  # in-process: the exit code is main()'s return value
    assert cli.main(["train", "--config", str(ROOT / "configs" / "dryrun.yaml"), *args]) == 2
    assert fragment in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "nothing may be written on bad input"


def test_a_key_given_twice_is_refused_naming_it(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "twice.yaml"
    config.write_text("run: {name: twice}\ntrain:\n  steps: 5\n  lr: 1.0e-4\n  steps: 50\n")
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "found duplicate key 'steps' (first at line 3)" in err and "line 5" in err
    assert list(tmp_path.iterdir()) == [config]


def test_the_horovod_strategy_without_horovod_installed_exits_2(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "horovod", None)  # as where `make horovod` never ran: import fails
    overrides = ["--set", "distributed.strategy=horovod", "--set", "scaling.num_workers=2"]
    assert cli.main(["train", "--config", str(ROOT / "configs" / "dryrun.yaml"), *overrides]) == 2
    assert "Horovod is not installed in this environment: `make horovod`" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_config_that_is_not_text_exits_2_before_writing_anything(tmp_path: Path, monkeypatch):
    not_text = tmp_path / "grid.png"
    not_text.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))  # e.g. a sample grid passed by mistake
    work = tmp_path / "work"
    work.mkdir()
    # A fresh process: what a user sees, traceback or not, on the terminal.
    result = dcgan("train", "--config", not_text, cwd=work)
    assert result.returncode == 2, result.stderr
    assert f"config file {not_text} is not UTF-8 text (byte 0x89 at offset 0)" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(work.iterdir()) == [], "nothing may be written on a config error"


class InProcess:
    """`dcgan ARGS` through pipeline.cli.main in this process, where a fresh process is not
    what a test proves: (exit code, stdout, stderr with the log lines)."""

    def __init__(self, capsys, caplog):
        self.capsys, self.caplog = capsys, caplog

    def __call__(self, *args) -> subprocess.CompletedProcess:
        self.caplog.clear()
        with self.caplog.at_level(logging.INFO):
            code = cli.main([str(a) for a in args])
        out, err = self.capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err + self.caplog.text)

    def train(self, tmp_path: Path, cfg, *extra: str) -> subprocess.CompletedProcess:
        return self("train", "--config", write_config(tmp_path / f"{cfg.run.name}.yaml", cfg), *extra)


@pytest.fixture
def in_process(tmp_path: Path, monkeypatch, capsys, caplog) -> InProcess:
    monkeypatch.chdir(tmp_path)
    return InProcess(capsys, caplog)


def test_sample_grid_and_separate_images(tmp_path: Path, in_process):
    cfg = small_config(tmp_path, train={"steps": 4})
    assert in_process.train(tmp_path, cfg).returncode == 0
    checkpoint = cfg.run_dir / "checkpoints" / "step-00000004"
    grid = tmp_path / "grid.png"
    result = in_process("sample", "--checkpoint", checkpoint, "--num", "9", "--out", grid)
    assert result.returncode == 0, result.stderr
    assert Image.open(grid).size == (3 * 34 + 2, 3 * 34 + 2)  # 3x3 grid of 32 px with 2 px padding
    again = tmp_path / "again.png"
    assert in_process("sample", "--checkpoint", checkpoint, "--num", "9", "--out", again).returncode == 0
    assert grid.read_bytes() == again.read_bytes()  # same seed, same images

    out_dir = tmp_path / "separate"
    result = in_process("sample", "--checkpoint", checkpoint, "--num", "5", "--out", out_dir, "--separate")
    assert result.returncode == 0, result.stderr
    files = sorted(out_dir.glob("*.png"))
    assert len(files) == 5 and all(Image.open(f).size == (32, 32) for f in files)

    missing = in_process("sample", "--checkpoint", tmp_path / "nowhere", "--out", grid)
    assert missing.returncode == 2 and "no manifest.json" in missing.stderr


def test_non_finite_loss_stops_the_run_and_writes_no_checkpoint(tmp_path: Path, in_process):
    cfg = small_config(tmp_path, train={"steps": 8, "lr": 1e30})
    result = in_process.train(tmp_path, cfg)
    assert result.returncode == 1
    assert "non-finite loss or gradient in steps 1..2" in result.stderr
    assert not list((cfg.run_dir / "checkpoints").glob("step-*"))


def test_resume_fresh_explicit_and_fallback(tmp_path: Path, in_process):
    cfg = small_config(tmp_path, train={"steps": 8})
    first = in_process.train(tmp_path, cfg)
    assert first.returncode == 0, first.stderr
    checkpoints = cfg.run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000004", "step-00000008"]

    # A corrupt newest checkpoint: warned about by name, the previous one is used.
    payload = checkpoints / "step-00000008" / "generator.pt"
    damaged = bytearray(payload.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    payload.write_bytes(bytes(damaged))
    cfg.train.steps = 10
    resumed = in_process.train(tmp_path, cfg)
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping checkpoint" in resumed.stderr and "step-00000008" in resumed.stderr
    assert f"resuming from {checkpoints / 'step-00000004'} (step 4," in resumed.stderr

    # --resume picks a checkpoint explicitly (keep=2 left steps 8 and 10 by now).
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000008", "step-00000010"]
    explicit = in_process.train(tmp_path, cfg, "--resume", str(checkpoints / "step-00000008"))
    assert explicit.returncode == 0 and "(step 8," in explicit.stderr

    # A different model is a clear error, not a crash inside load_state_dict.
    other = cfg.model_copy(deep=True)
    other.model.ngf = 16
    mismatch = in_process.train(tmp_path, other)
    assert mismatch.returncode == 2
    assert "model.ngf: checkpoint has 8, config asks for 16" in mismatch.stderr

    # --fresh starts over and keeps the previous run beside the new one.
    fresh = in_process.train(tmp_path, cfg, "--fresh")
    assert fresh.returncode == 0 and "resuming" not in fresh.stderr
    kept = list(cfg.run.dir.glob(f"{cfg.run.name}.replaced-*"))
    assert len(kept) == 1 and (kept[0] / "checkpoints" / "step-00000010" / "manifest.json").is_file()


def test_prepare_reports_skipped_files(tmp_path: Path, in_process):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        Image.new("RGB", (40, 30), (index * 60, 10, 10)).save(images / f"ok{index}.png")
    (images / "broken.jpg").write_text("not an image")
    cfg = small_config(tmp_path, data={"source": "folder", "root": str(images), "channels": 3})
    config_file = write_config(tmp_path / "folder.yaml", cfg)
    result = in_process("prepare", "--config", config_file)
    assert result.returncode == 0, result.stderr
    assert "prepared 3 images (32, 32, 3)" in result.stdout and "skipped broken.jpg" in result.stdout
    again = in_process("prepare", "--config", config_file)
    assert again.returncode == 2 and "--force" in again.stderr
    assert in_process("prepare", "--config", config_file, "--force").returncode == 0

    empty = small_config(tmp_path, data={"source": "folder", "root": str(tmp_path / "none"), "prepared_dir": str(tmp_path / "p2")})
    failed = in_process("prepare", "--config", write_config(tmp_path / "empty.yaml", empty))
    assert failed.returncode == 2 and "is not a directory" in failed.stderr
