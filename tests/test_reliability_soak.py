"""Soak: many very short requests (1-3 tokens) with random client cancellations and deadlines, 12 at a time.

What must hold (docs/RELIABILITY.md): every request ends with OK, CANCELLED (by the client) or DEADLINE_EXCEEDED;
every completed greedy request equals the reference engine; afterwards the KV blocks (device, the worker's CPU
mirror and the sidecar's own cache), the open requests and streams, the ring backlog, the gateway's admission
gauges, the shared-memory segments, the gateway's file descriptors and memory are back at their idle values.

Size: NEOSERVE_SOAK_REQUESTS requests (default 1500) or NEOSERVE_SOAK_TIME_S seconds of sending (default 60),
whichever ends first: a lightly loaded 2-core machine sends about 1500 in the 60 s (25 requests/s measured), one
shared with heavy other work about 500. Raise both for a longer soak.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import time

import grpc
import pytest

from neoserve.v1 import inference_service_pb2 as pb
from neoserve.v1 import inference_service_pb2_grpc as pb_grpc
from tests.test_reliability_common import rss_mib

pytest_plugins = ["tests.test_reliability_common"]
# NOTE: the full tier (a minute of sending plus its server): cancellations, deadlines and overload run in the default
# tier in test_reliability_faults.py and test_reliability_overload.py.
pytestmark = [pytest.mark.slow, pytest.mark.full]

SOAK_REQUESTS = int(os.environ.get("NEOSERVE_SOAK_REQUESTS", "1500"))
SOAK_TIME_S = float(os.environ.get("NEOSERVE_SOAK_TIME_S", "60"))
MIN_REQUESTS = 200  # below this the run says little: fail rather than pass quietly
CONCURRENCY = 12
TEXTS = ["Hi", "The capital of France is", "def f(x):", "1, 2, 3,", "Tell me a joke", "Why is the sky blue?"]
CHATS = ["Hello!", "Name a color."]
TOKEN_IDS = [[1, 2, 3], [504, 3458, 282], [28, 253, 1530, 30]]


def make_request(rng: random.Random, tokenizer) -> tuple[pb.GenerateRequest, list[int] | None]:
    """A short request and, for greedy ones, its prompt token ids (to look the reference up)."""
    max_tokens = rng.randint(1, 3)
    greedy = rng.random() < 0.8
    sp = pb.SamplingParameters(max_tokens=max_tokens, temperature=0 if greedy else 0.9)
    if not greedy:
        sp.seed = rng.randrange(2**32)
    kind = rng.random()
    if kind < 0.6:
        text = rng.choice(TEXTS)
        req, ids = pb.GenerateRequest(prompt=text, sampling=sp), tokenizer.encode(text)
    elif kind < 0.8:
        content = rng.choice(CHATS)
        req = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=content)]), sampling=sp)
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": content}]))
    else:
        ids = rng.choice(TOKEN_IDS)
        req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), sampling=sp)
    return req, (ids if greedy else None)


async def soak(address: str, tokenizer, reference, seed: int = 7) -> collections.Counter:
    rng = random.Random(seed)
    counts: collections.Counter = collections.Counter()
    wrong: list[str] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await channel.channel_ready()
        slots = asyncio.Semaphore(CONCURRENCY)

        async def one(req: pb.GenerateRequest, prompt_ids: list[int] | None, behaviour: str, delay: float) -> None:
            try:
                timeout = delay if behaviour == "deadline" else 60.0
                call = stub.Generate(req, timeout=timeout)
                if behaviour == "cancel":
                    async def cancel_later() -> None:
                        await asyncio.sleep(delay)
                        call.cancel()
                    canceller = asyncio.ensure_future(cancel_later())
                ids, complete = [], None
                try:
                    async for resp in call:
                        if resp.HasField("delta"):
                            ids += resp.delta.token_ids
                            if behaviour == "cancel-after-first":
                                call.cancel()
                        else:
                            complete = resp.complete
                except asyncio.CancelledError:  # grpc.aio raises this from a call we cancelled
                    counts["CANCELLED"] += 1
                    return
                finally:
                    if behaviour == "cancel":
                        canceller.cancel()
                if call.cancelled():
                    counts["CANCELLED"] += 1
                    return
                counts["OK"] += 1
                if complete is None:
                    wrong.append("stream ended without a final message")
                elif len(ids) > req.sampling.max_tokens:
                    wrong.append(f"{len(ids)} tokens for max_tokens={req.sampling.max_tokens}")
                elif prompt_ids is not None:
                    want = reference.greedy(prompt_ids, req.sampling.max_tokens, ignore_eos=False)
                    if ids != want:
                        wrong.append(f"{req}: {ids} != reference {want}")
            except grpc.aio.AioRpcError as e:
                counts[e.code().name] += 1
            finally:
                slots.release()

        tasks = []
        start = time.monotonic()
        while len(tasks) < SOAK_REQUESTS and time.monotonic() - start < SOAK_TIME_S:
            await slots.acquire()
            req, prompt_ids = make_request(rng, reference.tokenizer)
            r = rng.random()
            behaviour = "cancel" if r < 0.15 else "deadline" if r < 0.3 else "cancel-after-first" if r < 0.4 else "run"
            tasks.append(asyncio.ensure_future(one(req, prompt_ids, behaviour, rng.uniform(0.005, 0.3))))
        await asyncio.gather(*tasks)
        counts["sent"] = len(tasks)
        counts["seconds"] = round(time.monotonic() - start)
    assert not wrong, wrong[:5]
    return counts


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_soak_short_requests_with_cancellations_and_deadlines(reliability_server, reference, tokenizer):
    server = reliability_server
    server.wait_idle()
    for prompt in TEXTS + TOKEN_IDS:  # warm the reference cache so its work does not eat the soak's time
        for k in (1, 2, 3):
            reference.greedy(prompt, k, ignore_eos=False)
    pids, segments = server.pids, sorted(server.segments())
    gateway_fds, gateway_rss = _fds(pids["gateway"]), rss_mib(pids["gateway"])
    sidecar_messages = server.sidecar_stats().messages_processed

    counts = asyncio.run(soak(server.address, tokenizer, reference))
    print(f"\n[soak] {dict(counts)}")
    assert counts["sent"] >= MIN_REQUESTS, counts
    assert set(counts) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "sent", "seconds"}, counts
    assert counts["OK"] + counts["CANCELLED"] + counts["DEADLINE_EXCEEDED"] == counts["sent"]  # none lost
    assert min(counts["OK"], counts["CANCELLED"], counts["DEADLINE_EXCEEDED"]) > 0, counts

    # 12 at a time overflow the 8-block device cache: sequences really went through the sidecar's CPU KV cache.
    assert server.sidecar_stats().messages_processed > sidecar_messages
    server.wait_idle(timeout=30)  # KV (GPU, CPU mirror, sidecar), open requests, streams, ring backlog
    deadline = time.monotonic() + 10
    while True:  # the gateway's admission gauges (refreshed by its health loop every 0.5 s)
        m = server.metrics()
        if m.get("neoserve_gateway_requests_inflight") == 0 and m.get("neoserve_gateway_requests_queued") == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.2)
    assert server.pids == pids, "a process died or was restarted"
    assert sorted(server.segments()) == segments
    assert _fds(pids["gateway"]) <= gateway_fds + 8, (gateway_fds, _fds(pids["gateway"]))
    assert rss_mib(pids["gateway"]) - gateway_rss < 64
