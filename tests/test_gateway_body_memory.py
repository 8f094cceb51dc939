"""The OpenAI HTTP body cap and what it does to the gateway's memory: a body past --http-max-body-mib gets a 413
before it is read, and 16 concurrent maximum-size bodies raise the gateway process's peak RSS by a bounded amount
(the body budget lets two of them be parsed at once; the others wait in their sockets).

The gateway runs as its own process (python -m gateway) in front of a fake worker (tests/gateway_harness.py);
peak RSS is the kernel's high-water mark (VmHWM), reset before the burst through /proc/PID/clear_refs.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tests.gateway_harness import GatewayHarness

MIB = 2**20
MAX_BODY_MIB = 16  # the default of --http-max-body-mib
CONCURRENT = 16
# NOTE: two bodies parsed at once, each held ~3 times (bytes, decoded JSON text, the prompt string): ~100 MiB,
# plus the allocator's slack. Without the budget, 16 bodies at once took the gateway past 700 MiB.
PEAK_GROWTH_LIMIT_MIB = 200


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@pytest.fixture
def harness(tmp_path):
    h = GatewayHarness(tmp_path, in_process=False)
    yield h
    h.close()


def _max_size_body() -> bytes:
    """A completions request of exactly MAX_BODY_MIB MiB: its prompt is longer than the gateway takes (400)."""
    head, tail = b'{"prompt": "', b'", "max_tokens": 1}'
    return head + b"a" * (MAX_BODY_MIB * MIB - len(head) - len(tail)) + tail


def test_a_body_past_the_cap_is_refused_unread(harness):
    conn = harness.connection()
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(MAX_BODY_MIB * MIB + 1))
    conn.endheaders()  # NOTE: no body sent: the answer must not wait for it
    resp = conn.getresponse()
    error = json.loads(resp.read())["error"]
    conn.close()
    assert resp.status == 413 and "--http-max-body-mib" in error["message"], error


def test_peak_rss_under_concurrent_maximum_size_bodies_is_bounded(harness):
    pid = harness.proc.pid
    body = _max_size_body()
    assert harness.request("POST", "/v1/completions", body)[0] == 400  # warm-up: every code path has run once
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib(pid, "VmHWM")
    statuses: list[int] = []
    start = threading.Barrier(CONCURRENT)

    def send() -> None:
        conn = harness.connection(timeout=120)
        start.wait()
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        statuses.append(resp.status)
        conn.close()

    threads = [threading.Thread(target=send) for _ in range(CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    growth_mib = (_status_kib(pid, "VmHWM") - before) / 1024
    print(f"gateway peak RSS: {before / 1024:.0f} MiB before, +{growth_mib:.0f} MiB under {CONCURRENT} concurrent "
          f"{MAX_BODY_MIB} MiB bodies")
    assert statuses == [400] * CONCURRENT
    assert growth_mib < PEAK_GROWTH_LIMIT_MIB, f"peak RSS grew by {growth_mib:.0f} MiB"
    assert harness.request("GET", "/health")[0] == 200
