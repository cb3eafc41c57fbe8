"""The checkpoint protocol: atomic saves, crash leftovers, corrupt fallback, retention, ENOSPC.

Everything runs against the real CheckpointManager on a real filesystem. Faults are injected
only below the project (a payload writer that fails, os.* calls that fail or kill the process,
a genuinely full tmpfs), never by replacing the project's own code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from pipeline import config
from pipeline.checkpoint import (
    BEST,
    FORMAT,
    LATEST,
    MANIFEST,
    CheckpointError,
    CheckpointInfo,
    CheckpointManager,
    step_dir_name,
    verify,
)
from pipeline.job import StartOptions, select_start
from tests.conftest import ROOT, small_config

# --------------------------------------------------------------------------------------------
# helpers


def payload(files: dict[str, bytes]) -> Callable[[Path], None]:
    """A write_files callback that writes `files` (names may contain '/')."""

    def write_files(directory: Path) -> None:
        for name, data in files.items():
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    return write_files


def files_for(step: int) -> dict[str, bytes]:
    """A small, step-specific payload, so checkpoints of different steps differ in content."""
    return {
        "generator.pt": bytes([step % 256]) * 3000 + b"G",
        "discriminator.pt": bytes([(step * 7) % 256]) * 2000 + b"D",
        "trainer.json": json.dumps({"step": step}).encode(),
    }


def tree_digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path: byte-identity of a tree."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def step_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and p.name.startswith("step-"))


def staging_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("step-*.tmp"))


def latest_name(directory: Path) -> str:
    return (directory / LATEST).read_text().strip()


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    index = len(data) // 2 if offset is None else offset
    data[index] ^= 0xFF
    path.write_bytes(bytes(data))


def metadata(cfg: config.Config) -> dict:
    return {"framework": "torch", "world_size": 1, "config": cfg.to_dict()}


@pytest.fixture
def ckdir(tmp_path: Path) -> Path:
    return tmp_path / "run" / "checkpoints"


@pytest.fixture
def two_saved(ckdir: Path, tiny_cfg: config.Config) -> CheckpointManager:
    """Checkpoints at steps 4 and 8 (keep=3, so nothing is pruned by the tests' next save)."""
    manager = CheckpointManager(ckdir, keep=3)
    for step in (4, 8):
        manager.save(step, payload(files_for(step)), metadata(tiny_cfg))
    return manager


# --------------------------------------------------------------------------------------------
# a successful save


def test_save_writes_complete_step_dir_with_manifest_and_latest(ckdir: Path, tiny_cfg: config.Config):
    manager = CheckpointManager(ckdir, keep=2)
    files = {**files_for(4), "nested/extra.bin": b"\x00\x01\x02"}
    meta = {"framework": "torch", "world_size": 3, "config": tiny_cfg.to_dict()}

    final = manager.save(4, payload(files), meta).path

    assert final == ckdir / "step-00000004" == ckdir / step_dir_name(4)
    assert final.is_dir()
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest["format"] == FORMAT
    assert manifest["step"] == 4
    assert manifest["framework"] == "torch"
    assert manifest["world_size"] == 3
    assert manifest["config"] == tiny_cfg.to_dict()
    # Every payload file is listed (relative names, nested ones included) with its real sha256;
    # the manifest itself is not listed.
    assert set(manifest["files"]) == set(files)
    for name, data in files.items():
        assert manifest["files"][name] == hashlib.sha256(data).hexdigest()
        assert (final / name).read_bytes() == data
    assert latest_name(ckdir) == "step-00000004"
    assert staging_dirs(ckdir) == []
    assert not (ckdir / (LATEST + ".tmp")).exists()

    info = verify(final)
    assert isinstance(info, CheckpointInfo)
    assert info.path == final
    assert info.step == 4
    assert info.config == tiny_cfg.to_dict()
    assert manager.latest() == info
    assert manager.complete_steps() == [final.name]


# --------------------------------------------------------------------------------------------
# crashes between writes


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_payload_writer_raising_midway_leaves_no_partial_checkpoint(two_saved: CheckpointManager, exc_type):
    ckdir = Path(two_saved.directory)
    before = {name: tree_digest(ckdir / name) for name in step_dirs(ckdir)}

    def write_files(directory: Path) -> None:
        (directory / "generator.pt").write_bytes(b"half of a checkpoint")
        raise exc_type("writer died midway")

    with pytest.raises(exc_type, match="writer died midway"):
        two_saved.save(12, write_files, {"framework": "torch"})

    assert not (ckdir / "step-00000012").exists()
    assert staging_dirs(ckdir) == []
    assert {name: tree_digest(ckdir / name) for name in step_dirs(ckdir)} == before
    assert two_saved.latest().step == 8
    assert latest_name(ckdir) == "step-00000008"


# Runs in a child process that kills itself (SIGKILL: no cleanup, no finally blocks) at one
# point of CheckpointManager.save. The kill points are reached through os-level calls only.
_CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from pipeline.checkpoint import CheckpointManager

    directory, point = Path(sys.argv[1]), sys.argv[2]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "before-rename":  # staging complete, manifest written, rename not done
        real_rename = os.rename
        def rename(src, dst, *args, **kwargs):
            if str(src).endswith(".tmp") and Path(src).is_dir():
                die()
            return real_rename(src, dst, *args, **kwargs)
        os.rename = rename
    elif point == "before-latest":  # step dir renamed into place, LATEST not yet replaced
        real_replace = os.replace
        def replace(src, dst, *args, **kwargs):
            if Path(dst).name == "LATEST":
                die()
            return real_replace(src, dst, *args, **kwargs)
        os.replace = replace

    def write_files(staging):
        (staging / "generator.pt").write_bytes(b"g" * 4096)
        if point == "mid-payload":
            with open(staging / "discriminator.pt", "wb") as handle:
                handle.write(b"d" * 100)
                handle.flush()
                die()
        (staging / "discriminator.pt").write_bytes(b"d" * 4096)

    CheckpointManager(directory, 3).save(12, write_files, {"framework": "torch"})
    sys.exit(3)  # the kill point was never reached
    """
)


@pytest.mark.parametrize("point", ["mid-payload", "before-rename", "before-latest"])
def test_killed_save_never_yields_a_partial_checkpoint(two_saved: CheckpointManager, point: str):
    ckdir = Path(two_saved.directory)
    before = {name: tree_digest(ckdir / name) for name in step_dirs(ckdir)}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, str(ckdir), point], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()

    # The older checkpoints are untouched whatever the crash point.
    for name, digest in before.items():
        assert tree_digest(ckdir / name) == digest
    steps = two_saved.complete_steps()
    assert all(not p.endswith(".tmp") for p in steps)
    info = two_saved.latest()
    assert info is not None and not info.path.name.endswith(".tmp")

    if point == "before-latest":
        # The new checkpoint was complete before LATEST moved, so it is whole; but a checkpoint
        # counts once LATEST names it, and LATEST still names the previous one.
        assert not (ckdir / "step-00000012.tmp").exists()
        assert verify(ckdir / "step-00000012").step == 12
        assert info.step == 8 and latest_name(ckdir) == "step-00000008"
    else:
        staging = ckdir / "step-00000012.tmp"
        assert staging.is_dir(), "the crash should have left the staging directory behind"
        assert (staging / MANIFEST).is_file() == (point == "before-rename")
        assert not (ckdir / "step-00000012").exists()
        assert info.step == 8 and info.path == ckdir / "step-00000008"
        assert steps == ["step-00000008", "step-00000004"]
        assert latest_name(ckdir) == "step-00000008"

    # The next save (the rerun) cleans every leftover up.
    two_saved.save(16, payload(files_for(16)), {"framework": "torch"})
    assert staging_dirs(ckdir) == []
    assert two_saved.latest().step == 16
    assert latest_name(ckdir) == "step-00000016"


def test_rerun_of_the_crashed_step_replaces_its_staging_dir(two_saved: CheckpointManager):
    ckdir = Path(two_saved.directory)
    leftover = ckdir / "step-00000012.tmp"
    leftover.mkdir()
    (leftover / "stale.bin").write_bytes(b"from the crashed attempt")
    (leftover / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": 12, "files": {"stale.bin": "0" * 64}}))
    assert two_saved.latest().step == 8

    final = two_saved.save(12, payload(files_for(12)), {}).path

    assert not leftover.exists()
    assert sorted(tree_digest(final)) == sorted([*files_for(12), MANIFEST])
    assert two_saved.latest().step == 12


def test_step_dir_without_manifest_is_ignored(two_saved: CheckpointManager):
    ckdir = Path(two_saved.directory)
    handmade = ckdir / "step-00000012"
    handmade.mkdir()
    (handmade / "generator.pt").write_bytes(b"no manifest here")

    assert handmade.name not in two_saved.complete_steps()
    assert two_saved.latest().step == 8
    with pytest.raises(CheckpointError, match="no manifest.json"):
        verify(handmade)
    # Names that are not exactly step-<8 digits> are never candidates either.
    (ckdir / "step-12").mkdir()
    (ckdir / "step-00000099.old").mkdir()
    shutil.copy(ckdir / "step-00000008" / MANIFEST, ckdir / "step-12" / MANIFEST)
    assert two_saved.complete_steps() == ["step-00000008", "step-00000004"]


# --------------------------------------------------------------------------------------------
# corrupt checkpoints fall back


def _flip_payload(path: Path) -> None:
    flip_byte(path / "generator.pt")


def _delete_payload(path: Path) -> None:
    (path / "discriminator.pt").unlink()


def _truncate_manifest(path: Path) -> None:
    manifest = path / MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:40])


def _manifest_not_utf8(path: Path) -> None:
    flip_byte(path / MANIFEST, offset=0)  # '{' ^ 0xFF is not valid UTF-8


def _manifest_not_an_object(path: Path) -> None:
    (path / MANIFEST).write_text("[]\n")


def _manifest_without_files(path: Path) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    del manifest["files"]
    (path / MANIFEST).write_text(json.dumps(manifest))


def _manifest_wrong_format(path: Path) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["format"] = "something-else/9"
    (path / MANIFEST).write_text(json.dumps(manifest))


def _manifest_checksum_edited(path: Path) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"]["generator.pt"] = "0" * 64
    (path / MANIFEST).write_text(json.dumps(manifest))


CORRUPTIONS = {
    "flipped-byte": (_flip_payload, "checksum mismatch in generator.pt"),
    "missing-file": (_delete_payload, "discriminator.pt listed in the manifest is missing"),
    "truncated-manifest": (_truncate_manifest, "unreadable"),
    "manifest-not-utf8": (_manifest_not_utf8, "unreadable"),
    "manifest-not-object": (_manifest_not_an_object, "not a JSON object"),
    "manifest-without-files": (_manifest_without_files, "malformed"),
    "manifest-wrong-format": (_manifest_wrong_format, "format 'something-else/9'"),
    "manifest-checksum-edited": (_manifest_checksum_edited, "checksum mismatch in generator.pt"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_newest_falls_back_with_a_warning(two_saved: CheckpointManager, caplog, kind: str):
    corrupt, reason = CORRUPTIONS[kind]
    ckdir = Path(two_saved.directory)
    newest = ckdir / "step-00000008"
    corrupt(newest)
    with pytest.raises(CheckpointError, match=reason):
        verify(newest)

    caplog.set_level(logging.WARNING, logger="pipeline.checkpoint")
    info = two_saved.latest()

    assert info is not None
    assert info.step == 4 and info.path == ckdir / "step-00000004"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(newest) in message and reason in message for message in warnings), warnings
    assert not any("step-00000004" in message.split(":")[0] for message in warnings)


def test_select_start_resumes_from_the_fallback(two_saved: CheckpointManager, tmp_path: Path):
    cfg = small_config(tmp_path)
    flip_byte(Path(two_saved.directory) / "step-00000008" / "discriminator.pt")

    info = select_start(cfg, two_saved, StartOptions())

    assert info is not None and info.step == 4


@pytest.mark.parametrize("kind", ["flipped-byte", "truncated-manifest", "manifest-not-utf8"])
def test_all_corrupt_gives_none_and_select_start_refuses(two_saved: CheckpointManager, tmp_path: Path, caplog, kind):
    corrupt, _ = CORRUPTIONS[kind]
    ckdir = Path(two_saved.directory)
    for name in ("step-00000004", "step-00000008"):
        corrupt(ckdir / name)
    caplog.set_level(logging.WARNING, logger="pipeline.checkpoint")

    assert two_saved.latest() is None
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert str(ckdir / "step-00000004") in warned and str(ckdir / "step-00000008") in warned
    assert len(two_saved.complete_steps()) == 2

    cfg = small_config(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies"):
        select_start(cfg, two_saved, StartOptions())
    # Only an explicit --fresh starts over.
    assert select_start(cfg, two_saved, StartOptions(fresh=True)) is None


def test_select_start_with_no_checkpoints_is_a_fresh_start(ckdir: Path, tmp_path: Path):
    assert select_start(small_config(tmp_path), CheckpointManager(ckdir, keep=2), StartOptions()) is None


# --------------------------------------------------------------------------------------------
# retention


def test_keep_two_after_five_saves(ckdir: Path):
    manager = CheckpointManager(ckdir, keep=2)
    for step in (4, 8, 12, 16, 20):
        manager.save(step, payload(files_for(step)), {})

    assert step_dirs(ckdir) == ["step-00000016", "step-00000020"]
    assert manager.complete_steps() == ["step-00000020", "step-00000016"]
    assert latest_name(ckdir) == "step-00000020"
    assert manager.latest().step == 20
    for name in step_dirs(ckdir):
        verify(ckdir / name)


@pytest.mark.parametrize("keep", [1, 0])
def test_keep_below_two_is_rejected_by_the_config(tmp_path: Path, keep: int):
    with pytest.raises(config.ConfigError, match=r"checkpoint\.keep"):
        small_config(tmp_path, checkpoint={"keep": keep})
    assert small_config(tmp_path, checkpoint={"keep": 2}).checkpoint.keep == 2


# --------------------------------------------------------------------------------------------
# a full disk


def _assert_previous_intact(manager: CheckpointManager, before: dict[str, str], failed_step: int) -> None:
    ckdir = Path(manager.directory)
    assert tree_digest(ckdir / "step-00000004") == before
    assert not (ckdir / step_dir_name(failed_step)).exists()
    assert staging_dirs(ckdir) == []
    assert latest_name(ckdir) == "step-00000004"
    info = manager.latest()
    assert info is not None and info.step == 4


@pytest.fixture
def tmpfs_1m(tmp_path: Path):
    """A real 1 MiB filesystem; needs root and permission to mount (skipped otherwise)."""
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full filesystem needs root to mount a 1 MiB tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def test_enospc_on_a_real_full_filesystem_keeps_the_previous_checkpoint(tmpfs_1m: Path):
    manager = CheckpointManager(tmpfs_1m / "checkpoints", keep=2)
    rng = np.random.default_rng(0)
    manager.save(4, payload({"generator.pt": rng.bytes(256 * 1024), "trainer.json": b"{}"}), {})
    before = tree_digest(Path(manager.directory) / "step-00000004")
    free_before = os.statvfs(tmpfs_1m).f_bfree

    too_big = {"generator.pt": rng.bytes(200 * 1024), "discriminator.pt": rng.bytes(2 * 1024 * 1024)}
    with pytest.raises(OSError) as caught:
        manager.save(8, payload(too_big), {})

    assert caught.value.errno == errno.ENOSPC
    _assert_previous_intact(manager, before, failed_step=8)
    assert os.statvfs(tmpfs_1m).f_bfree == free_before  # the partial staging files were removed
    # And the space is really back: a save that fits now succeeds.
    manager.save(8, payload({"generator.pt": rng.bytes(128 * 1024)}), {})
    assert manager.latest().step == 8
    assert tree_digest(Path(manager.directory) / "step-00000004") == before


def test_enospc_from_the_payload_writer_keeps_the_previous_checkpoint(ckdir: Path):
    manager = CheckpointManager(ckdir, keep=2)
    manager.save(4, payload(files_for(4)), {})
    before = tree_digest(ckdir / "step-00000004")

    def write_files(directory: Path) -> None:
        (directory / "generator.pt").write_bytes(b"g" * 5000)
        with open(directory / "discriminator.pt", "wb") as handle:
            handle.write(b"d" * 1234)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as caught:
        manager.save(8, write_files, {})

    assert caught.value.errno == errno.ENOSPC
    _assert_previous_intact(manager, before, failed_step=8)


def _count_fsyncs(monkeypatch, directory: Path) -> int:
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    CheckpointManager(directory, keep=2).save(8, payload(files_for(8)), {})
    monkeypatch.setattr(os, "fsync", real_fsync)
    return len(calls)


def test_enospc_at_every_fsync_never_breaks_the_checkpoint_set(tmp_path: Path, monkeypatch):
    """fsync can report ENOSPC (delayed allocation, NFS); fail each one of a save in turn."""
    calls_per_save = _count_fsyncs(monkeypatch, tmp_path / "count")
    assert calls_per_save >= 5  # payload files, staging dir, manifest, parent dir, LATEST
    real_fsync = os.fsync

    for failing in range(calls_per_save):
        ckdir = tmp_path / f"case-{failing}"
        manager = CheckpointManager(ckdir, keep=2)
        manager.save(4, payload(files_for(4)), {})
        before = tree_digest(ckdir / "step-00000004")
        seen = []

        def fsync(fd: int) -> None:
            seen.append(fd)
            if len(seen) - 1 == failing:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        try:
            with pytest.raises(OSError) as caught:
                manager.save(8, payload(files_for(8)), {})
        finally:
            monkeypatch.setattr(os, "fsync", real_fsync)

        assert caught.value.errno == errno.ENOSPC
        assert tree_digest(ckdir / "step-00000004") == before, failing
        assert staging_dirs(ckdir) == [], failing
        new = ckdir / "step-00000008"
        info = manager.latest()
        if new.exists():  # failed after the rename: the new checkpoint is whole
            assert tree_digest(new).keys() == {*files_for(8), MANIFEST}, failing
        else:
            assert info.step == 4, failing
        # LATEST only ever names a checkpoint that verifies, and discovery follows it.
        assert verify(ckdir / latest_name(ckdir)).step == info.step, failing


# --------------------------------------------------------------------------------------------
# re-saving a step


def test_resaving_the_same_step_replaces_it_whole(two_saved: CheckpointManager):
    ckdir = Path(two_saved.directory)
    older = tree_digest(ckdir / "step-00000004")
    new_files = {"generator.pt": b"replacement", "other.bin": b"only in the new one"}

    final = two_saved.save(8, payload(new_files), {"framework": "torch", "attempt": 2}).path

    assert sorted(tree_digest(final)) == sorted([*new_files, MANIFEST])
    assert not (final / "discriminator.pt").exists()  # nothing of the old step-8 survives
    for name, data in new_files.items():
        assert (final / name).read_bytes() == data
    info = verify(final)
    assert info.manifest["attempt"] == 2 and set(info.manifest["files"]) == set(new_files)
    assert two_saved.latest() == info
    assert tree_digest(ckdir / "step-00000004") == older
    assert staging_dirs(ckdir) == []


# --------------------------------------------------------------------------------------------
# the torch payload


def _train(backend, steps: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for step in range(1, steps + 1):
        backend.train_step(rng.integers(0, 256, size=(16, 32, 32, 1), dtype=np.uint8), step)


def test_torch_backend_refuses_non_finite_state(tmp_path: Path, ckdir: Path):
    import torch

    from pipeline.backends import NonFiniteError
    from pipeline.backends.torch_backend import TorchBackend
    from pipeline.context import LOCAL

    cfg = small_config(tmp_path)
    backend = TorchBackend(cfg, LOCAL)
    manager = CheckpointManager(ckdir, keep=2)
    manager.save(4, backend.save, metadata(cfg))
    before = tree_digest(ckdir / "step-00000004")

    name, weight = next(iter(backend.netG.named_parameters()))
    with torch.no_grad():
        weight[(0,) * weight.dim()] = float("nan")  # the first element, whatever the memory layout
    with pytest.raises(NonFiniteError, match=re.escape(f"generator.pt.{name} holds NaN")):
        manager.save(8, backend.save, metadata(cfg))

    assert not (ckdir / "step-00000008").exists()
    assert staging_dirs(ckdir) == []
    assert tree_digest(ckdir / "step-00000004") == before
    assert manager.latest().step == 4


def test_torch_payload_round_trip(tmp_path: Path, ckdir: Path):
    import torch

    from pipeline.backends.torch_backend import TorchBackend
    from pipeline.context import LOCAL
    from pipeline.loop import TRAINER_STATE_FILE, TrainerState, _save

    cfg = small_config(tmp_path)
    backend = TorchBackend(cfg, LOCAL)
    _train(backend, 2)
    manager = CheckpointManager(ckdir, keep=2)
    final = _save(cfg, LOCAL, backend, manager, TrainerState(step=2)).path
    expected = backend.fingerprint()

    info = select_start(cfg, manager, StartOptions())
    assert info is not None and info.path == final and info.step == 2
    assert info.manifest["framework"] == "torch" and info.manifest["world_size"] == 1
    assert set(info.manifest["files"]) == {
        "generator.pt", "discriminator.pt", "optimizers.pt", "rng.pt", TRAINER_STATE_FILE,
    }  # fmt: skip
    for name in info.manifest["files"]:
        if name.endswith(".pt"):
            torch.load(final / name, map_location="cpu", weights_only=True)  # no pickled code
    assert TrainerState.read(final).step == 2

    fresh = TorchBackend(cfg, LOCAL)
    torch.manual_seed(12345)  # disturb the global RNG: load must restore it
    assert fresh.fingerprint() != expected
    fresh.load(final)
    assert fresh.fingerprint() == expected
    # The restored state trains on identically.
    batch = np.random.default_rng(7).integers(0, 256, size=(16, 32, 32, 1), dtype=np.uint8)
    torch.set_rng_state(torch.load(final / "rng.pt", weights_only=True)["torch_cpu"])
    backend.train_step(batch, 3)
    torch.set_rng_state(torch.load(final / "rng.pt", weights_only=True)["torch_cpu"])
    fresh.train_step(batch, 3)
    assert fresh.fingerprint() == backend.fingerprint()


def test_the_best_scored_checkpoint_survives_retention(ckdir: Path, tiny_cfg: config.Config):
    manager = CheckpointManager(ckdir, keep=2)
    scores = {10: 9.0, 20: 3.0, 30: None, 40: 5.0, 50: float("nan"), 60: 4.0}  # None, NaN: not evaluated
    for step, score in scores.items():
        manager.save(step, payload(files_for(step)), metadata(tiny_cfg), score=score)
        if step == 20:
            assert manager.best_name() == "step-00000020"
    assert (ckdir / BEST).read_text().strip() == "step-00000020" and manager.best_score() == 3.0
    assert step_dirs(ckdir) == ["step-00000020", "step-00000050", "step-00000060"]  # newest two + the best
    assert json.loads((ckdir / "step-00000050" / "manifest.json").read_text())["score"] is None

    manager.save(70, payload(files_for(70)), metadata(tiny_cfg), score=2.5)  # a better one takes over...
    assert manager.best_name() == "step-00000070"
    assert step_dirs(ckdir) == ["step-00000060", "step-00000070"]  # ...and the old best is ordinary again

    # An explicit resume of an older step abandons the newer line, and with it its best.
    manager.set_aside_after(60)
    assert manager.best_name() is None and manager.best_score() == float("inf")


def test_best_moves_beyond_the_noise_on_its_own_card_and_pending_evaluations_are_kept(ckdir: Path, tiny_cfg: config.Config):
    """BEST moves only when a score beats it by more than best_margin standard deviations of the
    difference, on the same provenance card; another card starts a new ranking. A checkpoint
    whose evaluation is pending outlives retention until its scores (or its failure) are in."""
    from pipeline.checkpoint import SCORES, Score

    manager = CheckpointManager(ckdir, keep=2, job="job-1", best_margin=1.0)
    manager.save(10, payload(files_for(10)), metadata(tiny_cfg), score=Score(10.0, 0.3, "card-a"))
    manager.save(20, payload(files_for(20)), metadata(tiny_cfg), score=Score(9.6, 0.4, "card-a"))  # 0.4 < 0.5
    assert manager.best_name() == "step-00000010"  # within the noise: BEST stays
    manager.save(30, payload(files_for(30)), metadata(tiny_cfg), score=Score(9.0, 0.4, "card-a"))  # 1.0 > 0.5
    assert manager.best_name() == "step-00000030"
    manager.save(40, payload(files_for(40)), metadata(tiny_cfg), score=Score(12.0, 0.4, "card-b"))
    assert manager.best_name() == "step-00000040"  # a new card: a worse number, a new ranking

    # Scored after writing (Ray's evaluation apart): kept while pending, then ranked like the rest.
    manager.save(50, payload(files_for(50)), metadata(tiny_cfg), evaluation_pending=True)
    manager.save(60, payload(files_for(60)), metadata(tiny_cfg), evaluation_pending=True)
    manager.save(70, payload(files_for(70)), metadata(tiny_cfg))
    assert step_dirs(ckdir) == ["step-00000040", "step-00000050", "step-00000060", "step-00000070"]
    assert manager.record_scores("step-00000050", Score(11.0, 0.3, "card-b"), {"eval/fid": 11.0}, {"key": "card-b"})
    assert manager.best_name() == "step-00000050" and manager.best_score() == 11.0
    manager.record_failure("step-00000060", "RuntimeError: the evaluation failed")
    assert json.loads((ckdir / "step-00000060" / SCORES).read_text())["score"] is None
    manager.save(80, payload(files_for(80)), metadata(tiny_cfg))
    assert step_dirs(ckdir) == ["step-00000050", "step-00000070", "step-00000080"]  # BEST and the newest two

    # A pending evaluation of a job that ended never comes: the next job's retention ignores it.
    manager.save(90, payload(files_for(90)), metadata(tiny_cfg), evaluation_pending=True)
    later = CheckpointManager(ckdir, keep=2, job="job-2")
    later.save(100, payload(files_for(100)), metadata(tiny_cfg))
    later.save(110, payload(files_for(110)), metadata(tiny_cfg))
    assert step_dirs(ckdir) == ["step-00000050", "step-00000100", "step-00000110"]
