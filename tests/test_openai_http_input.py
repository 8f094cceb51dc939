"""Bad input on the OpenAI HTTP API, at the gateway: a real gateway process's code in front of a fake worker
(tests/gateway_harness.py), so hundreds of requests take seconds. What no request may get: a 5xx. What a bad field
gets: a 400 whose `param` names it. The same fuzzing against the real server (model, worker, sidecar) is in
tests/test_reliability_bad_input.py.
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, event, given, settings

from tests import openai_fuzz
from tests.gateway_harness import GatewayHarness

KEY = "k3y-for-tests"


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = GatewayHarness(tmp_path_factory.mktemp("gw"))
    yield h
    h.close()


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


BAD = [
    ("/v1/completions", {"prompt": "why is the sky \ud800 blue"}, "prompt"),
    ("/v1/chat/completions", {"messages": _user("a\udfffb")}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]},
     "messages[0].content[0].text"),
    ("/v1/completions", {"prompt": "hi", "stop": ["ok", "\ud800"]}, "stop[1]"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 100000000000000000000000}, "max_tokens"),
    ("/v1/chat/completions", {"messages": _user("hi"), "max_completion_tokens": 2**31}, "max_completion_tokens"),
    ("/v1/completions", {"prompt": "hi", "top_k": 10**23}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "temperature": 10**400}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [2**64]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**64}, "seed"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user"}]},
     "messages[1].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ("/v1/completions", {"prompt": "hi", "user": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]},
     "user" + "[0]" * 31),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{p}-{i}" for i, (_, _, p) in enumerate(BAD)])
def test_bad_field_is_400_naming_it(harness, path, body, param):
    status, answer = harness.post_json(path, body)
    assert status == 400, answer
    assert (answer["error"]["param"], answer["error"]["type"]) == (param, "invalid_request_error"), answer
    assert answer["error"]["message"].startswith(param + ":"), answer


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000
                                 + b"}"], ids=["array", "field"])
def test_deeply_nested_body_is_400(harness, raw):
    status, answer = harness.request("POST", "/v1/completions", raw)
    error = json.loads(answer)["error"]
    assert (status, error["param"]) == (400, None), answer
    assert "nests too deeply" in error["message"]


def test_an_assistant_turn_may_leave_content_out(harness):
    status, answer = harness.post_json("/v1/chat/completions", {"max_tokens": 1, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant"}, {"role": "user", "content": "again"}]})
    assert status == 200, answer


@pytest.mark.slow  # NOTE: ~30 s on 2 busy cores; `pytest -m slow` runs the slow tier alone
@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(req=openai_fuzz.requests())
def test_random_bodies_never_get_a_5xx(harness, req):
    path, raw, body, valid = req
    status, answer = harness.request("POST", path, raw)
    event(f"status {status}")
    openai_fuzz.check(path, body, valid, status, answer)


def test_metrics_on_the_http_port_need_the_api_key(tmp_path):
    h = GatewayHarness(tmp_path, api_key=KEY)
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, answer = h.request("GET", "/metrics", headers=headers)
            assert status == 401 and json.loads(answer)["error"]["code"] == "invalid_api_key", answer
        status, answer = h.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
        assert status == 200 and b"neoserve_requests_finished_total" in answer
        assert h.request("GET", "/health")[0] == 200  # load balancers need no secret
        assert h.request("GET", "/healthz")[0] == 401  # only the health path itself is open
    finally:
        h.close()


def test_health_says_degraded_while_the_sidecar_is_down(tmp_path):
    """Serving without CPU offload is still serving (200), but /health says so, as the gRPC health service does."""
    h = GatewayHarness(tmp_path, "--sidecar-address", f"unix:{tmp_path / 'no-sidecar.sock'}")
    try:
        deadline = time.monotonic() + 10
        while True:
            status, answer = h.request("GET", "/health")
            if json.loads(answer)["status"] == "degraded" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert (status, json.loads(answer)) == (200, {"status": "degraded"})
    finally:
        h.close()
