"""launch/: a real Ray head on 127.0.0.1 with token auth, jobs submitted through the Jobs API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.checkpoint import fetch, step_of
from tests.conftest import ROOT, small_config
from tests.ddp_harness import free_port
from tests.helpers import write_config

pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.ray]

RAY_CLI = Path(sys.executable).parent / "ray"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")  # the head's token file goes to $HOME/.ray, not ours
    # Every port free, not Ray's fixed defaults: another Ray may run on this machine (the other
    # lane of `make test` runs tests/test_ray_runner.py at the same time).
    ports = {name: str(free_port()) for name in ("RAY_PORT", "DASHBOARD_PORT", "AGENT_PORT", "RAY_CLIENT_PORT")}
    env = {**os.environ, "HOME": str(home), **ports}
    env.pop("RAY_ADDRESS", None)
    started = subprocess.run(["bash", ROOT / "launch/head.sh", "start", "--num-cpus", "4"],
                             env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert started.returncode == 0, started.stderr
    address = started.stdout.strip().splitlines()[-1]
    assert address == f"http://127.0.0.1:{env['DASHBOARD_PORT']}"
    # Another head's process, as `pgrep -f` sees Ray's: `head.sh stop` must leave it alone.
    other = subprocess.Popen(["bash", "-c", "sleep 600", f"/tmp/ray-head-{free_port()}/session_x/raylet"])
    try:
        yield env, address
    finally:
        stopped = subprocess.run(["bash", ROOT / "launch/head.sh", "stop"], env=env, capture_output=True, text=True, timeout=120)
        try:
            assert stopped.returncode == 0, stopped.stderr
            own = subprocess.run(["pgrep", "-f", f"/tmp/ray-head-{env['RAY_PORT']}/"], capture_output=True, text=True)
            assert own.stdout == "", f"processes of the stopped head remain: {own.stdout}"
            assert other.poll() is None, "head.sh stop ended a process of another head"
        finally:
            other.kill()


def submit(head, config: Path, *extra: str) -> subprocess.CompletedProcess:
    env, address = head
    return subprocess.run(
        ["bash", ROOT / "launch/submit.sh", config, "--address", address, "--", *extra],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_head_refuses_a_client_without_its_token(head):
    env, address = head
    wrong = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}
    listing = subprocess.run([RAY_CLI, "job", "list", "--address", address],
                             env=wrong, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert listing.returncode != 0 and "Invalid authentication token" in listing.stdout + listing.stderr
    token_ok = subprocess.run([RAY_CLI, "job", "list", "--address", address],
                              env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert token_ok.returncode == 0, token_ok.stderr


def test_a_node_joins_the_head_with_its_token_and_stops_alone(head):
    env, _ = head
    gcs = f"127.0.0.1:{env['RAY_PORT']}"
    node_env = {**env, "NODE_NAME": "extra"}
    started = subprocess.run(["bash", ROOT / "launch/node.sh", "start", gcs, "--num-cpus", "1"],
                             env=node_env, capture_output=True, text=True, timeout=180)  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr
        count = ("import ray; ray.init(address='%s', logging_level='ERROR'); "
                 "print(sorted(n['Resources'].get('CPU', 0) for n in ray.nodes() if n['Alive']))") % gcs  # fmt: skip
        nodes = subprocess.run([sys.executable, "-c", count], env={**env, "RAY_AUTH_MODE": "token"},
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        assert nodes.returncode == 0, nodes.stderr
        assert nodes.stdout.strip().splitlines()[-1] == "[1.0, 4.0]"  # the head's 4 CPUs and the node's 1
    finally:
        stopped = subprocess.run(["bash", ROOT / "launch/node.sh", "stop", gcs], env=node_env,
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
    assert stopped.returncode == 0, stopped.stderr
    own = subprocess.run(["pgrep", "-f", f"/tmp/ray-node-{env['RAY_PORT']}-extra/"], capture_output=True, text=True)
    assert own.stdout == "", f"processes of the stopped node remain: {own.stdout}"
    head_alive = subprocess.run(["pgrep", "-f", f"/tmp/ray-head-{env['RAY_PORT']}/"], capture_output=True, text=True)
    assert head_alive.stdout, "node.sh stop ended the head"


def test_cluster_launcher_config_validates_against_rays_schema():
    import json

    import jsonschema
    import ray.autoscaler
    import yaml

    config = yaml.safe_load((ROOT / "launch/cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    gpu_types = [name for name, t in config["available_node_types"].items() if t["resources"].get("GPU")]
    assert gpu_types, "the cluster needs a GPU worker type"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def submit_in_background(head, config: Path) -> subprocess.Popen:
    env, address = head
    return subprocess.Popen(
        ["bash", ROOT / "launch/submit.sh", config, "--address", address],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def wait_for(path: Path, job: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert path.exists(), f"{path} never appeared"


def _job_config(tmp_path: Path, name: str, **sections) -> tuple:
    cfg = small_config(tmp_path, run={"name": name}, scaling={"num_workers": 1}, runtime={"runner": "ray"}, **sections)
    return cfg, write_config(tmp_path / f"{name}.yaml", cfg)


def test_a_relative_path_with_a_cluster_address_is_refused_naming_the_field(head, tmp_path: Path):
    cfg, config = _job_config(tmp_path, "relative")
    raw = yaml.safe_load(config.read_text())
    raw["data"]["prepared_dir"] = "data/prepared/synthetic"
    config.write_text(yaml.safe_dump(raw))
    done = submit(head, config)
    logs = done.stdout + done.stderr
    assert done.returncode != 0 and "exit code 2" in logs, logs
    assert "data.prepared_dir='data/prepared/synthetic' is relative" in logs
    assert not cfg.run_dir.exists()


def test_a_second_submit_fails_on_the_lease_ray_job_stop_checkpoints_and_a_horovod_resubmit_resumes_an_older_step(head, tmp_path: Path):
    """One run through three submissions: the holder trains until `ray job stop` (its only
    checkpoint is the stop's); a second submit meanwhile is refused by the lease; after a newer
    line is trained locally, a resubmit's `--resume` of the stop checkpoint reaches the driver.
    What `--resume` of an older step does is the driver's planning (tests/test_job.py, past a
    corrupt newest checkpoint too): here, that the flag gets there through the Jobs API.

    The resubmit runs on two Horovod workers (a DDP checkpoint resumes under Horovod:
    tests/test_horovod.py): HorovodTrainer needs Ray Train V1 in the job's driver and in its
    workers, and the driver's ray.init hands the switch to the workers through the job's
    runtime environment."""
    endless = 10**6
    cfg, config = _job_config(tmp_path, "stopped", train={"steps": endless}, checkpoint={"every": endless, "keep": 3, "stop_check_every": 1})
    env, address = head
    first = submit_in_background(head, config)
    try:
        wait_for(cfg.run_dir / "config.yaml", first)  # the chief writes it just before the first step
        holder = json.loads(cfg.run_dir.with_name("stopped.lease").read_text())
        submission = holder["submission"]

        second = submit(head, config)  # the same run while it trains: refused by its lease
        logs = second.stdout + second.stderr
        assert second.returncode != 0 and "exit code 3" in logs, logs
        assert f"is in use by another job: pid {holder['pid']} on host {holder['host']}" in logs
        assert submission.startswith("dcgan-") and f"Ray job submission {submission}" in logs
        assert first.poll() is None, "the holder must keep training"
        stop = subprocess.run([RAY_CLI, "job", "stop", submission, "--address", address],
                              env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=180)  # fmt: skip
        assert stop.returncode == 0, stop.stdout + stop.stderr
    finally:
        out, _ = first.communicate(timeout=300)
    checkpoints = cfg.run_dir / "checkpoints"
    (saved,) = sorted(checkpoints.glob("step-*"))
    step = int(saved.name[5:])
    assert 0 < step < endless, out
    assert not (cfg.run_dir / "STOP").exists() and not cfg.run_dir.with_name("stopped.lease").exists()

    # A newer line, trained here (the runner does not matter to it), so the stop checkpoint is older.
    assert cli.main(["train", "--config", str(config), "--runner", "local", "--set", f"train.steps={step + 2}"]) == 0
    assert (checkpoints / "LATEST").read_text().strip() == f"step-{step + 2:08d}"

    horovod = ("--set", "distributed.strategy=horovod", "--set", "scaling.num_workers=2")
    resumed = submit(head, config, "--resume", str(saved), "--set", f"train.steps={step + 4}", *horovod)
    logs = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, logs
    assert "HorovodTrainer" in logs and "succeeded" in logs  # the job's own log lines, streamed
    assert f"(step {step}," in logs  # the stop checkpoint, not the newest
    (abandoned,) = checkpoints.glob("abandoned-*")
    assert sorted(p.name for p in abandoned.iterdir()) == [f"step-{step + 2:08d}"]
    assert (checkpoints / "LATEST").read_text().strip() == f"step-{step + 4:08d}"
    manifest = json.loads((checkpoints / f"step-{step + 4:08d}" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["config"]["distributed"]["strategy"] == "horovod"


def test_cluster_launcher_commands_use_no_variable_that_nothing_sets():
    import re

    config = yaml.safe_load((ROOT / "launch/cluster.yaml").read_text())
    provided = {"RAY_HEAD_IP"}  # set by Ray's cluster launcher on worker nodes
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        for command in config[key]:
            assigned = set(re.findall(r"(?:^|[;\s])([A-Za-z_][A-Za-z0-9_]*)=", command))
            used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", command))
            assert used <= assigned | provided, f"{key}: {command!r} uses {used - assigned - provided}"


def _sweep_config(tmp_path: Path, name: str, steps: int) -> tuple:
    """Digits at 32 px on one worker a trial, scored every 50 steps by the trial's chief
    (in-line: the score is in the checkpoint's manifest at once, so a stop lands within a few
    steps; tests/test_sweep.py sweeps with evaluations apart)."""
    return _job_config(
        tmp_path, name, data={"source": "digits", "image_size": 32, "channels": 1},
        model={"nz": 16, "ngf": 16, "ndf": 16},
        train={"steps": steps, "global_batch_size": 32, "seed": 0, "channels_last": False},
        checkpoint={"every": 50, "keep": 2, "stop_poll_seconds": 1, "stop_check_every": 2},
        logging={"every": 25, "samples_every": steps},
        eval={"every": 50, "num_samples": 500, "runs": "in-line"},
    )  # fmt: skip


def _latest_step(run: Path) -> int:
    latest = run / "checkpoints" / "LATEST"
    return step_of(latest.read_text().strip()) if latest.exists() else 0


def _terminated(sweep_dir: Path) -> list[str]:
    """The trials Tune's newest snapshot of the experiment records as ended."""
    states = sorted((sweep_dir / "tune").glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    try:
        trials = json.loads(states[-1].read_text())["trial_data"] if states else []
    except (OSError, ValueError):
        return []  # being replaced
    return [t["trial_id"] for t in (json.loads(data) for data, _ in trials) if t["status"] == "TERMINATED"]


def _files(run: Path) -> dict[str, int]:
    """What a trial's run holds, with the times each was written; Ray Train's own bookkeeping of
    the killed fit (.ray/) aside."""
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in sorted(run.rglob("*"))
            if p.is_file() and p.relative_to(run).parts[0] != ".ray"}  # fmt: skip


