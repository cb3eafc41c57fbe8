"""A real multi-node Ray cluster on this machine (Ray's own harness, `ray.cluster_utils.Cluster`):
a head without CPUs for training and three worker nodes of one CPU each, every node with its
own node-local cache (`DCGAN_CACHE_DIR`), as on a real cluster. Runs live in object storage
(a real S3-compatible server on 127.0.0.1), which every node reaches."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import storage
from pipeline.job import plan
from tests.conftest import small_config
from tests.helpers import s3_server, traced_worker

ray = pytest.importorskip("ray")
from pipeline import ray_runner  # noqa: E402  (after the skip: needs ray)

pytestmark = [pytest.mark.integration, pytest.mark.ray]

WORKER_NODES = 3
# Ray Train's preemption watcher polls the cluster's draining nodes every 5 s by default.
RAY_ENV = {"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(the S3 base URI, {node id: that node's cache directory})."""
    import sys

    from ray.cluster_utils import Cluster

    caches = tmp_path_factory.mktemp("node-caches")
    # ray.init turns a loopback address into this host's address, which this sandbox cannot
    # reach: every node here listens on 127.0.0.1 (as launch/head.sh's head does).
    patch = pytest.MonkeyPatch()
    patch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
    with s3_server() as s3_base:  # first: every node's processes inherit its AWS variables
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "dashboard_host": "127.0.0.1",
            "env_vars": {**RAY_ENV, "DCGAN_CACHE_DIR": str(caches / "head")},
        })  # fmt: skip
        nodes = {}
        for index in range(WORKER_NODES):
            cache = caches / f"node{index}"
            node = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1",
                                    env_vars={**RAY_ENV, "DCGAN_CACHE_DIR": str(cache)})  # fmt: skip
            nodes[node.node_id] = cache
        cluster.wait_for_nodes()
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        ray.cloudpickle.register_pickle_by_value(sys.modules["tests.helpers"])
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", logging_level="WARNING")
        try:
            yield s3_base, nodes
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
    deadline 6 s ahead: the ranks checkpoint at the next agreed step and train on; at the
    deadline Ray restarts the group on the two nodes left, from that checkpoint (a preemption,
    which Ray does not charge to max_failures), and the run ends at train.steps."""
    s3_base, nodes = cluster
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
                (traces / "first-attempt-reached").write_text(str(step))

    def restarted(rank: int, loop_config: dict) -> None:
        where_am_i(rank, loop_config)
        if (traces / "drained").exists():
            (traces / "restarted").touch()

    metrics = ray_runner.run(plan(cfg), train_fn=traced_worker(traces, before=restarted, each_step=drain_then_pace))
    assert metrics["step"] == steps

    placements = sorted(traces.glob("node-rank*"), key=lambda p: int(p.name.rpartition("-")[2]))
    first, second = placements[:2], placements[2:]
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
    assert 4 < drain_step < first_reached < steps, (drain_step, first_reached)
    assert drain_step % cfg.checkpoint.stop_check_every == 0  # an agreed step

    checkpoints = storage.location(storage.join(cfg.run_address, "checkpoints"))
    assert f"step-{drain_step:08d}" in checkpoints.list()
    manifest = json.loads(checkpoints.read_text(f"step-{drain_step:08d}/manifest.json"))
    assert manifest["step"] == drain_step

    # Each node fetched the drain's checkpoint into its own cache for the restart.
    fetched = [nodes[node] for node in second_nodes.values()]
    assert all(any((cache / "checkpoints").glob("*")) for cache in fetched), fetched
