"""The launcher's supervision (`neoserve serve`, gateway/launcher.py): what it restarts, for how long, and what it
refuses to retry.

What must hold (docs/RELIABILITY.md, "Process faults"):
- a cause no restart can fix (a model path that does not exist, a file that is not a GGUF, a port another process
  holds) ends the start-up within 5 s, non-zero, with one line that names the cause and the flag to change, and no
  traceback;
- restarts are counted within a time window: a child that crashes now and then over a long life is restarted each
  time, and one that crash-loops is given up on (a worker or gateway) or left down until the window allows another
  try (the sidecar: the server serves on without CPU offload, says so, and takes the sidecar back when it returns).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from tests.test_reliability_faults import Streams, assert_exact, start_mixed_placement
from tests.test_reliability_common import PROMPTS, SERVING, collect, greedy_request, running_cluster

pytest_plugins = ["tests.test_reliability_common"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
START_UP_ERROR_BOUND_S = 5.0


def serve(*args: str, timeout: float = 60.0) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, cwd=PROJECT_ROOT)
    return proc, time.monotonic() - t0


def assert_one_line_naming(proc: subprocess.CompletedProcess, elapsed: float, *needles: str) -> None:
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode != 0, output
    assert elapsed < START_UP_ERROR_BOUND_S, f"took {elapsed:.1f} s to fail:\n{output}"
    lines = output.splitlines()
    assert len(lines) == 1, f"{len(lines)} lines instead of one:\n{output}"
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- causes no restart can fix --------------------------------------------------------------------------------------

def test_a_model_path_that_does_not_exist_fails_at_once_naming_it(tmp_path):
    missing = tmp_path / "no-such-model.gguf"
    proc, elapsed = serve("--model", str(missing), "--port", "0", "--metrics-port", "-1")
    assert_one_line_naming(proc, elapsed, str(missing), "no such file", "--model")


def test_a_file_that_is_not_a_gguf_fails_at_once_naming_it(tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"<html>not a model</html>" * 40)
    proc, elapsed = serve("--model", str(junk), "--port", "0", "--metrics-port", "-1")
    assert_one_line_naming(proc, elapsed, str(junk), "not a GGUF file", "--model")


def test_an_http_body_cap_out_of_range_fails_at_once_naming_it():
    proc, elapsed = serve("--http-max-body-mib", "0", "--port", "0", "--metrics-port", "-1")
    assert_one_line_naming(proc, elapsed, "--http-max-body-mib", "(0, 1024]")


@pytest.mark.parametrize("flag_name", ["--port", "--http-port", "--metrics-port"])
def test_a_port_in_use_fails_at_once_naming_the_port_and_its_flag(flag_name):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--port": "0", "--http-port": "0", "--metrics-port": "0", flag_name: str(port)}
        proc, elapsed = serve(*[x for item in ports.items() for x in item])
    assert_one_line_naming(proc, elapsed, f"port {port}", flag_name, "in use")


# --- restarts within a window ---------------------------------------------------------------------------------------

def _crash_now(child) -> None:
    child.spec.argv = [sys.executable, "-c", "raise SystemExit(3)"]
    child.start()
    assert child.wait(30)


def test_restarts_are_counted_within_a_window_not_over_the_whole_life(tmp_path):
    """One restart allowed per 1 s window: a second crash inside the window ends the server, but a crash after the
    window has passed is restarted again (on main the restart count never went down)."""
    from gateway.launcher import Launcher, ServeConfig

    launcher = Launcher(ServeConfig(port=0, metrics_port=-1, max_restarts=1, restart_window_s=1.0), [],
                        engine_model=None, engine_mode="gpu-only", engine_device="cpu")
    worker = launcher.child("worker")
    try:
        for crash in range(3):
            _crash_now(worker)
            assert launcher.supervise_once(), f"gave up after crash {crash + 1}, each one a window apart"
            assert worker.next_start > 0
            worker.next_start = time.monotonic()  # NOTE: skip the back-off, not the window: that is what is tested
            assert launcher.supervise_once() and worker.alive() and worker.restarts == crash + 1
            deadline = time.monotonic() + 10
            while worker.recent_restarts(time.monotonic(), 1.0):  # the window passing
                assert time.monotonic() < deadline
                time.sleep(0.05)
        _crash_now(worker)
        assert launcher.supervise_once()
        worker.next_start = time.monotonic()
        assert launcher.supervise_once()
        _crash_now(worker)  # the second crash within one window
        assert not launcher.supervise_once()
    finally:
        for child in launcher.children:
            child.kill()
            child.wait(10)
        shutil.rmtree(launcher.run_dir, ignore_errors=True)


def test_a_child_that_exits_with_a_configuration_error_is_not_restarted(caplog):
    from gateway.launcher import Launcher, ServeConfig

    launcher = Launcher(ServeConfig(port=0, metrics_port=-1), [], engine_model=None, engine_mode="gpu-only",
                        engine_device="cpu")
    worker = launcher.child("worker")
    try:
        worker.spec.argv = [sys.executable, "-c", f"raise SystemExit({os.EX_CONFIG})"]
        worker.start()
        assert worker.wait(30)
        assert not launcher.supervise_once()
        assert worker.restarts == 0 and worker.next_start == 0.0
        assert "worker stopped on a configuration error" in caplog.text
    finally:
        shutil.rmtree(launcher.run_dir, ignore_errors=True)


# --- a sidecar that keeps failing -----------------------------------------------------------------------------------

def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.full  # NOTE: minutes of restarts; a single sidecar death and fail-over run in the default tier
def test_a_sidecar_killed_20_times_leaves_the_server_serving_degraded_then_recovered(reference):
    """SIGKILL the sidecar 20 times over one server's life, each new one as soon as it exists. One restart per 2 s
    window: every other kill finds the budget spent, so the launcher leaves the sidecar down for the rest of the
    window, and the server must serve on meanwhile (health SERVING, exact tokens, `neoserve_degraded` 1). After
    the last kill the sidecar comes back and the worker puts KV on it again."""
    with running_cluster(["--max-restarts", "1", "--restart-window-s", "2"]) as cluster:
        launcher = cluster.handle.proc
        swap_outs = cluster.worker_stats().num_swap_outs
        served_degraded = False
        for kill in range(20):
            pid = cluster.pids["sidecar"]
            os.kill(pid, signal.SIGKILL)
            _wait_for(lambda: cluster.metrics().get("neoserve_degraded") == 1, 30, f"degraded after kill {kill + 1}")
            assert cluster.health() == SERVING
            if not served_degraded and cluster.metrics().get("neoserve_sidecar_up") == 0:
                with grpc.insecure_channel(cluster.address) as channel:
                    _, ids, _ = collect(cluster.stub(channel).Generate(greedy_request(PROMPTS[3], 8), timeout=60))
                assert ids == reference.greedy(PROMPTS[3], 8)
                served_degraded = True
            _wait_for(lambda: cluster.pids["sidecar"] != pid, 30, f"the sidecar restarted after kill {kill + 1}")
            assert launcher.poll() is None, cluster.handle.log_tail()
        assert served_degraded
        assert "serving without CPU offload (degraded)" in cluster.handle.log_path.read_text()
        # Recovered: the last sidecar stays up, the worker takes it back, and KV goes to the CPU again.
        _wait_for(lambda: cluster.metrics().get("neoserve_degraded") == 0, 120, "offload coming back")
        assert cluster.worker_stats().mode == "auto"
        streams = Streams(cluster.address)
        try:
            start_mixed_placement(cluster, streams)  # waits until one of them has its KV on the CPU
            streams.join(timeout=240)
        finally:
            streams.close()
        for i, key in enumerate("ABC"):
            assert_exact(streams.outcome[key], reference, PROMPTS[i])
        assert cluster.worker_stats().num_swap_outs > swap_outs
        cluster.wait_idle()
        assert launcher.poll() is None
