"""Soak: an elastic run on a 3-node cluster whose nodes are lost and come back (not CI).

Ray's own multi-node harness starts a head without CPUs and three worker nodes of one CPU on
this machine. One elastic run (`scaling.num_workers: [1, 3]`) trains on them while, every
`--every` seconds, a node is either SIGKILLed (its raylet and its workers: a crash, a spot
reclaim without notice) or drained with a deadline (a reclaim with notice), alternately; a new
node joins `--back-after` seconds later. Rank 0 records the time, step and world size of every
step it trains, so each event is measured from the run itself:

- steps lost: steps trained again after it (the last step the attempt trained, less the step
  the next attempt resumed from);
- seconds to recover: from the event to the first step of the next attempt (a drained node
  trains on until its deadline), and seconds without training: from the last step of the
  attempt to the first of the next;
- the world size before and after, and again when the run grows back.

At the end: the run reached `train.steps`, every checkpoint left verifies against its
manifest, and a PNG of step and world size over time is written beside the JSON report.

    .venv/bin/python bench/soak.py [--minutes 20] [--every 180] [--back-after 60] [--group-start-timeout S] [--out runs/bench/soak.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import config, ray_runner  # noqa: E402
from pipeline.ray_runner.worker import train_loop_per_worker  # noqa: E402
from pipeline.checkpoint import verify  # noqa: E402
from pipeline.job import plan  # noqa: E402

NODES = 3
DRAIN_DEADLINE_S = 20
RESTART_GAP_S = 5.0  # no step for this long: the group was restarted


def soak_config(runs: Path, steps: int) -> config.Config:
    return config.load(ROOT / "configs" / "dryrun.yaml", [
        "run.name=soak", f"run.dir={runs}", "runtime.runner=ray", "runtime.device=cpu",
        f"train.steps={steps}", "train.global_batch_size=48", "train.max_failures=100",
        "checkpoint.every=20", "checkpoint.keep=3", "logging.every=20", "logging.samples_every=1000",
        "scaling.num_workers=[1, 3]", "scaling.cpus_per_worker=1", "scaling.resize_check_seconds=10",
    ])  # fmt: skip


def recording_worker(trace: Path):
    """The product's worker; rank 0 appends `time step world` for every step it trains."""

    def train_fn(loop_config):
        import ray.train

        from pipeline.backends.torch_backend import TorchBackend

        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        original = TorchBackend.train_step
        with open(trace, "a", buffering=1) as out:

            def train_step(self, batch, step):
                if rank == 0:
                    out.write(f"{time.time():.3f} {step} {world}\n")
                return original(self, batch, step)

            TorchBackend.train_step = train_step
            try:
                return train_loop_per_worker(loop_config)
            finally:
                TorchBackend.train_step = original

    return train_fn


def drain(node_id: str) -> None:
    import ray
    from ray.core.generated import autoscaler_pb2

    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    deadline_ms = int((time.time() + DRAIN_DEADLINE_S) * 1000)
    accepted, why = ray._private.worker.global_worker.gcs_client.drain_node(node_id, reason, "soak", deadline_ms)
    if not accepted:
        raise RuntimeError(f"drain of {node_id} refused: {why}")


class Chaos(threading.Thread):
    """Every `every` s a node is lost (SIGKILL or drain, alternately); a new one joins later."""

    def __init__(self, cluster, add_node, every: float, back_after: float, stop: threading.Event):
        super().__init__(daemon=True)
        self.cluster, self.add_node, self.every, self.back_after, self.stop = cluster, add_node, every, back_after, stop
        self.events: list[dict] = []

    def run(self) -> None:
        kinds = ["sigkill", "drain"]
        while not self.stop.wait(self.every):
            nodes = sorted(self.cluster.worker_nodes, key=lambda n: n.node_id)
            if len(nodes) < 2:
                continue
            victim, kind = nodes[0], kinds[len(self.events) % 2]
            event = {"kind": kind, "time": time.time(), "node": victim.node_id[:12]}
            if kind == "sigkill":
                self.cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: raylet and workers
            else:
                drain(victim.node_id)
                if self.stop.wait(DRAIN_DEADLINE_S):
                    return
                self.cluster.remove_node(victim, allow_graceful=False)  # what the provider does at the deadline
            self.events.append(event)
            if self.stop.wait(self.back_after):
                return
            event["node_back"] = self.add_node()[:12]
            event["back_time"] = time.time()


