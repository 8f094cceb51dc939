"""`neoserve serve --replicas 2`: two real worker + sidecar pairs behind one gateway on this machine.

Kill one replica's worker under load: the streams it was running fail with UNAVAILABLE (those of the other replica
finish), nothing hangs, new requests go to the survivor, and the launcher's restart brings the replica back into
the routing. The deterministic cases (requests that had not started are retried elsewhere, deadlines, cancellation,
discovery) run against fake workers in tests/test_router_backends.py.
"""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request

import grpc
import pytest

from neoserve.v1 import inference_service_pb2 as pb
from tests.live_server import running_server
from tests.test_router_backends import OpenStream, generate

# NOTE: the full tier: test_router_backends.py kills a backend under load in the default run (fake workers).
pytestmark = [pytest.mark.slow, pytest.mark.full]

# NOTE: --compile off: a background compile per worker would take the cores these tests share; --dtype float32 is
# the exact path, whose step time does not depend on what runs beside it.
SERVER_ARGS = ["--replicas", "2", "--worker-threads", "1", "--compile", "off", "--dtype", "float32",
               "--drain-timeout-s", "5"]
REJOIN_TIMEOUT_S = 240  # a restarted worker loads the model again on a core it shares


def _routed(metrics_port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^neoserve_backend_requests_routed_total{backend="([^"]+)"} (\S+)$', body, re.M)}


def _up(metrics_port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^neoserve_backend_up{backend="([^"]+)"} (\S+)$', body, re.M)}


def test_killing_one_replica_under_load_fails_its_streams_the_survivor_serves_and_it_rejoins():
    with running_server(SERVER_ARGS) as server:
        state = server.state()
        assert {"worker-0", "worker-1", "sidecar-0", "sidecar-1", "gateway"} == set(state["pids"])
        dead, alive = (r["worker_address"] for r in state["replicas"])
        # NOTE: ignore_eos: no stream may end on its own before the kill.
        streams = [OpenStream(server.address, 48, prompt=f"Tell a long story about the number {i}.",
                              timeout=180, ignore_eos=True) for i in range(6)]
        for s in streams:
            assert s.first.wait(180) and s.tokens > 0, "every stream produced output before the kill"
        before = _routed(server.metrics_port)
        assert before[dead] >= 1 and before[alive] >= 1, before  # load routing spread the streams

        os.kill(state["pids"]["worker-0"], signal.SIGKILL)
        outcomes = [s.join(timeout=180) for s in streams]  # nothing hangs
        assert set(outcomes) <= {"finished", grpc.StatusCode.UNAVAILABLE}, outcomes
        assert outcomes.count(grpc.StatusCode.UNAVAILABLE) == before[dead], outcomes
        assert outcomes.count("finished") == before[alive], outcomes

        for i in range(3):  # new requests go to the survivor
            tokens, reason = generate(server.address, 4, prompt=f"Say {i}", timeout=120)
            assert tokens >= 1 and reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
        after = _routed(server.metrics_port)
        assert after[dead] == before[dead] and after[alive] == before[alive] + 3, (before, after)

        deadline = time.monotonic() + REJOIN_TIMEOUT_S
        while _up(server.metrics_port).get(dead) != 1.0:
            assert time.monotonic() < deadline, f"worker-0 did not rejoin:\n{server.log_tail()}"
            time.sleep(0.5)
        assert server.pids["worker-0"] != state["pids"]["worker-0"]  # restarted by the launcher
        streams = [OpenStream(server.address, 8, prompt=f"Count to {i}", timeout=180) for i in range(4)]
        assert [s.join(timeout=180) for s in streams] == ["finished"] * 4
        assert _routed(server.metrics_port)[dead] > after[dead], "the rejoined replica gets requests again"
