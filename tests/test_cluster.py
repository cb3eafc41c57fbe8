"""A real multi-node Ray cluster on this machine (Ray's own harness, `ray.cluster_utils.Cluster`):
a head without CPUs for training and three worker nodes of one CPU each, every node with its
own node-local cache (`DCGAN_CACHE_DIR`), as on a real cluster. Runs live in object storage
(a real S3-compatible server on 127.0.0.1), which every node reaches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import pytest

from pipeline import cli, storage
from pipeline import tensorboard as tb
from pipeline.job import plan
from tests.conftest import small_config
from tests.helpers import s3_server, traced_worker, write_config

ray = pytest.importorskip("ray")
from pipeline import ray_runner  # noqa: E402  (after the skip: needs ray)
from pipeline.ray_runner.worker import restored_address  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.ray]

WORKER_NODES = 3
# Ray Train's preemption watcher polls the cluster's draining nodes every 5 s by default. An
# elastic restart sized before a lost node is known dead waits this long for its workers
# (default 60 s) before it is sized again.
RAY_ENV = {"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}
# A node that stops answering is declared dead after 3 missed checks a second apart (Ray's
# defaults: 5 checks, 3 s apart), so a lost node costs the tests seconds, not half a minute.
HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
# As in test_storage's store faults: a stalled transfer fails after 1 s, each request is tried twice.
FAULT_BOUNDS = {"DCGAN_STORAGE_TIMEOUT_S": "1", "DCGAN_STORAGE_ATTEMPTS": "2"}
FAULT_DEADLINE_S = 60


@dataclass
class Harness:
    address: str  # the head's GCS
    s3_base: str
    nodes: dict  # {node id: that node's cache directory}
    add_node: Callable[..., str]  # add_node(env_vars=None) -> the id of a new node of one CPU
    remove_node: Callable[[str], None]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Harness]:
    from ray.cluster_utils import Cluster

    caches = tmp_path_factory.mktemp("node-caches")
    # ray.init turns a loopback address into this host's address, which this sandbox cannot
    # reach: every node here listens on 127.0.0.1 (as launch/head.sh's head does).
    patch = pytest.MonkeyPatch()
    patch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
    # First: every node's processes inherit its AWS variables. It checks credentials, as S3 does.
    with s3_server(authenticated=True) as s3_base:
        # No exit hooks per node (a SIGTERM handler, which only the main thread may install): a
        # test adds a node from a thread while a run holds the main thread; the fixture ends the
        # cluster itself.
        cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "dashboard_host": "127.0.0.1",
            "env_vars": {**RAY_ENV, "DCGAN_CACHE_DIR": str(caches / "head")},
            "_system_config": HEALTH_CHECKS,
        })  # fmt: skip
        nodes, handles = {}, {}

        def add_node(env_vars: Optional[dict] = None) -> str:
            cache = caches / f"node{len(handles)}"
            node = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1",
                                    env_vars={**RAY_ENV, "DCGAN_CACHE_DIR": str(cache), **(env_vars or {})})  # fmt: skip
            nodes[node.node_id], handles[node.node_id] = cache, node
            return node.node_id

        def remove_node(node_id: str) -> None:
            cluster.remove_node(handles.pop(node_id))
            nodes.pop(node_id)

        for _ in range(WORKER_NODES):
            add_node()
        cluster.wait_for_nodes()
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        ray.cloudpickle.register_pickle_by_value(sys.modules["tests.helpers"])
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", logging_level="WARNING")
        try:
            yield Harness(cluster.address, s3_base, nodes, add_node, remove_node)
        finally:
            ray.shutdown()
            cluster.shutdown()
            patch.undo()


def drain_my_node(deadline_s: float) -> None:
    """What a cloud provider's spot reclaim makes Ray's autoscaler do: drain this worker's node
    with a deadline (DRAIN_NODE_REASON_PREEMPTION, which a node cannot refuse)."""
    from ray.core.generated import autoscaler_pb2

    node_id = ray.get_runtime_context().get_node_id()
    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    gcs = ray._private.worker.global_worker.gcs_client
    accepted, why = gcs.drain_node(node_id, reason, "spot reclaim (test)", int((time.time() + deadline_s) * 1000))
    assert accepted, why


def test_a_drained_node_costs_a_checkpoint_not_the_run(cluster, tmp_path: Path):
    """2 workers on 2 of the 3 nodes, `train.max_failures: 0`. Rank 1's node is drained with a
    deadline 6 s ahead: the ranks checkpoint at the next agreed step (step 4's own check, when
    Ray's watcher has seen the drain by then) and train on; at the
    deadline Ray restarts the group on the two nodes left, from that checkpoint (a preemption,
    which Ray does not charge to max_failures), and the run ends at train.steps."""
    s3_base, nodes = cluster.s3_base, dict(cluster.nodes)  # as placed: the drained one leaves the harness
    traces = tmp_path / "traces"
    traces.mkdir()
    steps = 60
    cfg = small_config(
        tmp_path, run={"name": "drained"}, runtime={"runner": "ray", "storage_path": s3_base},
        train={"steps": steps, "global_batch_size": 16, "max_failures": 0},
        checkpoint={"every": steps, "keep": 3, "stop_check_every": 2, "stop_poll_seconds": 1},
        scaling={"num_workers": 2, "cpus_per_worker": 1},
    )  # fmt: skip

    def where_am_i(rank: int, loop_config: dict) -> None:
        (traces / f"node-rank{rank}-{time.time_ns()}").write_text(ray.get_runtime_context().get_node_id())

    def drain_then_pace(rank: int, step: int) -> None:
        drained = traces / "drained"
        if rank == 1 and step == 4 and not drained.exists():
            drained.touch()
            drain_my_node(deadline_s=6)
        if drained.exists() and not (traces / "restarted").exists():
            time.sleep(0.25)  # the first attempt outlasts the deadline (~30 steps), well before step 60
            if rank == 0:
                # Replaced whole: Ray ends this process at the deadline, maybe mid-write.
                reached = traces / f"first-attempt-reached.{os.getpid()}"
                reached.write_text(str(step))
                os.replace(reached, traces / "first-attempt-reached")

    def restarted(rank: int, loop_config: dict) -> None:
        where_am_i(rank, loop_config)
        if (traces / "drained").exists():
            (traces / "restarted").touch()

    try:
        metrics = ray_runner.run(plan(cfg), train_fn=traced_worker(traces, before=restarted, each_step=drain_then_pace))
    finally:
        placements = sorted(traces.glob("node-rank*"), key=lambda p: int(p.name.rpartition("-")[2]))
        first, second = placements[:2], placements[2:]
        drained_node = next((p.read_text() for p in first if p.name.startswith("node-rank1-")), None)
        if drained_node in cluster.nodes:
            cluster.remove_node(drained_node)  # what the provider does with a drained node
    assert metrics["step"] == steps

    assert len(first) == 2 and len(second) == 2, [p.name for p in placements]
    first_nodes = {p.name[9]: p.read_text() for p in first}
    second_nodes = {p.name[9]: p.read_text() for p in second}
    assert first_nodes["0"] != first_nodes["1"] and set(first_nodes.values()) <= set(nodes)  # one worker per node
    assert first_nodes["1"] not in second_nodes.values()  # the drained node takes no new worker

    # The second attempt started at the drain's checkpoint, after the first had trained past it
    # (Ray ended the first at the deadline: its processes left no trace of their own).
    attempts = list(traces.glob("rank0-pid*.npy"))
    assert len(attempts) == 1, attempts
    drain_step = steps - len(np.load(attempts[0]))
    first_reached = int((traces / "first-attempt-reached").read_text())
    assert 4 <= drain_step < first_reached < steps, (drain_step, first_reached)
    assert drain_step % cfg.checkpoint.stop_check_every == 0  # an agreed step

    checkpoints = storage.location(storage.join(cfg.run_address, "checkpoints"))
    assert f"step-{drain_step:08d}" in checkpoints.list()
    manifest = json.loads(checkpoints.read_text(f"step-{drain_step:08d}/manifest.json"))
    assert manifest["step"] == drain_step

    # Each node fetched the drain's checkpoint into its own cache for the restart.
    fetched = [nodes[node] for node in second_nodes.values()]
    assert all(any((cache / "checkpoints").glob("*")) for cache in fetched), fetched


def test_doctor_and_a_run_name_the_node_without_the_stores_credentials(cluster, tmp_path: Path, capsys):
    """`dcgan doctor` passes on the cluster as it is. Then a node joins whose Ray processes
    started with other credentials than the driver's (a head started before the AWS variables
    were set, a node without the instance role): doctor names it and the fix; a run with one
    worker per node fails at its storage check, naming that node and what it lacks, instead of
    hanging at its first step."""
    cfg = small_config(
        tmp_path, run={"name": "no-credentials"}, runtime={"runner": "ray", "storage_path": cluster.s3_base},
        train={"steps": 4, "global_batch_size": 24, "max_failures": 0},  # splits over 3 and 4 workers
        scaling={"num_workers": len(cluster.nodes) + 1, "cpus_per_worker": 1},
    )  # fmt: skip
    config_file = write_config(tmp_path / "run.yaml", cfg)
    assert cli.main(["prepare", "--config", str(config_file)]) == 0
    capsys.readouterr()
    good = len(cluster.nodes)
    assert cli.main(["doctor", "--config", str(config_file), "--set", f"scaling.num_workers={good}"]) == 0, capsys.readouterr().out
    report = capsys.readouterr().out
    assert report.count(" storage: reads the run's") == good + 1 and "FAIL" not in report, report  # and the head
    bad = cluster.add_node(env_vars={"AWS_ACCESS_KEY_ID": "AKIDNOTTHESTORES", "AWS_SECRET_ACCESS_KEY": "wrong"})
    try:
        assert cli.main(["doctor", "--config", str(config_file)]) == 1
        report = capsys.readouterr().out
        (failed,) = [line for line in report.splitlines() if line.startswith("FAIL") and "storage" in line]
        assert f"Ray node {bad[:12]}" in failed and "ACCESS_DENIED" in failed, report
        assert "credentials in the environment its `ray start` ran with" in report
        with pytest.raises(ray_runner.RunFailed) as run_failed:
            ray_runner.run(plan(cfg))
    finally:
        cluster.remove_node(bad)
    message = str(run_failed.value)
    assert f"Ray node {bad[:12]}" in message and "ACCESS_DENIED" in message, message
    assert "AWS_ACCESS_KEY_ID" in message and "launch/node.sh" in message, message
    checkpoints = storage.location(storage.join(cfg.run_address, "checkpoints"))
    assert not [name for name in checkpoints.list() if name.startswith("step-")]


def on_node(node_id: str) -> dict:
    """Options that pin a Ray task or actor to one node, reserving nothing there (the nodes'
    single CPUs stay free for the tests' runs)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


def test_two_nodes_on_one_run_in_object_storage_share_the_store_not_their_caches(cluster, tmp_path: Path):
    """Each node has its own cache; the store is what they share.
    - A step name written again (`--fresh`, an older-step resume, a dry run) is fetched anew by a
      node that holds the old one in its cache: its copy verifies against its own manifest.
    - A fresh run whose chief's node mirrored the old run uploads none of the old run's files.
    - The lease: a job on node B is refused while node A's holds the run, naming A's process;
      once A's beats stall past the stale age, B takes the run over, and A gives it up without
      writing its record back (both would hold the run)."""
    node_a, node_b = list(cluster.nodes)[:2]
    runs = storage.join(cluster.s3_base, "two-nodes")

    @ray.remote
    def save(step: int, content: bytes, job: str) -> None:
        from pipeline.checkpoint import CheckpointManager

        def payload(directory: Path) -> None:
            (directory / "g.bin").write_bytes(content)

        CheckpointManager(storage.join(runs, "ckpt/checkpoints"), keep=2, job=job).save(step, payload, {"framework": "torch"})

    @ray.remote
    def load(job: str) -> tuple[bytes, str, list[str]]:
        from pipeline.checkpoint import CheckpointManager

        found = CheckpointManager(storage.join(runs, "ckpt/checkpoints"), keep=2, job=job).latest(job=job)
        copies = sorted(p.name for p in found.path.parent.iterdir())  # this node's cache of the run
        return (found.path / "g.bin").read_bytes(), str(found.path), copies

    ray.get(save.options(**on_node(node_a)).remote(4, b"A" * 64, "A"))
    content, path_a, _ = ray.get(load.options(**on_node(node_b)).remote("A"))
    assert content == b"A" * 64 and path_a.startswith(str(cluster.nodes[node_b]))  # node B's cache
    ray.get(save.options(**on_node(node_a)).remote(4, b"B" * 64, "B"))  # step-4 again, another line
    content, path_b, copies = ray.get(load.options(**on_node(node_b)).remote("B"))
    assert content == b"B" * 64, "node B loaded its cached copy of the old step-4"
    assert copies == [Path(path_b).name], copies  # the old copy gone, nothing half-downloaded

    @ray.remote
    def train(raw: dict, fresh: bool) -> list[list[str]]:
        from pipeline import config
        from pipeline.job import StartOptions, plan

        cfg = config.validate(raw, "test")
        plan(cfg, StartOptions(fresh=fresh)).run()
        run = storage.location(cfg.run_address)
        return [run.list("samples"), run.list("tb")]

    cfg = small_config(tmp_path, run={"name": "mirrored"}, runtime={"storage_path": runs}, train={"steps": 8})
    raw = cfg.to_dict()
    samples, _ = ray.get(train.options(**on_node(node_a)).remote(raw, False))
    assert samples == ["step-00000004.png", "step-00000008.png"]
    raw["train"]["steps"] = 4
    samples, events = ray.get(train.options(**on_node(node_a)).remote(raw, True))  # node A's mirror holds the old run
    assert samples == ["step-00000004.png"] and len(events) == 1, (samples, events)

    @ray.remote
    class Holder:
        """A job's lease on node A, beating every 8 s (none before the takeover): stale to others after 1 s."""

        def __init__(self) -> None:
            from pipeline.lease import RunLease

            self.lease = RunLease(storage.location(runs), "leased", heartbeat_every=8.0, stale_after=1.0)
            self.lease.acquire()

        def pid(self) -> int:
            return os.getpid()

        def lost(self, timeout: float) -> bool:
            return self.lease.lost.wait(timeout) and self.lease.token.check() is not None

        def release(self) -> None:
            self.lease.release()

    @ray.remote
    def contend(stale_after: float) -> tuple[str, str]:
        """("took", whether the taker's record was the lease's only one) or ("refused", why)."""
        from pipeline.lease import LeaseHeld, RunLease

        try:
            with RunLease(storage.location(runs), "leased", stale_after=stale_after) as taker:
                alone = storage.location(runs).list("leased.lease") == [taker.name.rpartition("/")[2]]
                return "took", str(alone)
        except LeaseHeld as held:
            return "refused", str(held)

    holder = Holder.options(**on_node(node_a)).remote()
    pid = ray.get(holder.pid.remote())
    outcome, why = ray.get(contend.options(**on_node(node_b)).remote(90.0))
    assert outcome == "refused" and f"pid {pid} on host" in why, why
    time.sleep(2.1)  # past the stale age by the store's clock (S3 stamps whole seconds)
    assert ray.get(contend.options(**on_node(node_b)).remote(1.0)) == ("took", "True")
    assert ray.get(holder.lost.remote(12.0)), "node A's holder never noticed it lost the run"
    ray.get(holder.release.remote())
    assert storage.location(runs).list("leased.lease") == [], "the old holder wrote its record back"


def test_a_ray_run_whose_lease_another_job_takes_ends_without_writing(cluster, tmp_path: Path):
    """The driver (this process, on the head) holds the run's lease in the store. At step 5 a
    job on rank 1's node takes the lease over, as it would a stale one; rank 0, on another node,
    sees it within stop_poll_seconds, the ranks stop at an agreed step before the next
    checkpoint, and the driver raises LeaseLost (the CLI's exit 3). Nothing is written after
    the takeover: no checkpoint past step 4, and the driver never writes its record back."""
    from pipeline.lease import RunLease
    from pipeline.stopping import LeaseLost

    runs = storage.join(cluster.s3_base, "leased-fit")
    cfg = small_config(
        tmp_path, run={"name": "taken"}, runtime={"runner": "ray", "storage_path": runs},
        train={"steps": 400, "global_batch_size": 16, "max_failures": 0},
        checkpoint={"every": 4, "keep": 10, "stop_check_every": 1, "stop_poll_seconds": 0.2},
        scaling={"num_workers": 2, "cpus_per_worker": 1},
    )  # fmt: skip
    taker_ids = tmp_path / "taker"

    def take_the_lease_at_step_5(rank: int, step: int) -> None:
        if rank == 1 and step == 5 and not taker_ids.exists():
            taker = RunLease(storage.location(runs), "taken", stale_after=1.0)  # the driver's record is older
            taker.acquire()
            taker_ids.write_text(f"{taker.name}\n{ray.get_runtime_context().get_node_id()}")
            time.sleep(1.0)  # rank 0's poll sees it before the ranks agree on step 5

    # No beat during the test (the first is 60 s away): the taker's only evidence is the record's age.
    with RunLease(storage.location(runs), "taken", heartbeat_every=60.0) as lease:
        with pytest.raises(LeaseLost) as lost:
            ray_runner.run(plan(cfg, lease=lease.token), train_fn=traced_worker(tmp_path, each_step=take_the_lease_at_step_5))
    taker_name, taker_node = taker_ids.read_text().split("\n")
    assert taker_node in cluster.nodes
    assert 5 <= lost.value.step < 8, lost.value.step
    checkpoints = storage.location(storage.join(runs, "taken/checkpoints"))
    assert [n for n in checkpoints.list() if n.startswith("step-")] == ["step-00000004"]
    assert checkpoints.read_text("LATEST").strip() == "step-00000004"
    # Only the taker's record is left: the driver's release found the lease someone else's.
    assert storage.location(runs).list("taken.lease") == [taker_name.rpartition("/")[2]]


def test_a_store_that_freezes_under_a_ray_run_ends_it_within_a_bound_and_the_rerun_resumes(cluster, tmp_path: Path, monkeypatch):
    """The store stops answering (SIGSTOP of the S3 server) while two workers on two nodes
    train, after the step-4 checkpoint: the run ends within FAULT_DEADLINE_S, naming the store
    and the operation, and no process waits on the store for ever (Ray Train's own requests
    included). Once the store answers again, step 4 verifies and a rerun starts from it."""
    from pipeline.checkpoint import CheckpointManager

    for name, value in FAULT_BOUNDS.items():
        monkeypatch.setenv(name, value)  # the driver's requests
    endpoint = cluster.s3_base.partition("endpoint_override=")[2].partition("&")[0]
    server = int(subprocess.check_output(["pgrep", "-f", f"moto_server -H 127.0.0.1 -p {endpoint.rpartition(':')[2]}"]).split()[0])
    cfg = small_config(
        tmp_path, run={"name": "frozen"}, runtime={"runner": "ray", "storage_path": cluster.s3_base},
        train={"steps": 100_000, "global_batch_size": 16, "max_failures": 0},
        checkpoint={"every": 4, "keep": 2, "stop_poll_seconds": 1}, logging={"every": 4, "samples_every": 1000},
        scaling={"num_workers": 2, "cpus_per_worker": 1},
    )  # fmt: skip
    frozen_at = tmp_path / "frozen-at"

    def bounded_as_the_driver(rank: int, loop_config: dict) -> None:
        os.environ.update(FAULT_BOUNDS)  # as the nodes' environment would set them

    def freeze_the_store_at_step_6(rank: int, step: int) -> None:
        if rank == 0 and step == 6 and not frozen_at.exists():
            frozen_at.write_text(str(time.time()))
            os.kill(server, signal.SIGSTOP)

    try:
        with pytest.raises(ray_runner.RunFailed) as failed:
            ray_runner.run(plan(cfg), train_fn=traced_worker(tmp_path, before=bounded_as_the_driver, each_step=freeze_the_store_at_step_6))
        took = time.time() - float(frozen_at.read_text())
    finally:
        os.kill(server, signal.SIGCONT)
    print(f"a frozen store ended the Ray run {took:.1f} s after it froze")
    assert f"object store s3://dcgan-test at {endpoint}:" in str(failed.value), str(failed.value)
    assert took < FAULT_DEADLINE_S, took
    latest = CheckpointManager(storage.join(cfg.run_address, "checkpoints"), keep=2).latest()
    assert latest is not None and latest.step == 4
    assert plan(cfg).start == latest.address  # the rerun resumes there


def kill_my_node() -> None:
    """What a crashed or reclaimed-without-notice node looks like: SIGKILL to its raylet (this
    worker's parent) and to this worker."""
    raylet = os.getppid()
    assert "raylet" in Path(f"/proc/{raylet}/cmdline").read_text(), "a Ray worker's parent is its node's raylet"
    os.kill(raylet, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def test_an_elastic_run_goes_on_with_the_nodes_left_and_grows_back_when_one_joins(cluster, tmp_path: Path):
    """`scaling.num_workers: [1, 2]`, one CPU per worker, two nodes. Rank 1's node is SIGKILLed
    (raylet and worker) at step 6: Ray restarts the run on the one node left, from the last
    checkpoint (step 4), charging one failure. A node then joins: at its next resize check Ray
    restarts the run on two workers again, from the newest checkpoint (not a failure), and it
    ends at train.steps. Each attempt trained on the global batches an uninterrupted run trains
    on, from the step it resumed at; TensorBoard holds every step once. (Ray sizes an elastic
    group by the nodes' resources, not by what other tasks hold of them: the cluster itself is
    made two nodes.)"""
    import threading

    from pipeline.data import EpochSharder

    while len(cluster.nodes) > 2:
        cluster.remove_node(next(iter(cluster.nodes)))
    traces = tmp_path / "traces"
    traces.mkdir()
    steps, batch = 60, 16
    cfg = small_config(
        tmp_path, run={"name": "elastic"}, runtime={"runner": "ray", "storage_path": cluster.s3_base},
        train={"steps": steps, "global_batch_size": batch, "max_failures": 1},
        checkpoint={"every": 4, "keep": 2}, logging={"every": 1, "samples_every": 1000},
        scaling={"num_workers": [1, 2], "cpus_per_worker": 1, "resize_check_seconds": 1},
    )  # fmt: skip

    def record_attempt(rank: int, loop_config: dict) -> None:
        import ray.train

        from pipeline.job import Job

        resumed = Job(**loop_config["job"])._start(restored_address())  # what the session resumes
        start = resumed.step if resumed else 0
        world = ray.train.get_context().get_world_size()
        node = ray.get_runtime_context().get_node_id()
        attempt = {"rank": rank, "world": world, "start": start, "node": node, "pid": os.getpid()}
        (traces / f"attempt-{time.time_ns()}-rank{rank}.json").write_text(json.dumps(attempt))

    def kill_rank_1_at_step_6_then_pace_the_single_worker(rank: int, n: int) -> None:
        if rank == 1 and n == 6 and not (traces / "killed").exists():
            (traces / "killed").write_text(ray.get_runtime_context().get_node_id())
            kill_my_node()
        if ray.train.get_context().get_world_size() == 1:
            (traces / f"single-{n}").touch()
            time.sleep(0.5)  # one worker must not finish before the node that joins is seen

    def add_a_node_when_one_worker_trains() -> None:
        deadline = time.monotonic() + 300
        while len(list(traces.glob("single-*"))) < 3:  # a few steps on one worker first
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        joined.append(cluster.add_node())
        # Ray's autoscaling coordinator reads the cluster's nodes every 20 s (its TICK_INTERVAL_S);
        # asked now, it reserves the new node for the run at once: a resize check away.
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        ray.get(coordinator.get_reserved_resources.remote("dcgan-test", recompute=True))

    joined: list[str] = []
    adder = threading.Thread(target=add_a_node_when_one_worker_trains, daemon=True)
    adder.start()
    try:
        worker = traced_worker(traces, before=record_attempt, each_step=kill_rank_1_at_step_6_then_pace_the_single_worker,
                               record_each_step=True)  # fmt: skip
        metrics = ray_runner.run(plan(cfg), train_fn=worker)
    finally:
        adder.join(timeout=60)
        killed = (traces / "killed").read_text() if (traces / "killed").exists() else None
        if killed in cluster.nodes:
            cluster.remove_node(killed)  # its processes are gone; the harness forgets it
    assert metrics["step"] == steps and len(joined) == 1

    records = [json.loads(p.read_text()) for p in sorted(traces.glob("attempt-*.json"), key=lambda p: int(p.name.split("-")[1]))]
    attempts = [r for r in records if r["rank"] == 0]
    assert [a["world"] for a in attempts] == [2, 1, 2], records
    first_nodes = {r["node"] for r in records if r["start"] == 0}
    assert len(first_nodes) == 2  # one worker per node
    assert attempts[1]["start"] == 4  # the last checkpoint before the kill at step 6
    assert attempts[1]["node"] in first_nodes and attempts[1]["node"] in cluster.nodes  # the node left
    grown = {r["node"] for r in records if r["start"] == attempts[2]["start"] and r["world"] == 2}
    assert attempts[1]["start"] <= attempts[2]["start"] < steps and grown == {attempts[1]["node"], joined[0]}

    # Each attempt, from the step it resumed at, trained on the global batches of an
    # uninterrupted run, split over its ranks.
    expected = EpochSharder(256, batch, cfg.train.seed)
    global_batches = [np.sort(next(expected)) for _ in range(steps)]
    for attempt in attempts:
        ranks = [r for r in records if r["start"] == attempt["start"] and r["world"] == attempt["world"]]
        traced = [np.load(traces / f"rank{r['rank']}-pid{r['pid']}.npy") for r in ranks]
        trained = min(len(t) for t in traced)
        assert trained > 0, attempt
        for n in range(trained):
            step_batch = np.sort(np.concatenate([t[n] for t in traced]))
            assert np.array_equal(step_batch, global_batches[attempt["start"] + n]), (attempt, n)

    # TensorBoard: every step once, in order (a resumed attempt hides what its predecessor logged past its start).
    events = tmp_path / "tb"
    storage.location(cfg.run_address).download("tb", events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars(tb.TAG_LOSS_D)] == list(range(1, steps + 1))
