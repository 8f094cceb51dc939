"""When the drain timeout cuts the streams still running, each client is told that the server is shutting down:
gRPC clients get UNAVAILABLE with that message, SSE clients an error event and then `data: [DONE]`.

The gateway runs in front of a fake worker (tests/gateway_harness.py) whose replies never end, so the drain always
times out; the test waits for each stream's first output before it starts the drain.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from neoserve.v1 import inference_service_pb2 as pb
from neoserve.v1 import inference_service_pb2_grpc as pb_grpc
from tests.gateway_harness import GatewayHarness


@pytest.fixture
def harness(tmp_path):
    h = GatewayHarness(tmp_path, "--drain-timeout-s", "0.2", max_reply=3, step_s=0.01)
    yield h
    h.close()


def _events(resp):
    """The data of each server-sent event, as it arrives."""
    for line in resp:
        line = line.strip()
        if line.startswith(b"data: "):
            yield line[len(b"data: "):]


def test_streams_cut_by_the_drain_timeout_say_the_server_is_shutting_down(harness):
    conn = harness.connection()
    conn.request("POST", "/v1/chat/completions", body=json.dumps({
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000, "stream": True}).encode(),
        headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    sse = _events(resp)
    next(sse)  # the role chunk
    with grpc.insecure_channel(harness.grpc_address) as channel:
        stream = pb_grpc.InferenceServiceStub(channel).Generate(
            pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(max_tokens=100_000)), timeout=60)
        next(stream)  # both requests are running in the worker
        drained = asyncio.run_coroutine_threadsafe(harness.gateway.drain_and_stop(), harness.loop.loop)

        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "server is shutting down" in err.value.details(), err.value.details()

        rest = list(sse)
        assert rest[-1] == b"[DONE]", rest[-3:]
        error = json.loads(rest[-2])["error"]
        assert "server is shutting down" in error["message"], error
        assert (error["type"], error["code"]) == ("server_error", "service_unavailable"), error
        drained.result(30)
    conn.close()
    assert sorted(harness.worker.aborted) == sorted(s.request_id for s in harness.worker.starts)
