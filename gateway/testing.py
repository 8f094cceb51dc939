"""Pytest plugin: one real `neoserve serve` (sidecar, worker, gateway processes) shared by a whole test session.

Test modules opt in with `pytest_plugins = ["gateway.testing"]` and take the `neoserve_server` fixture. Everything
binds free ports (port 0) and unix sockets in a private folder; teardown sends SIGTERM to the launcher and checks
that it exits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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

    def state(self) -> dict:
        return json.loads(self.state_file.read_text())

    @property
    def pids(self) -> dict[str, int]:
        return self.state()["pids"]

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


def start_server(extra_args: list[str], workdir: Path, timeout: float = 300.0) -> ServerHandle:
    state_file = workdir / "state.json"
    log_path = workdir / "serve.log"
    argv = [sys.executable, "-m", "neoserve.cli", "serve", "--port", "0", "--metrics-port", "0",
            "--state-file", str(state_file), *extra_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT)
    deadline = time.monotonic() + timeout
    while not state_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"neoserve serve did not come up:\n{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.2)
    state = json.loads(state_file.read_text())
    return ServerHandle(proc, state["address"], state["worker_address"], state["metrics_port"], state["run_dir"],
                        state_file, log_path)


def stop_server(handle: ServerHandle, timeout: float = 60.0) -> int:
    if handle.proc.poll() is None:
        handle.proc.send_signal(signal.SIGTERM)
    try:
        return handle.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        handle.proc.kill()
        return handle.proc.wait()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[-1][0] != "Z"
    except FileNotFoundError:
        return False


def leftovers(state: dict) -> list[str]:
    """What a stopped server left behind: live child processes, its run folder, its /dev/shm segments."""
    found = [f"process {name} (pid {pid})" for name, pid in state["pids"].items() if pid and _alive(pid)]
    if Path(state["run_dir"]).exists():
        found.append(f"folder {state['run_dir']}")
    pids = {str(p) for p in state["pids"].values() if p}
    if os.path.isdir("/dev/shm"):
        found += [f"/dev/shm/{e}" for e in os.listdir("/dev/shm") if e.startswith("neoserve-")
                  and e.split("-")[1] in pids]
    return found


@pytest.fixture(scope="session")
def neoserve_server():
    """The running server; teardown stops it with SIGTERM and fails if anything is left behind."""
    with tempfile.TemporaryDirectory(prefix="neoserve-test-") as tmp:
        handle = start_server(["--worker-threads", "1", "--drain-timeout-s", "5"], Path(tmp))
        try:
            yield handle
        finally:
            state = handle.state()
            code = stop_server(handle)
            left = leftovers(state)
            assert code == 0 and not left, f"launcher exit {code}; left behind: {left}\n{handle.log_tail()}"
