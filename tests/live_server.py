"""Pytest plugin: one real `neoserve serve` (sidecar, worker, gateway processes) shared by a whole test session.

Test modules opt in with `pytest_plugins = ["tests.live_server"]` and take the `neoserve_server` fixture. Everything
binds free ports (port 0) and unix sockets in a private folder; teardown sends SIGTERM to the launcher and checks
that it exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ServerHandle:
    proc: subprocess.Popen  # the launcher
    address: str  # public gRPC
    worker_address: str  # internal gRPC (unix socket)
    metrics_port: int | None
    run_dir: str
    state_file: Path
    log_path: Path
    http_port: int | None = None  # OpenAI-compatible HTTP API

    @property
    def http_url(self) -> str:
        """Base URL of the OpenAI API (an OpenAI SDK's base_url)."""
        return f"http://127.0.0.1:{self.http_port}/v1"

    def state(self) -> dict:
        return json.loads(self.state_file.read_text())

    @property
    def pids(self) -> dict[str, int]:
        return self.state()["pids"]

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


def start_server(extra_args: list[str], workdir: Path, timeout: float = 300.0,
                 env: dict[str, str] | None = None) -> ServerHandle:
    """`neoserve serve` on free ports; `env` adds to this process's environment (the launcher's children inherit it)."""
    state_file = workdir / "state.json"
    log_path = workdir / "serve.log"
    argv = [sys.executable, "-m", "cli", "serve", "--port", "0", "--metrics-port", "0", "--http-port", "0",
            "--state-file", str(state_file), *extra_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT), **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT)
    state = _wait_for_file(state_file, proc, log_path, timeout, "neoserve serve")
    return ServerHandle(proc, state["address"], state["worker_address"], state["metrics_port"], state["run_dir"],
                        state_file, log_path, state.get("http_port"))


def _wait_for_file(path: Path, proc: subprocess.Popen, log_path: Path, timeout: float, what: str) -> dict:
    """The JSON a starting process writes once it listens; kills it and raises with its log if that never comes."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{what} did not come up:\n{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.1)
    return json.loads(path.read_text())


def stop_server(handle: ServerHandle, timeout: float = 60.0) -> int:
    if handle.proc.poll() is None:
        handle.proc.send_signal(signal.SIGTERM)
    try:
        return handle.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        handle.proc.kill()
        return handle.proc.wait()


def pid_alive(pid: int) -> bool:
    """Whether the process runs: a zombie (Z) or dead (X) one that its parent has not reaped yet does not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[-1][0] not in "ZX"
    except FileNotFoundError:
        return False


def leftovers(state: dict) -> list[str]:
    """What a stopped server left behind: live child processes, its run folder, its /dev/shm segments."""
    found = [f"process {name} (pid {pid})" for name, pid in state["pids"].items() if pid and pid_alive(pid)]
    if Path(state["run_dir"]).exists():
        found.append(f"folder {state['run_dir']}")
    pids = {str(p) for p in state["pids"].values() if p}
    if os.path.isdir("/dev/shm"):
        found += [f"/dev/shm/{e}" for e in os.listdir("/dev/shm") if e.startswith("neoserve-")
                  and e.split("-")[1] in pids]
    return found


@contextlib.contextmanager
def running_server(extra_args: list[str], prefix: str = "neoserve-test-",
                   env: dict[str, str] | None = None) -> Iterator[ServerHandle]:
    """A server for the body; on exit stops it with SIGTERM and fails if a process, folder or segment is left."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        handle = start_server(extra_args, Path(tmp), env=env)
        try:
            yield handle
        finally:
            state = handle.state()
            code = stop_server(handle)
            left = leftovers(state)
            assert code == 0 and not left, f"launcher exit {code}; left behind: {left}\n{handle.log_tail()}"


@pytest.fixture(scope="session")
def neoserve_server():
    """The running server shared by the session's end-to-end tests."""
    # NOTE: --dtype float32, the exact path: the default CPU path picks its weights by batch size (cpu_formats.py), so
    # its greedy tokens depend on what else is running, and these tests compare tokens with a reference engine.
    with running_server(["--worker-threads", "1", "--drain-timeout-s", "5", "--dtype", "float32"]) as handle:
        yield handle


