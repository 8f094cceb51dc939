"""End to end: the real `neoserve serve` processes on free ports, real gRPC clients.

Reference for generated text: the engine run in this test process on the same request (LLMEngine, same config),
decoded with the tokenizer. One server and one reference engine serve the whole session (fixtures and helpers from
tests.live_server).
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

pytest.register_assert_rewrite("tests.live_server")  # NOTE: before the import below, or pytest warns it cannot

from tests.live_server import (PROJECT_ROOT, engine_generate, health_status, leftovers, start_gateway, wait_health,
                             wait_kv_idle, worker_stats)
from neoserve.sampling_params import SamplingParams
from neoserve.v1 import inference_service_pb2 as pb
from neoserve.v1 import inference_service_pb2_grpc as pb_grpc

pytest_plugins = ["tests.live_server"]
pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot", "1, 2, 3, 4,"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


# --- helpers ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(neoserve_server):
    return neoserve_server


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="module")
def worker_address(server) -> str:
    return server.worker_address


@pytest.fixture(scope="module")
def reference_engine(neoserve_reference_engine):
    """The engine in this process, same defaults as the server's worker (one per session, shared)."""
    return neoserve_reference_engine


def collect(stream) -> tuple[str, list[int], pb.GenerateComplete]:
    text, ids, complete = [], [], None
    for resp in stream:
        if resp.HasField("delta"):
            assert complete is None, "delta after the final message"
            text.append(resp.delta.text)
            ids += resp.delta.token_ids
        else:
            complete = resp.complete
    assert complete is not None, "stream ended without a final message"
    return "".join(text), ids, complete


def f32(x: float) -> float:
    """The value a proto float field carries."""
    return float(np.float32(x))


# --- tests --------------------------------------------------------------------------------------------------------

def test_health_serving_and_reflection(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "neoserve.v1.InferenceService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in responses[0].list_services_response.service}
        assert {"neoserve.v1.InferenceService", "grpc.health.v1.Health"} <= names


def test_model_info_and_tokenize(stub, tokenizer):
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=5)
    # SmolLM2-135M-Instruct: llama architecture, 49152-token vocabulary, <|im_end|> (id 2) ends a turn.
    assert (info.architecture, info.vocab_size) == ("llama", 49152)
    assert 2 in info.eos_token_ids and info.has_chat_template and info.max_model_len >= 2048
    resp = stub.Tokenize(pb.TokenizeRequest(text="Hello world"), timeout=5)
    assert list(resp.token_ids) == tokenizer.encode("Hello world")
    assert "".join(resp.tokens).replace("Ġ", " ") == "Hello world"
    chat = stub.Tokenize(pb.TokenizeRequest(chat=pb.Chat(messages=[pb.ChatMessage(**CHAT[0])])), timeout=5)
    assert list(chat.token_ids) == tokenizer.encode(tokenizer.apply_chat_template(CHAT))


@pytest.mark.parametrize("kind", ["prompt", "chat"])
def test_stream_equals_engine_greedy(stub, worker_address, reference_engine, tokenizer, kind):
    if kind == "prompt":
        request = pb.GenerateRequest(prompt=PROMPTS[0], sampling=pb.SamplingParameters(max_tokens=24, temperature=0))
        prompt_ids = tokenizer.encode(PROMPTS[0])
    else:
        request = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(**CHAT[0])]),
                                     sampling=pb.SamplingParameters(max_tokens=24, temperature=0))
        prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(CHAT))
    text, ids, complete = collect(stub.Generate(request, timeout=60))
    [(ref_ids, ref_reason)] = engine_generate(reference_engine, [prompt_ids], SamplingParams(max_tokens=24,
                                                                                               temperature=0.0))
    assert ids == ref_ids
    assert text == tokenizer.decode(ref_ids, skip_special_tokens=True)
    assert len(text) > 0
    assert {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}[complete.finish_reason] == ref_reason
    assert complete.usage.prompt_tokens == len(prompt_ids)
    assert complete.usage.completion_tokens == len(ref_ids) + (ref_reason == "stop")
    assert complete.usage.total_tokens == complete.usage.prompt_tokens + complete.usage.completion_tokens
    wait_kv_idle(worker_address)


