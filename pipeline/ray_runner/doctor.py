"""`dcgan doctor`: what a cluster run needs, checked before it spends cluster time.

One line per check, each problem with its fix. On the cluster, a Ray task on every alive node
reports that node's frameworks, whether it reaches the run's storage and the prepared data
(the same nonce probe a job's workers make before their first step), and the free disk of its
node-local cache. Exit 0 only when every check passes.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import shutil
from dataclasses import dataclass
from typing import Any, Optional

from pipeline import storage
from pipeline.config import Config
from pipeline.ray_runner.probes import Probe, StorageNotShared, check_probes, remove_probes, this_node, write_probes

log = logging.getLogger(__name__)

# A node caches the prepared shards of a URI and the checkpoints it resumes from.
MIN_FREE_CACHE_BYTES = 2 * 1024**3


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        return f"{mark} {self.name}: {self.detail}" + ("" if self.ok else f"\n     fix: {self.fix}")


def frameworks(backend: str) -> dict[str, str]:
    """The versions that must agree on every node: Python, Ray, this package and the backend's framework."""
    packages = ["ray", "dcgan-pipeline", "tensorflow" if backend == "tensorflow" else "torch"]
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "missing"
    return found


def node_report(probes: list[Probe], backend: str) -> dict[str, Any]:
    """On one node (a Ray task): its versions, its storage check, its cache's free disk."""
    report: dict[str, Any] = {"node": this_node(), "versions": frameworks(backend), "storage": None}
    try:
        import ray

        check_probes(probes, f"doctor-{ray.get_runtime_context().get_node_id()[:12]}")
    except StorageNotShared as err:
        report["storage"] = str(err)
    cache = storage.cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    report["cache"], report["free"] = str(cache), shutil.disk_usage(cache).free
    return report


def run_checks(cfg: Config, address: Optional[str]) -> list[Check]:
    import ray

    checks = [_prepared_data(cfg)]
    mine = frameworks(cfg.backend)
    connected_here = not ray.is_initialized()
    target = address or cfg.runtime.ray_address or "auto"
    try:
        if connected_here:
            ray.init(address=target, logging_level=logging.WARNING)
    except Exception as err:  # Ray raises ConnectionError, RuntimeError, auth errors...
        checks.append(Check("ray", False, f"cannot connect to {target}: {str(err).strip().splitlines()[-1]}",
                            "start the head (launch/head.sh start), pass --address HOST:PORT, and give this "
                            "client the cluster's token (~/.ray/auth_token, RAY_AUTH_TOKEN) with RAY_AUTH_MODE=token"))  # fmt: skip
        return checks
    try:
        checks.append(Check("ray", True, f"connected to {target} (Ray {ray.__version__})"))
        nodes = [n for n in ray.nodes() if n["Alive"]]
        checks.append(_resources(cfg, nodes))
        checks.extend(_per_node(cfg, nodes, mine))
    finally:
        if connected_here:
            ray.shutdown()
    return checks


def _prepared_data(cfg: Config) -> Check:
    from pipeline.data.shards import MANIFEST

    address = cfg.data.resolved_prepared_dir()
    try:
        prepared = storage.location(address).exists(MANIFEST)
    except OSError as err:
        return Check("prepared data", False, f"{storage.redacted(address)}: {err}", "check the store and its credentials here")
    if prepared:
        return Check("prepared data", True, f"{storage.redacted(address)}/{MANIFEST}")
    return Check("prepared data", False, f"no {MANIFEST} in {storage.redacted(address)}",
                 "dcgan prepare --config <this config> (a run prepares it on its driver otherwise, before training)")  # fmt: skip


def _resources(cfg: Config, nodes: list[dict]) -> Check:
    """Whole workers per node (a worker does not span nodes), against scaling's range."""
    scaling = cfg.scaling
    need = {"CPU": scaling.cpus_per_worker, **({"GPU": 1.0} if scaling.use_gpu else {})}
    fits = sum(int(min(node["Resources"].get(kind, 0.0) // amount for kind, amount in need.items())) for node in nodes)
    wanted = f"{scaling.min_workers}..{scaling.max_workers}" if scaling.elastic else str(scaling.max_workers)
    detail = f"{len(nodes)} node(s) hold {fits} worker(s) of {need}; scaling.num_workers wants {wanted}"
    if fits >= scaling.max_workers:
        return Check("resources", True, detail)
    if fits >= scaling.min_workers:
        return Check("resources", True, detail + f" (the elastic run starts on {fits} and grows as nodes join)")
    return Check("resources", False, detail,
                 "add nodes (launch/node.sh start HEAD_ADDRESS), or lower scaling.num_workers / scaling.cpus_per_worker")  # fmt: skip


def _per_node(cfg: Config, nodes: list[dict], mine: dict[str, str]) -> list[Check]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probes = write_probes([cfg.run_address, cfg.data.resolved_prepared_dir()])
    task = ray.remote(num_cpus=0, max_retries=0)(node_report)
    try:
        pending = {
            node["NodeID"]: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(probes, cfg.backend)
            for node in nodes
        }  # fmt: skip
        reports = {}
        for node_id, ref in pending.items():
            try:
                reports[node_id] = ray.get(ref, timeout=120)
            except Exception as err:  # the task could not run there: the node's Python cannot import us
                reports[node_id] = {"node": f"Ray node {node_id[:12]}", "error": str(err).strip().splitlines()[-1]}
    finally:
        remove_probes(probes)
    checks = []
    for node_id, report in reports.items():
        where = report["node"]
        if "error" in report:
            checks.append(Check(where, False, f"a task could not run there: {report['error']}",
                                "install this project on the node (make install; the same Python as the head)"))  # fmt: skip
            continue
        differing = {k: v for k, v in report["versions"].items() if v != mine.get(k)}
        checks.append(Check(f"{where} versions", not differing,
                            ", ".join(f"{k} {v}" for k, v in report["versions"].items()) if not differing
                            else ", ".join(f"{k} {v} (here {mine.get(k)})" for k, v in differing.items()),
                            "install the same versions on every node (one image, or make install from one commit)"))  # fmt: skip
        checks.append(Check(f"{where} storage", report["storage"] is None,
                            report["storage"] or "reads the run's and the data's storage, writes the run's",
                            "give the node the storage: the same shared path, or the store's credentials in the "
                            "environment its `ray start` ran with (launch/node.sh)"))  # fmt: skip
        free = report["free"] / 1024**3
        checks.append(Check(f"{where} cache disk", report["free"] >= MIN_FREE_CACHE_BYTES,
                            f"{free:.1f} GiB free at {report['cache']}",
                            f"free at least {MIN_FREE_CACHE_BYTES / 1024**3:.0f} GiB there, or set DCGAN_CACHE_DIR on the node "
                            "to a larger disk"))  # fmt: skip
    return checks