# --- shared helpers of the end-to-end tests --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def neoserve_reference_engine():
    """The engine in the test process on the test servers' exact path: the reference for generated tokens."""
    import torch

    from gpu_worker.config import EngineConfig
    from gpu_worker.engine import LLMEngine

    torch.set_num_threads(1)
    return LLMEngine(EngineConfig(threads=1, dtype="float32"))


def engine_generate(engine, prompts: list[list[int]], params) -> list[tuple[list[int], str]]:
    """Runs the prompts to completion in an in-process engine: (token ids, finish reason) each."""
    ids = {f"ref-{i}-{time.monotonic_ns()}": i for i in range(len(prompts))}
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    reasons: dict[int, str] = {}
    for rid, i in ids.items():
        engine.add_request(rid, prompts[i], params)
    while engine.has_unfinished():
        for o in engine.step():
            out[ids[o.request_id]] += o.new_token_ids
            if o.finished:
                reasons[ids[o.request_id]] = o.finish_reason.value
    return [(out[i], reasons[i]) for i in range(len(prompts))]


def worker_stats(worker_address: str, timeout: float = 5.0):
    """The worker's StatsResponse (open requests, KV blocks and bytes in use)."""
    import grpc

    from neoserve.internal.v1 import worker_pb2, worker_pb2_grpc

    with grpc.insecure_channel(worker_address) as channel:
        return worker_pb2_grpc.WorkerServiceStub(channel).Stats(worker_pb2.StatsRequest(), timeout=timeout)


def wait_kv_idle(worker_address: str, timeout: float = 10.0):
    """Waits until the worker holds no request and no KV cache; fails the test if it does not in time."""
    deadline = time.monotonic() + timeout
    while True:
        s = worker_stats(worker_address)
        if s.num_open_requests == 0 and s.num_running == 0 and s.num_waiting == 0 and s.gpu_kv_blocks_used == 0 \
                and s.cpu_kv_bytes_used == 0:
            return s
        if time.monotonic() > deadline:
            pytest.fail(f"KV not freed: {s}")
        time.sleep(0.05)


def start_gateway(worker_address: str, workdir: Path, *extra_args: str, api_key: str | None = None,
                  model: str | None = "embedded") -> tuple[subprocess.Popen, dict]:
    """A second gateway process (free ports) in front of a running worker; returns it and its port file's content.
    `model=None` leaves the tokenizer to whatever model the worker serves. The caller stops it (SIGTERM) and waits
    for it."""
    port_file = workdir / "gateway.json"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    if api_key:
        env["NEOSERVE_API_KEY"] = api_key
    log_path = workdir / "gateway.log"
    model_args = ["--model", model] if model else []
    with open(log_path, "wb") as log:  # NOTE: a file, not a pipe: a full pipe would block the gateway's logging
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "--port", "0", "--metrics-port", "-1",
                                 "--worker-address", worker_address, *model_args, "--port-file",
                                 str(port_file), "--health-interval-s", "0.2", *extra_args],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, _wait_for_file(port_file, proc, log_path, 60.0, "the gateway")


def health_status(address: str) -> int:
    """The gateway's health status, or NOT_SERVING when nothing answers (a gateway that is down serves nobody)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), e
            return health_pb2.HealthCheckResponse.NOT_SERVING


def wait_health(address: str, status: int, timeout: float) -> float:
    """Seconds until the gateway's health is `status`; fails the test if it is not within `timeout`."""
    start = time.monotonic()
    while health_status(address) != status:
        assert time.monotonic() - start < timeout, f"health never became {status} in {timeout} s"
        time.sleep(0.1)
    return time.monotonic() - start
