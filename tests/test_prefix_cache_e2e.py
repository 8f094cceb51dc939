"""Prefix caching through the real `neoserve serve` processes: cached_tokens in the usage of both APIs (OpenAI HTTP
`usage.prompt_tokens_details.cached_tokens`, gRPC `Usage.cached_tokens`), cache_salt isolation, the per-request
opt-out, bad input, and the Prometheus metrics."""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request

import grpc
import pytest

pytest.register_assert_rewrite("tests.live_server")  # NOTE: before the import below, or pytest warns it cannot

from tests.live_server import wait_kv_idle
from neoserve.v1 import inference_service_pb2 as pb
from neoserve.v1 import inference_service_pb2_grpc as pb_grpc

pytest_plugins = ["tests.live_server"]
pytestmark = pytest.mark.slow

BLOCK = 16  # the server's default --block-size


def _unique_prompt(n: int = 70) -> list[int]:
    """Token ids no other test sends (so the first request finds nothing cached)."""
    rng = random.Random(time.monotonic_ns())
    return [rng.randrange(1000, 40000) for _ in range(n)]


def _complete(server, prompt: list[int], **extra) -> dict:
    body = json.dumps({"prompt": prompt, "max_tokens": 2, "temperature": 0, **extra}).encode()
    req = urllib.request.Request(f"{server.http_url}/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def _cached(server, prompt, **extra) -> int:
    return _complete(server, prompt, **extra)["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_http_usage_reports_cached_tokens_and_salts_isolate(neoserve_server):
    prompt = _unique_prompt()
    full = (len(prompt) - 1) // BLOCK * BLOCK  # every full block but the one holding the last token
    assert _cached(neoserve_server, prompt) == 0
    assert _cached(neoserve_server, prompt) == full
    assert _cached(neoserve_server, prompt[:40] + [7, 8, 9]) == 32  # a shared prefix of 40 tokens: 2 blocks
    assert _cached(neoserve_server, prompt, cache_salt="tenant-a") == 0
    assert _cached(neoserve_server, prompt, cache_salt="tenant-a") == full
    assert _cached(neoserve_server, prompt, cache_salt="tenant-b") == 0
    assert _cached(neoserve_server, prompt, skip_prefix_cache=True) == 0
    wait_kv_idle(neoserve_server.worker_address)


def test_http_rejects_a_bad_cache_salt(neoserve_server):
    with pytest.raises(urllib.error.HTTPError) as err:
        _complete(neoserve_server, [1, 2, 3], cache_salt="")
    assert err.value.code == 400
    assert json.loads(err.value.read())["error"]["param"] == "cache_salt"


def test_grpc_usage_reports_cached_tokens(neoserve_server):
    prompt = _unique_prompt()
    with grpc.insecure_channel(neoserve_server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        def cached(**sampling) -> int:
            req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=prompt),
                                     sampling=pb.SamplingParameters(max_tokens=2, temperature=0, **sampling))
            return [r for r in stub.Generate(req, timeout=60) if r.HasField("complete")][0].complete.usage.cached_tokens

        assert cached() == 0
        assert cached() == (len(prompt) - 1) // BLOCK * BLOCK
        assert cached(cache_salt="x") == 0
        assert cached(skip_prefix_cache=True) == 0
        with pytest.raises(grpc.RpcError) as err:
            cached(cache_salt="")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in err.value.details()


def test_metrics_export_the_device_tier(neoserve_server):
    prompt = _unique_prompt()
    _cached(neoserve_server, prompt)
    _cached(neoserve_server, prompt)
    deadline = time.monotonic() + 10
    while True:  # NOTE: the gateway polls the worker's stats; wait for a poll after the hit
        body = urllib.request.urlopen(f"http://127.0.0.1:{neoserve_server.metrics_port}/metrics",
                                      timeout=10).read().decode()
        hits = [line for line in body.splitlines()
                if line.startswith('neoserve_prefix_cache_hit_tokens_total{tier="device"}')]
        if hits and float(hits[0].split()[-1]) > 0:
            break
        assert time.monotonic() < deadline, f"no prefix-cache hits exported:\n{hits}"
        time.sleep(0.2)
    for name in ("neoserve_prefix_cache_queried_tokens_total", "neoserve_prefix_cache_hit_ratio",
                 "neoserve_prefix_cache_blocks", "neoserve_prefix_cache_evictions_total"):
        assert f'{name}{{tier="device"}}' in body, name