def test_seeded_sampling_equals_engine(stub, reference_engine, tokenizer):
    sp = dict(max_tokens=20, temperature=0.8, top_p=0.9, top_k=40, seed=1234)
    text, ids, _ = collect(stub.Generate(pb.GenerateRequest(prompt=PROMPTS[2], sampling=pb.SamplingParameters(**sp)),
                                         timeout=60))
    params = SamplingParams(max_tokens=20, temperature=f32(0.8), top_p=f32(0.9), top_k=40, seed=1234)
    [(ref_ids, _)] = engine_generate(reference_engine, [tokenizer.encode(PROMPTS[2])], params)
    assert ids == ref_ids
    assert text == tokenizer.decode(ref_ids, skip_special_tokens=True)


def test_logprobs_streamed(stub, reference_engine, tokenizer):
    resp = list(stub.Generate(pb.GenerateRequest(prompt=PROMPTS[0], sampling=pb.SamplingParameters(
        max_tokens=4, temperature=0, logprobs=3)), timeout=60))
    lps = [lp for r in resp if r.HasField("delta") for lp in r.delta.logprobs]
    ids = [t for r in resp if r.HasField("delta") for t in r.delta.token_ids]
    assert [lp.token_id for lp in lps] == ids and len(ids) == 4
    for lp in lps:
        assert len(lp.top) == 3 and lp.top[0].token_id == lp.token_id  # greedy: the chosen token is the best
        assert lp.logprob <= 0 and math.isclose(lp.logprob, lp.top[0].logprob, abs_tol=1e-5)
        assert lp.token == tokenizer.decode([lp.token_id])


def test_stop_string_ends_stream_and_frees_kv(stub, worker_address, reference_engine, tokenizer):
    [(ref_ids, _)] = engine_generate(reference_engine, [tokenizer.encode(PROMPTS[3])],
                                     SamplingParams(max_tokens=24, temperature=0.0))
    ref_text = tokenizer.decode(ref_ids, skip_special_tokens=True)
    stop = ref_text[6:9]  # a stop string somewhere inside the reference reply
    assert stop and stop in ref_text
    request = pb.GenerateRequest(prompt=PROMPTS[3], sampling=pb.SamplingParameters(max_tokens=24, temperature=0,
                                                                                   stop=[stop]))
    text, _, complete = collect(stub.Generate(request, timeout=60))
    assert text == ref_text[: ref_text.index(stop)]
    assert complete.finish_reason == pb.FINISH_REASON_STOP and complete.stop_string == stop
    wait_kv_idle(worker_address)


def _long_request(**kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=PROMPTS[1], sampling=pb.SamplingParameters(max_tokens=4000, ignore_eos=True,
                                                                                temperature=0, **kw))


def test_cancel_mid_stream_frees_kv(stub, worker_address):
    call = stub.Generate(_long_request(), timeout=120)
    got = 0
    for resp in call:
        got += len(resp.delta.token_ids)
        if got >= 3:
            break
    busy = worker_stats(worker_address)
    assert busy.num_open_requests == 1 and busy.gpu_kv_blocks_used > 0
    call.cancel()
    wait_kv_idle(worker_address)


def test_deadline_exceeded_frees_kv(stub, worker_address):
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        for _ in stub.Generate(_long_request(), timeout=1.5):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 10
    wait_kv_idle(worker_address)


def _chat(*messages) -> pb.Chat:
    return pb.Chat(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages])


