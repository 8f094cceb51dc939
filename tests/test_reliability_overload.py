"""Overload: bursts of 4x the server's capacity (8 running + 8 queued requests) over loopback, a fixed number of
requests in a bounded time.

What must hold (docs/RELIABILITY.md): the admission bound holds (at most max_inflight + max_queued requests are ever
accepted at once); every excess request gets RESOURCE_EXHAUSTED with a retry hint within a second; nothing is lost
(each request ends either complete or refused); every accepted request's text equals the reference engine's; the
processes' memory does not grow from one burst to the next; afterwards everything is idle again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest

from neoserve.v1 import inference_service_pb2_grpc as pb_grpc
from tests.test_reliability_common import MAX_INFLIGHT, MAX_QUEUED, PROMPTS, greedy_request, rss_mib

pytest_plugins = ["tests.test_reliability_common"]
pytestmark = pytest.mark.slow

CAPACITY = MAX_INFLIGHT + MAX_QUEUED
BURST = 4 * CAPACITY
NEW_TOKENS = 12
BURST_TIME_LIMIT_S = 120.0


@dataclass
class Result:
    code: str
    sent: float
    ended: float
    text: str = ""
    ids: list[int] = field(default_factory=list)
    retry_after_ms: str | None = None


async def burst(address: str, n: int) -> list[Result]:
    """n greedy requests sent at once from one client; each runs to its end."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await channel.channel_ready()

        async def one(i: int) -> Result:
            sent = time.monotonic()
            call = stub.Generate(greedy_request(PROMPTS[i % len(PROMPTS)], NEW_TOKENS), timeout=BURST_TIME_LIMIT_S)
            text, ids = [], []
            try:
                async for resp in call:
                    if resp.HasField("delta"):
                        text.append(resp.delta.text)
                        ids += resp.delta.token_ids
                return Result("OK", sent, time.monotonic(), "".join(text), ids)
            except grpc.aio.AioRpcError as e:
                trailing = dict(e.trailing_metadata() or ())
                return Result(e.code().name, sent, time.monotonic(), retry_after_ms=trailing.get("retry-after-ms"))

        return await asyncio.gather(*(one(i) for i in range(n)))


class GaugeSampler:
    """Samples the gateway's admission gauges from /metrics while a burst runs (a server-side view of the bound)."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.max_inflight = self.max_queued = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            m = self.cluster.metrics()
            self.max_inflight = max(self.max_inflight, m.get("neoserve_gateway_requests_inflight", 0))
            self.max_queued = max(self.max_queued, m.get("neoserve_gateway_requests_queued", 0))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def check_burst(results: list[Result], reference) -> tuple[int, int]:
    assert len(results) == BURST
    codes = {r.code for r in results}
    assert codes <= {"OK", "RESOURCE_EXHAUSTED"}, f"unexpected statuses: {codes}"  # nothing else, nothing lost
    accepted = [r for r in results if r.code == "OK"]
    refused = [r for r in results if r.code == "RESOURCE_EXHAUSTED"]
    # The bound: when the last refusal was decided at most CAPACITY requests could be in the server, plus those
    # that had already completed and left.
    last_refusal = max(r.ended for r in refused)
    done_before = sum(1 for r in accepted if r.ended < last_refusal)
    assert MAX_INFLIGHT <= len(accepted) <= CAPACITY + done_before, (len(accepted), done_before)
    assert len(refused) >= BURST - CAPACITY - done_before
    for r in refused:  # refused fast, with a retry hint
        assert r.ended - r.sent < 1.0, f"a refusal took {r.ended - r.sent:.2f} s"
        assert r.retry_after_ms is not None and int(r.retry_after_ms) > 0
    for i, r in enumerate(results):  # every accepted request completed with the reference's text
        if r.code == "OK":
            prompt = PROMPTS[i % len(PROMPTS)]
            assert r.ids == reference.greedy(prompt, NEW_TOKENS), i
            assert r.text == reference.text(prompt, NEW_TOKENS), i
    return len(accepted), len(refused)


def test_bursts_at_four_times_capacity(reliability_server, reference):
    server = reliability_server
    server.wait_idle()
    for prompt in PROMPTS:  # compute the references before the clock starts
        reference.greedy(prompt, NEW_TOKENS)
    pids = server.pids
    rss = [{name: rss_mib(pid) for name, pid in pids.items()}]
    counts = []
    for _ in range(2):
        t0 = time.monotonic()
        with GaugeSampler(server) as gauges:
            results = asyncio.run(burst(server.address, BURST))
        assert time.monotonic() - t0 < BURST_TIME_LIMIT_S
        counts.append(check_burst(results, reference))
        assert gauges.max_inflight <= MAX_INFLIGHT and gauges.max_queued <= MAX_QUEUED, vars(gauges)
        server.wait_idle()
        rss.append({name: rss_mib(pid) for name, pid in pids.items()})
    print(f"\n[overload] {BURST} requests per burst, (accepted, refused) = {counts}, RSS MiB {rss}")
    assert server.pids == pids  # no process died or restarted
    for name in pids:  # memory is bounded: the second burst costs no more than the first left allocated
        assert rss[2][name] - rss[1][name] < 32, f"{name} grew {rss[2][name] - rss[1][name]:.0f} MiB: {rss}"
        assert rss[2][name] - rss[0][name] < 256, f"{name} grew {rss[2][name] - rss[0][name]:.0f} MiB: {rss}"
