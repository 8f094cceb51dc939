"""deploy/kubernetes/: the manifests pass the Kubernetes schemas of a current release (kubernetes-validate, offline,
strict: no unknown field), and they wire what the design needs: worker and sidecar in one pod sharing a
memory-backed /dev/shm, the GPU on the worker, the sidecar's cores given by its requests, probes on
grpc.health.v1, disruption budgets that select the pods, and a gateway that discovers the workers through the
headless Service by the name and port it really has.
"""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from gateway.health_names import PUBLIC_SERVICE

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.37.0"  # NOTE: the newest schemas kubernetes-validate ships; bump with it


def _documents() -> list[dict]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(kind: str, name: str) -> dict:
    [doc] = [d for d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@pytest.mark.parametrize("doc", _documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_passes_the_kubernetes_schema(doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_an_invalid_manifest_fails_the_schema():
    """The check can fail: a misspelt field is refused."""
    doc = _one("StatefulSet", "neoserve-worker")
    doc["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_worker_and_sidecar_share_a_memory_backed_dev_shm_in_one_pod():
    pod = _one("StatefulSet", "neoserve-worker")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"worker", "sidecar"}
    [shm] = [v for v in pod["volumes"] if v["name"] == "shm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    for c in containers.values():
        assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    worker, sidecar = containers["worker"], containers["sidecar"]
    # The worker reaches the sidecar on the pod's loopback, at the address the sidecar listens on.
    assert _flag(worker["command"], "--sidecar") == _flag(sidecar["command"], "--control-address") \
        == "127.0.0.1:50071"


def test_the_gpu_goes_to_the_worker_and_the_sidecar_gets_whole_cores_of_its_own():
    pod = _one("StatefulSet", "neoserve-worker")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    worker, sidecar = containers["worker"], containers["sidecar"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in sidecar["resources"].get("limits", {})
    threads = int(_flag(sidecar["command"], "--threads"))
    for c in (worker, sidecar):  # Guaranteed QoS with whole cores: the static CPU manager pins them
        assert c["resources"]["requests"] == c["resources"]["limits"]
        assert float(c["resources"]["requests"]["cpu"]).is_integer()
    assert int(sidecar["resources"]["requests"]["cpu"]) == threads
    assert int(worker["resources"]["requests"]["cpu"]) == int(_flag(worker["command"], "--threads"))
    kv_gib = float(_flag(sidecar["command"], "--kv-cache-gib"))
    assert float(sidecar["resources"]["limits"]["memory"].removesuffix("Gi")) > kv_gib


def test_probes_use_grpc_health_on_the_ports_that_listen():
    pod = _one("StatefulSet", "neoserve-worker")["spec"]["template"]["spec"]
    worker = next(c for c in pod["containers"] if c["name"] == "worker")
    port = int(_flag(worker["command"], "--listen").rsplit(":", 1)[1])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["grpc"]["port"] == port
    gateway = _one("Deployment", "neoserve-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["grpc"] == {"port": int(_flag(gateway["command"], "--port")),
                                                 "service": PUBLIC_SERVICE}


def test_the_gateway_discovers_the_workers_through_the_headless_service():
    headless = _one("Service", "neoserve-worker")
    statefulset = _one("StatefulSet", "neoserve-worker")
    assert headless["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == headless["metadata"]["name"]
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= labels.items()
    gateway = _one("Deployment", "neoserve-gateway")["spec"]["template"]["spec"]["containers"][0]
    target = _flag(gateway["command"], "--backend-dns")
    namespace = headless["metadata"]["namespace"]
    assert target == f"{headless['metadata']['name']}.{namespace}.svc.cluster.local:{headless['spec']['ports'][0]['port']}"
    from gateway.config import GatewayConfig

    GatewayConfig(backend_dns=target)  # the gateway accepts it


def test_disruption_budgets_and_services_select_their_pods():
    for name, owner in (("neoserve-worker", _one("StatefulSet", "neoserve-worker")),
                        ("neoserve-gateway", _one("Deployment", "neoserve-gateway"))):
        labels = owner["spec"]["template"]["metadata"]["labels"]
        pdb = _one("PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert owner["spec"]["replicas"] >= 2  # a budget of one unavailable leaves one serving
    public = _one("Service", "neoserve")
    gateway_labels = _one("Deployment", "neoserve-gateway")["spec"]["template"]["metadata"]["labels"]
    assert public["spec"]["selector"].items() <= gateway_labels.items()
    namespaces = {d["metadata"].get("namespace") for d in _documents() if d["kind"] != "Namespace"}
    assert namespaces == {_one("Namespace", "neoserve")["metadata"]["name"]}