def measure(events: list[dict], trace: list[tuple[float, int, int]]) -> list[dict]:
    """Each event's cost, read from rank 0's trace: the next attempt starts where the step goes
    back, the world size changes or training paused (a restart takes seconds; a step, less)."""
    for event in events:
        since = next((i for i, t in enumerate(trace) if t[0] >= event["time"]), None)
        if since is None:
            continue
        restart = next((i for i in range(max(since, 1), len(trace)) if trace[i][1] <= trace[i - 1][1]
                        or trace[i][2] != trace[i - 1][2] or trace[i][0] - trace[i - 1][0] > RESTART_GAP_S), None)  # fmt: skip
        if restart is None:
            continue
        last, first = trace[restart - 1], trace[restart]
        event["world_before"], event["world_after"] = last[2], first[2]
        event["steps_lost"] = max(0, last[1] - (first[1] - 1))  # trained, then trained again
        event["seconds_to_recover"] = round(first[0] - event["time"], 1)  # a drain trains until its deadline
        event["seconds_without_training"] = round(first[0] - last[0], 1)
        if "back_time" in event:
            grown = next((t for t in trace if t[0] >= event["back_time"] and t[2] > first[2]), None)
            event["seconds_to_grow_back"] = round(grown[0] - event["back_time"], 1) if grown else None
    return events


def plot(trace: list[tuple[float, int, int]], events: list[dict], out: Path) -> None:
    """Step (line) and world size (steps below) over time, events as vertical marks; PIL only."""
    from PIL import Image, ImageDraw

    width, height, pad = 1000, 500, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    t0, t1 = trace[0][0], trace[-1][0]
    top_step = max(t[1] for t in trace)
    x = lambda t: pad + (t - t0) / max(t1 - t0, 1e-9) * (width - 2 * pad)  # noqa: E731
    y_step = lambda s: height - 150 - s / top_step * (height - 200)  # noqa: E731
    y_world = lambda w: height - pad - w * 25  # noqa: E731
    draw.line([(x(t), y_step(s)) for t, s, _ in trace], fill="navy", width=2)
    draw.line([(x(t), y_world(w)) for t, _, w in trace], fill="darkgreen", width=2)
    for event in events:
        draw.line([(x(event["time"]), pad), (x(event["time"]), height - pad)], fill="red" if event["kind"] == "sigkill" else "orange")
        if "back_time" in event:
            draw.line([(x(event["back_time"]), pad), (x(event["back_time"]), height - pad)], fill="gray")
    draw.text((pad, 10), f"step (blue, 0..{top_step}), world size (green, 1..3); node SIGKILLed (red), "
                         f"drained (orange), node back (gray); {t1 - t0:.0f} s", fill="black")  # fmt: skip
    image.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--every", type=float, default=180, help="seconds between node losses")
    parser.add_argument("--back-after", type=float, default=60, help="seconds until a new node joins")
    parser.add_argument("--steps-per-minute", type=int, default=400, help="sets train.steps to last about --minutes")
    parser.add_argument("--group-start-timeout", type=float, default=None,
                        help="RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S on every node (Ray's default, 60 s, when unset): how "
                             "long a restart waits for workers sized before a lost node was known dead")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("runs/bench/soak.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray
    from ray.cluster_utils import Cluster

    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    ray_env = {"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}
    if args.group_start_timeout is not None:
        ray_env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(args.group_start_timeout)
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # every node on 127.0.0.1
    # No exit hooks per node: they install a SIGTERM handler, which only the main thread may, and
    # the chaos thread adds nodes. The cluster is shut down below.
    cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "dashboard_host": "127.0.0.1",
        "env_vars": ray_env,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
    })  # fmt: skip
    joined = [0]

    def add_node() -> str:
        joined[0] += 1
        cache = work / f"cache-{joined[0]}"
        node = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1",
                                env_vars={**ray_env, "DCGAN_CACHE_DIR": str(cache)})  # fmt: skip
        return node.node_id

    for _ in range(NODES):
        add_node()
    cluster.wait_for_nodes()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", logging_level="WARNING")
    cfg = soak_config(work / "runs", int(args.minutes * args.steps_per_minute))
    trace_file = work / "trace.txt"
    stop = threading.Event()
    chaos = Chaos(cluster, add_node, args.every, args.back_after, stop)
    started = time.time()
    chaos.start()
    try:
        metrics = ray_runner.run(plan(cfg), train_fn=recording_worker(trace_file))
    finally:
        stop.set()
        chaos.join(timeout=60)
        ray.shutdown()
        cluster.shutdown()
    trace = [(float(t), int(s), int(w)) for t, s, w in (line.split() for line in trace_file.read_text().splitlines())]
    checkpoints = sorted((cfg.run_dir / "checkpoints").glob("step-*"))
    verified = {}
    for checkpoint in checkpoints:
        try:
            verify(checkpoint)
            verified[checkpoint.name] = True
        except Exception as err:  # reported, not raised: the report says which failed
            verified[checkpoint.name] = f"{type(err).__name__}: {err}"
    result = {
        "group_start_timeout_s": args.group_start_timeout,
        "minutes": round((time.time() - started) / 60, 1),
        "train_steps": cfg.train.steps,
        "reached_step": metrics.get("step"),
        "events": measure(chaos.events, trace),
        "checkpoints_verified": verified,
        "trained_steps_in_all": len(trace),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(trace, chaos.events, args.out.with_suffix(".png"))
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    ok = result["reached_step"] == cfg.train.steps and all(v is True for v in verified.values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