INVALID = [
    ("max_tokens", dict(prompt="hi", sampling=pb.SamplingParameters(max_tokens=0))),
    ("max_tokens", dict(prompt="hi", sampling=pb.SamplingParameters(max_tokens=-5))),
    ("temperature", dict(prompt="hi", sampling=pb.SamplingParameters(temperature=-1))),
    ("temperature", dict(prompt="hi", sampling=pb.SamplingParameters(temperature=float("nan")))),
    ("top_k", dict(prompt="hi", sampling=pb.SamplingParameters(top_k=-1))),
    ("top_p", dict(prompt="hi", sampling=pb.SamplingParameters(top_p=0))),
    ("top_p", dict(prompt="hi", sampling=pb.SamplingParameters(top_p=1.5))),
    ("min_p", dict(prompt="hi", sampling=pb.SamplingParameters(min_p=2))),
    ("repetition_penalty", dict(prompt="hi", sampling=pb.SamplingParameters(repetition_penalty=0))),
    ("presence_penalty", dict(prompt="hi", sampling=pb.SamplingParameters(presence_penalty=3))),
    ("frequency_penalty", dict(prompt="hi", sampling=pb.SamplingParameters(frequency_penalty=-2.5))),
    ("seed", dict(prompt="hi", sampling=pb.SamplingParameters(seed=-1))),
    ("stop", dict(prompt="hi", sampling=pb.SamplingParameters(stop=[""]))),
    ("stop", dict(prompt="hi", sampling=pb.SamplingParameters(stop=["x"] * 17))),
    ("stop_token_ids", dict(prompt="hi", sampling=pb.SamplingParameters(stop_token_ids=[-1]))),
    ("stop_token_ids", dict(prompt="hi", sampling=pb.SamplingParameters(stop_token_ids=[10**6]))),
    ("min_tokens", dict(prompt="hi", sampling=pb.SamplingParameters(max_tokens=4, min_tokens=5))),
    ("logprobs", dict(prompt="hi", sampling=pb.SamplingParameters(logprobs=21))),
    ("prompt", dict(prompt="")),
    ("prompt", dict(prompt_token_ids=pb.TokenIds(ids=[]))),
    ("prompt", dict(prompt_token_ids=pb.TokenIds(ids=[1] * 9000))),
    ("prompt_token_ids", dict(prompt_token_ids=pb.TokenIds(ids=[5, 10**6]))),
    ("chat.messages", dict(chat=pb.Chat())),
    ("chat.messages[0].role", dict(chat=_chat(("", "hello")))),
    ("input", dict()),
]


@pytest.mark.parametrize("field,kwargs", INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_field_is_invalid_argument(stub, field, kwargs):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(**kwargs), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()


def test_64_concurrent_streams(server, worker_address, reference_engine, tokenizer):
    n = 64
    prompts_ids = [tokenizer.encode(p) for p in PROMPTS]
    refs = engine_generate(reference_engine, prompts_ids, SamplingParams(max_tokens=12, temperature=0.0))
    ref_texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in refs]

    async def run() -> list[tuple[int, str, list[int], int]]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            astub = pb_grpc.InferenceServiceStub(channel)

            async def one(i: int):
                k = i % len(PROMPTS)
                text, ids, finish = [], [], None
                async for resp in astub.Generate(pb.GenerateRequest(
                        prompt=PROMPTS[k], sampling=pb.SamplingParameters(max_tokens=12, temperature=0)), timeout=300):
                    if resp.HasField("delta"):
                        text.append(resp.delta.text)
                        ids += resp.delta.token_ids
                    else:
                        finish = resp.complete.finish_reason
                return k, "".join(text), ids, finish

            return await asyncio.gather(*(one(i) for i in range(n)))

    results = asyncio.run(run())
    assert len(results) == n
    for k, text, ids, finish in results:
        assert finish in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        assert ids == refs[k][0]
        assert text == ref_texts[k]
    wait_kv_idle(worker_address)


def test_metrics_endpoint(server):
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    for name in ("neoserve_time_to_first_token_seconds_count", "neoserve_inter_token_latency_seconds_count",
                 "neoserve_queue_time_seconds_count", "neoserve_requests_running", "neoserve_requests_waiting",
                 "neoserve_gpu_kv_usage_ratio", "neoserve_cpu_kv_usage_ratio", "neoserve_requests_on_cpu",
                 "neoserve_preemptions_total", 'neoserve_requests_finished_total{finish_reason="stop"}',
                 'neoserve_requests_failed_total{code="INVALID_ARGUMENT"}'):
        assert name in body, name
    ttft = [line for line in body.splitlines() if line.startswith("neoserve_time_to_first_token_seconds_count")]
    assert float(ttft[0].split()[-1]) >= 1


# --- a second gateway on the same worker: tiny admission limits, an API key, draining ------------------------------