def _settled(runs: list[Path], quiet: float = 5.0, timeout: float = 120.0) -> dict[str, dict[str, int]]:
    """The files of `runs` once they have stayed the same for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    before = {str(run): _files(run) for run in runs}
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = {str(run): _files(run) for run in runs}
        if now == before:
            return now
        before = now
    raise AssertionError(f"the killed sweep's runs were still being written {timeout:.0f} s after the kill")


def test_a_sweep_submitted_sigkilled_and_resubmitted_finishes_without_rerunning_a_trial_and_asha_stops_the_diverging_lr(head, tmp_path: Path):
    """4 trials, one of them a learning rate that diverges (3.0: the generator's output goes
    constant), 2 at a time, 200 steps each (rungs at 50 and 100). The driver is SIGKILLed once a trial has finished; the resubmitted
    `--resume` completes the sweep: the finished trial's run is untouched, ASHA (its rungs
    kept across the kill) has stopped the diverging trial before its last step, and the
    sweep's best checkpoint is a sane rate's."""
    steps = 200
    cfg, config = _sweep_config(tmp_path, "sweep", steps)
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {grid: [2.0e-3, 3.0e-3, 5.0e-3, 3.0]}\n")
    env, address = head
    sweep_dir, trials = cfg.run_dir, cfg.run_dir / "trials"
    first = subprocess.Popen(["bash", ROOT / "launch/submit.sh", config, "--address", address, "--sweep", space, "--", "--max-concurrent", "2"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 400
        while not _terminated(sweep_dir) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        finished = _terminated(sweep_dir)  # as Tune recorded it: what --resume reads
        assert finished, "no trial finished"
        driver = subprocess.run(["pgrep", "-f", f"dcgan sweep --space {space} --config {config}"], capture_output=True, text=True)
        assert driver.stdout.split(), "the sweep's driver is not running"
        for pid in driver.stdout.split():  # the job's shell too, where it did not exec the driver
            os.kill(int(pid), 9)
    finally:
        out, _ = first.communicate(timeout=120)
    assert first.returncode != 0, out
    assert 0 < len(finished) < 4, f"the kill must come mid-way: {finished}"
    # Tune records a trial its scheduler stops as ended before the trial's ranks have written
    # their stop checkpoint, and the killed driver's actors take a moment to die: what the
    # resume must leave alone is what these runs hold once nothing writes them any more.
    done_before = _settled([trials / name for name in finished])

    resumed = subprocess.run(["bash", ROOT / "launch/submit.sh", config, "--address", address, "--sweep", space, "--", "--resume"],
                             env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    logs = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, logs[-5000:]
    for run, files in done_before.items():
        assert _files(Path(run)) == files, f"finished trial {Path(run).name} was run again"

    summary = json.loads((sweep_dir / "sweep.json").read_text())
    rows = {row["overrides"][0]: row for row in summary["trials"]}
    assert sorted(rows) == ["train.lr=0.002", "train.lr=0.003", "train.lr=0.005", "train.lr=3.0"]
    diverged = rows["train.lr=3.0"]
    assert diverged["status"] == "stopped" and _latest_step(Path(diverged["run"])) < steps, diverged
    best = next(row for row in summary["trials"] if row["trial"] == summary["best_trial"])
    # A diverged run may end with no finite score at all (BEST ranks finite ones only): worse still.
    assert best["overrides"] != ["train.lr=3.0"], summary
    assert diverged["best_fid"] is None or best["best_fid"] < diverged["best_fid"] / 2, summary
    assert summary["best_checkpoint"] == best["best_checkpoint"]
    assert fetch(best["best_checkpoint"]).step == best["best_step"]  # it verifies: ready for sample/export/evaluate
    assert (sweep_dir / "sweep.md").read_text().count("| train.lr=") == 4
    assert json.loads((sweep_dir / "asha-rungs.json").read_text())["rungs"]
