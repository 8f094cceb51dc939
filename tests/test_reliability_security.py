"""Security surfaces: shared memory, listening sockets, the API key, secrets on command lines, prompt logging.

What must hold (docs/RELIABILITY.md): shared-memory segments are 0600, owned by the server's user and named with 128
random bits per segment; the worker and the sidecar listen only on unix sockets in a private (0700) folder and
every TCP listener is on loopback by default; the API key is compared in constant time and never appears on a
command line; no log line carries prompt text unless the gateway was started with --log-prompts.
(Wrong and missing keys giving UNAUTHENTICATED, and TLS, are end-to-end tests in tests/test_e2e_gateway.py and
tests/test_openai_http.py.)
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neoserve.shm_ring import SegmentName
from neoserve.v1 import inference_service_pb2 as pb
from neoserve.v1 import inference_service_pb2_grpc as pb_grpc
from tests.test_reliability_common import SHM_PREFIX, process_uid_mode

pytest_plugins = ["tests.test_reliability_common"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent


# --- shared memory ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_shared_memory_segments_are_private_and_unguessable(reliability_server):
    server = reliability_server
    segments = server.segments()
    assert len(segments) == 2, segments  # the sidecar's request and response rings
    tokens = set()
    for name in segments:
        uid, mode = process_uid_mode(f"/dev/shm/{name}")
        assert (uid, mode) == (os.getuid(), 0o600), (name, oct(mode))
        parsed = SegmentName.parse(name, SHM_PREFIX)
        assert parsed.pid == server.pids["sidecar"]
        assert len(parsed.token) == 32 and int(parsed.token, 16) >= 0  # 128 random bits
        tokens.add(parsed.token)
    assert len(tokens) == 2


# --- listening sockets ------------------------------------------------------------------------------------------------

def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _ip(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    # NOTE: /proc/net/tcp* prints each 32-bit word of the address in host (little-endian) order.
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def tcp_listeners(pid: int) -> list[tuple[str, int]]:
    inodes, found = _socket_inodes(pid), []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                addr, port = fields[1].split(":")
                found.append((str(_ip(addr)), int(port, 16)))
    return found


def unix_listeners(pid: int) -> list[str]:
    inodes, found = _socket_inodes(pid), []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON
            found.append(fields[7])
    return found


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.mark.slow
def test_internal_services_listen_only_on_private_unix_sockets(reliability_server):
    server = reliability_server
    run_dir = server.handle.run_dir
    assert process_uid_mode(run_dir) == (os.getuid(), 0o700)
    pids = server.pids
    for name in ("worker", "sidecar"):
        assert tcp_listeners(pids[name]) == [], f"the {name} listens on TCP"
        paths = unix_listeners(pids[name])
        assert paths and all(p.startswith(run_dir + "/") for p in paths), (name, paths)
    public = tcp_listeners(pids["gateway"])  # gRPC, /metrics, OpenAI HTTP
    assert len(public) >= 2 and all(_loopback(ip) for ip, _ in public), public


def test_network_defaults_are_loopback():
    from cpu_attn.__main__ import parse_args as sidecar_args
    from gateway.config import GatewayConfig
    from gateway.launcher import ServeConfig
    from gpu_worker.server import WorkerServerConfig

    gw = GatewayConfig()
    assert (ServeConfig().host, gw.host, gw.metrics_host) == ("127.0.0.1",) * 3
    assert WorkerServerConfig().listen.startswith("127.0.0.1:")
    assert sidecar_args([]).control_address.startswith("127.0.0.1:")


# --- the API key ------------------------------------------------------------------------------------------------------

def test_api_key_is_compared_in_constant_time(monkeypatch):
    """Every presented key goes through hmac.compare_digest (whose time does not depend on where the first wrong
    byte is); a wrong key of the right length, a prefix and a longer key are all refused."""
    import gateway.auth as auth

    calls = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    check = auth.ApiKeyCheck("s3cret-key")
    cases = {"s3cret-key": True, "s3cret-kez": False, "s3cret": False, "s3cret-key-and-more": False, "": False}
    for given, allowed in cases.items():
        for metadata in ((("authorization", f"Bearer {given}"),), (("x-api-key", given),)):
            n = len(calls)
            assert check.allowed(metadata) is allowed, (given, metadata)
            assert len(calls) == n + 1 and calls[-1] == (given.encode(), b"s3cret-key")
    assert check.allowed(()) is False and check.allowed((("authorization", "s3cret-key"),)) is False


def test_launcher_keeps_the_key_off_command_lines_and_passes_log_prompts_and_tls(tmp_path):
    from gateway.launcher import Launcher, ServeConfig

    key = "k-" + secrets.token_hex(8)
    cert, tls_key = tmp_path / "cert.pem", tmp_path / "key.pem"
    for config, log_prompts in ((ServeConfig(api_key=key, log_prompts=True, tls_cert=str(cert),
                                             tls_key=str(tls_key)), True), (ServeConfig(), False)):
        launcher = Launcher(config, [], engine_model=None, engine_mode="auto", engine_device="cpu")
        try:
            for child in launcher.children:
                assert not any(key in arg for arg in child.spec.argv), child.spec.name  # `ps` shows argv
            gateway = launcher.child("gateway").spec
            assert ("--log-prompts" in gateway.argv) is log_prompts
            if config.api_key:
                assert gateway.env["NEOSERVE_API_KEY"] == key
                assert gateway.argv[gateway.argv.index("--tls-cert") + 1] == str(cert)
                assert gateway.argv[gateway.argv.index("--tls-key") + 1] == str(tls_key)
            assert all("NEOSERVE_API_KEY" not in c.spec.env for c in launcher.children if c.spec.name != "gateway")
        finally:
            shutil.rmtree(launcher.run_dir, ignore_errors=True)


# --- prompt text in logs ----------------------------------------------------------------------------------------------

def _send_marked_requests(address: str, http_port: int | None, marker: str) -> None:
    """The marker in every place a prompt can travel: text, chat, stop strings, invalid and cut-short requests,
    Tokenize, an undecodable payload, and the OpenAI HTTP API."""
    prompt = f"Please repeat the word {marker} twice."
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        requests = [
            pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParameters(max_tokens=2, temperature=0)),
            pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=prompt)]),
                               sampling=pb.SamplingParameters(max_tokens=2, stop=[marker])),
            pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParameters(temperature=-1)),  # INVALID_ARGUMENT
            pb.GenerateRequest(prompt=prompt * 2000),  # longer than the context: INVALID_ARGUMENT
        ]
        for req in requests:
            try:
                list(stub.Generate(req, timeout=60))
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        with pytest.raises(grpc.RpcError):  # cut short by its deadline
            list(stub.Generate(pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParameters(
                max_tokens=2000, ignore_eos=True)), timeout=1.5))
        stub.Tokenize(pb.TokenizeRequest(text=prompt), timeout=30)
        raw = b"\x0a" + bytes([len(prompt) + 2]) + prompt.encode() + b"\xff\xfe"  # prompt + invalid UTF-8
        with pytest.raises(grpc.RpcError):
            list(channel.unary_stream("/neoserve.v1.InferenceService/Generate")(raw, timeout=30))
    if http_port:
        base = f"http://127.0.0.1:{http_port}/v1"
        with urllib.request.urlopen(base + "/models", timeout=30) as resp:
            model = json.loads(resp.read())["data"][0]["id"]
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 2}).encode()
        req = urllib.request.Request(base + "/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200


def _gateway(worker_address: str, tmp: Path, *flags: str) -> tuple[subprocess.Popen, str, Path]:
    port_file, log_file = tmp / "gateway.json", tmp / "gateway.log"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    with open(log_file, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "--port", "0", "--metrics-port", "-1",
                                 "--worker-address", worker_address, "--model", "embedded", "--port-file",
                                 str(port_file), "--health-interval-s", "0.2", *flags], env=env, stderr=log)
    deadline = time.monotonic() + 60
    address = None
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, log_file.read_text()[-3000:]
        if address is None and port_file.exists():
            address = f"127.0.0.1:{json.loads(port_file.read_text())['port']}"
        if address is not None:
            with grpc.insecure_channel(address) as channel:
                try:
                    if health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status \
                            == health_pb2.HealthCheckResponse.SERVING:
                        return proc, address, log_file
                except grpc.RpcError:
                    pass
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_prompt_text_is_never_logged_unless_asked(reliability_server, tmp_path):
    server = reliability_server
    marker = "Quokka" + secrets.token_hex(6)
    _send_marked_requests(server.address, server.handle.http_port, marker)
    server.wait_idle()
    log = server.handle.log_path.read_bytes()  # the launcher's and every child's output
    assert marker.encode() not in log and marker.lower().encode() not in log.lower()

    # The most verbose gateway still logs no prompt text, only its size ...
    proc, address, log_file = _gateway(server.handle.worker_address, tmp_path, "--log-level", "DEBUG")
    try:
        _send_marked_requests(address, None, marker)
    finally:
        _stop(proc)
    debug_log = log_file.read_text(errors="replace")
    assert "prompt tokens" in debug_log  # the capture works: the requests were logged ...
    assert marker not in debug_log  # ... without their text

    # ... and --log-prompts is the switch that turns it on.
    (tmp_path / "on").mkdir()
    proc, address, log_file = _gateway(server.handle.worker_address, tmp_path / "on", "--log-prompts")
    try:
        with grpc.insecure_channel(address) as channel:
            list(pb_grpc.InferenceServiceStub(channel).Generate(pb.GenerateRequest(
                prompt=f"Please repeat the word {marker} twice.", sampling=pb.SamplingParameters(max_tokens=1)),
                timeout=60))
    finally:
        _stop(proc)
    assert marker in log_file.read_text(errors="replace")
    server.wait_idle()