def _start_gateway(worker_address: str, tmp: Path, *extra: str, api_key: str | None = None,
                   model: str | None = "embedded") -> tuple[subprocess.Popen, str]:
    """tests.live_server's second gateway, with its public gRPC address."""
    proc, ports = start_gateway(worker_address, tmp, *extra, api_key=api_key, model=model)
    return proc, f"localhost:{ports['port']}"


def test_gateway_without_worker_is_not_serving():
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = _start_gateway(f"unix:{tmp}/nobody.sock", Path(tmp), model=None)
        try:
            time.sleep(1.0)
            assert health_status(address) == health_pb2.HealthCheckResponse.NOT_SERVING
            with grpc.insecure_channel(address) as channel:
                with pytest.raises(grpc.RpcError) as err:
                    list(pb_grpc.InferenceServiceStub(channel).Generate(pb.GenerateRequest(prompt="hi"), timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            proc.terminate()
            assert proc.wait(30) == 0


def test_queue_overflow_api_key_and_drain(server, worker_address):
    key = "s3cret-key"
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = _start_gateway(server.worker_address, Path(tmp), "--max-inflight", "1", "--max-queued", "1",
                                       "--retry-after-s", "0.25", api_key=key)
        try:
            wait_health(address, health_pb2.HealthCheckResponse.SERVING, 60)  # health needs no key
            with grpc.insecure_channel(address) as channel:
                stub = pb_grpc.InferenceServiceStub(channel)
                for metadata in ((), (("authorization", "Bearer wrong"),), (("x-api-key", key[:-1]),)):
                    with pytest.raises(grpc.RpcError) as err:
                        list(stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=metadata, timeout=10))
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    with pytest.raises(grpc.RpcError) as err:
                        stub.ModelInfo(pb.ModelInfoRequest(), metadata=metadata, timeout=10)
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                auth = (("authorization", f"Bearer {key}"),)
                assert stub.ModelInfo(pb.ModelInfoRequest(), metadata=auth, timeout=10).vocab_size == 49152

                # One running, one queued: the third is refused at once with a retry hint.
                running = stub.Generate(_long_request(), metadata=auth, timeout=120)
                next(running)
                queued = stub.Generate(_long_request(), metadata=auth, timeout=120)
                time.sleep(0.5)  # let the gateway queue it
                t0 = time.monotonic()
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.Generate(_long_request(), metadata=auth, timeout=30))
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() - t0 < 2.0  # fast: no waiting for a slot
                assert dict(err.value.trailing_metadata())["retry-after-ms"] == "250"
                running.cancel()
                next(queued)  # the queued request got the slot
                queued.cancel()
                wait_kv_idle(worker_address)

                # Drain: a running stream finishes, a new request is refused with UNAVAILABLE, the process exits 0.
                short = stub.Generate(pb.GenerateRequest(prompt=PROMPTS[0], sampling=pb.SamplingParameters(
                    max_tokens=30, ignore_eos=True, temperature=0)), metadata=auth, timeout=120)
                next(short)
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.Generate(pb.GenerateRequest(prompt="hi"), metadata=auth, timeout=10))
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                rest = list(short)
                assert rest[-1].complete.finish_reason == pb.FINISH_REASON_LENGTH
                assert rest[-1].complete.usage.completion_tokens == 30
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wait_kv_idle(worker_address)


def test_tls_gateway(server, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    proc, address = _start_gateway(server.worker_address, tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(address, creds) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            deadline = time.monotonic() + 60
            while True:
                try:
                    text, ids, _ = collect(stub.Generate(pb.GenerateRequest(prompt=PROMPTS[0], sampling=pb.SamplingParameters(
                        max_tokens=3, temperature=0)), timeout=30))
                    break
                except grpc.RpcError as e:  # UNAVAILABLE until it has loaded the tokenizer
                    assert e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, e
                    time.sleep(0.2)
            assert len(ids) == 3
        with grpc.insecure_channel(address) as plain:  # plaintext is refused on a TLS port
            with pytest.raises(grpc.RpcError):
                pb_grpc.InferenceServiceStub(plain).ModelInfo(pb.ModelInfoRequest(), timeout=5)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_cli_generate_and_healthcheck_commands(server, stub):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "cli", "generate", "--address", server.address, "--chat",
                           "--max-tokens", "12", "--temperature", "0", CHAT[0]["content"]],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    expected, _, _ = collect(stub.Generate(pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(**CHAT[0])]),
                                                              sampling=pb.SamplingParameters(max_tokens=12,
                                                                                             temperature=0)), timeout=60))
    assert proc.stdout == expected + "\n"
    for address in (server.address, server.worker_address):
        hc = subprocess.run([sys.executable, "-m", "gateway.healthcheck", address], capture_output=True, text=True,
                            timeout=60, env=env)
        assert (hc.returncode, hc.stdout.strip()) == (0, "SERVING")
    hc = subprocess.run([sys.executable, "-m", "gateway.healthcheck", "unix:/nonexistent.sock", "--timeout", "1"],
                        capture_output=True, text=True, timeout=60, env=env)
    assert hc.returncode == 1


# --- process faults and shutdown (these disturb the shared server: keep them last) ---------------------------------

@pytest.mark.parametrize("child", ["sidecar", "worker", "gateway"])
def test_child_crash_health_and_restart(server, stub, worker_address, child):
    """A dead process turns health NOT_SERVING; the launcher restarts it (the gateway on the same port) and the
    server serves again."""
    pids = server.pids
    if child not in pids:
        assert child == "sidecar" and not (PROJECT_ROOT / "cpu_attn" / "__main__.py").exists()
        return  # this tree has no sidecar process yet
    pid = pids[child]
    inflight = stub.Generate(_long_request(), timeout=120)
    next(inflight)
    os.kill(pid, signal.SIGKILL)
    if child in ("worker", "gateway"):  # streams through the dead process end with UNAVAILABLE, never hang
        with pytest.raises(grpc.RpcError) as err:
            for _ in inflight:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    else:
        inflight.cancel()
    if child == "gateway":  # the worker aborted the dead gateway's request and freed its KV
        wait_kv_idle(worker_address, timeout=30)
    if child == "sidecar":  # NOTE: the worker serves gpu-only meanwhile: degraded (a metric), not down
        wait_metric(server, "neoserve_degraded", 1, 10)
        wait_metric(server, "neoserve_degraded", 0, 240)  # restarted and taken back by the worker
    else:
        wait_health(server.address, health_pb2.HealthCheckResponse.NOT_SERVING, 10)
    wait_health(server.address, health_pb2.HealthCheckResponse.SERVING, 240)  # the launcher restarted it
    assert server.pids[child] != pid
    text, ids, complete = collect(stub.Generate(pb.GenerateRequest(prompt=PROMPTS[0], sampling=pb.SamplingParameters(
        max_tokens=5, temperature=0)), timeout=60))
    assert len(ids) >= 1 and complete.usage.completion_tokens >= 1
    wait_kv_idle(worker_address, timeout=30)


def wait_metric(server, name: str, value: float, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
        if f"{name} {float(value)}" in body.splitlines():
            return
        assert time.monotonic() < deadline, f"{name} was not {value} within {timeout} s"
        time.sleep(0.05)


def test_serve_once_streams_one_reply_and_exits_clean(tokenizer, reference_engine):
    """The README's first command: serve the embedded model, stream one reply, exit with nothing left behind."""
    with tempfile.TemporaryDirectory() as tmp:
        state_file = Path(tmp) / "state.json"
        proc = subprocess.run(
            [sys.executable, "-m", "cli", "serve", "--port", "0", "--metrics-port", "-1", "--worker-threads",
             "1", "--state-file", str(state_file), "--once", CHAT[0]["content"], "--chat", "--max-tokens", "16",
             "--temperature", "0"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        [(ref_ids, _)] = engine_generate(reference_engine, [tokenizer.encode(tokenizer.apply_chat_template(CHAT))],
                                         SamplingParams(max_tokens=16, temperature=0.0))
        assert proc.stdout == tokenizer.decode(ref_ids, skip_special_tokens=True) + "\n"
        import json

        state = json.loads(state_file.read_text())
    assert_stopped_clean(state)


def assert_stopped_clean(state: dict) -> None:
    assert leftovers(state) == []
