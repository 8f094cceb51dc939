"""The OpenAI-compatible HTTP endpoint, end to end: the real `neoserve serve` processes, the official `openai` client.

Reference for generated tokens: the engine run in this test process on the same prompt token ids (LLMEngine with the
worker's defaults), decoded with the tokenizer. Error bodies are checked against the shape the OpenAI API defines:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import signal
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import openai
import pytest

pytest.register_assert_rewrite("tests.live_server")  # NOTE: before the import below, or pytest warns it cannot

from gateway import openai_protocol as protocol
from tests.live_server import engine_generate, start_gateway, wait_kv_idle, worker_stats
from neoserve.sampling_params import SamplingParams

pytest_plugins = ["tests.live_server"]
pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot", "1, 2, 3, 4,"]
LONG = dict(max_tokens=4000, temperature=0, extra_body={"ignore_eos": True})  # runs until it is cancelled


@pytest.fixture(scope="module")
def server(neoserve_server):
    return neoserve_server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    with openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def engine(neoserve_reference_engine):
    return neoserve_reference_engine


def f32(x: float) -> float:
    """The value the worker samples with (the gateway -> worker message carries float32)."""
    return float(np.float32(x))


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a plain HTTP call, error statuses included."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def assert_openai_error(err: openai.APIStatusError, status: int, param: str | None, type_: str, code=None) -> None:
    assert err.status_code == status
    body = err.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert (body["error"]["param"], body["error"]["type"], body["error"]["code"]) == (param, type_, code), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# --- field mapping (no server) -----------------------------------------------------------------------------------------

def test_fields_map_one_to_one(tokenizer):
    model = SimpleNamespace(tokenizer=tokenizer, info=SimpleNamespace(max_model_len=100, vocab_size=49152,
                                                                      model_id="m", model_spec=""))
    names = protocol.accepted_model_names(None, model)
    assert names == ("m", "embedded")
    body = {"model": "embedded", "prompt": "hi", "max_tokens": 7, "temperature": 0.5, "top_p": 0.75,
            "presence_penalty": 0.25, "frequency_penalty": -0.5, "seed": 42, "stop": "x", "logprobs": 3, "top_k": 3,
            "min_p": 0.125, "repetition_penalty": 1.5, "ignore_eos": True, "min_tokens": 2, "stop_token_ids": [9],
            "skip_special_tokens": False, "include_stop_str_in_output": True, "user": "ignored", "n": 1,
            "stream": True, "stream_options": {"include_usage": True}}
    req = protocol.parse_completion(body, model, names)
    assert req.prepared.params == SamplingParams(
        max_tokens=7, temperature=0.5, top_k=3, top_p=0.75, min_p=0.125, repetition_penalty=1.5,
        presence_penalty=0.25, frequency_penalty=-0.5, seed=42, stop=["x"], stop_token_ids=[9], ignore_eos=True,
        min_tokens=2, logprobs=3)
    assert req.prepared.prompt_token_ids == tokenizer.encode("hi") and req.model == "m"
    assert (req.stream, req.include_usage, req.logprobs) == (True, True, True)
    assert (req.prepared.skip_special_tokens, req.prepared.include_stop_str_in_output) == (False, True)
    # OpenAI's defaults: 16 tokens for completions; for chats the rest of the context.
    assert protocol.parse_completion({"prompt": "hi"}, model, names).prepared.params == SamplingParams(max_tokens=16)
    chat_ids = tokenizer.encode(tokenizer.apply_chat_template(CHAT))
    chat = protocol.parse_chat({"messages": CHAT}, model, names)
    assert chat.prepared.prompt_token_ids == chat_ids
    assert chat.prepared.params == SamplingParams(max_tokens=100 - len(chat_ids))
    parts = [{"role": "user", "content": [{"type": "text", "text": CHAT[0]["content"]}]}]
    chat = protocol.parse_chat({"messages": parts, "max_completion_tokens": 5, "logprobs": True, "top_logprobs": 4,
                                "top_k": -1, "stop": ["a", "b"]}, model, names)
    assert chat.prepared.prompt_token_ids == chat_ids
    assert chat.prepared.params == SamplingParams(max_tokens=5, logprobs=4, stop=["a", "b"])  # vLLM's top_k -1: off
    assert protocol.parse_chat({"messages": CHAT, "logprobs": True}, model, names).prepared.params.logprobs == 0


# --- models, health, metrics ------------------------------------------------------------------------------------------

def test_models_and_health(server, client, model):
    models = client.models.list().data
    assert [m.id for m in models] == [model]
    card = client.models.retrieve(model)
    assert card.id == model and card.object == "model" and card.owned_by == "neoserve"
    assert card.model_extra["max_model_len"] >= 2048
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert_openai_error(err.value, 404, "model", "invalid_request_error", "model_not_found")
    status, body, _ = http("GET", server.http_url.removesuffix("/v1") + "/health")
    assert (status, body) == (200, {"status": "serving"})


# --- generation against the reference engine -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_reference(engine, tokenizer):
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(CHAT))
    [(ids, reason)] = engine_generate(engine, [prompt_ids], SamplingParams(max_tokens=24, temperature=0.0))
    return prompt_ids, ids, reason, tokenizer.decode(ids, skip_special_tokens=True)


def test_chat_non_streaming_equals_engine(client, model, chat_reference, server):
    prompt_ids, ref_ids, ref_reason, ref_text = chat_reference
    resp = client.chat.completions.create(model=model, messages=CHAT, max_tokens=24, temperature=0)
    assert resp.object == "chat.completion" and resp.model == model and resp.id.startswith("chatcmpl-")
    [choice] = resp.choices
    assert choice.message.role == "assistant" and choice.message.content == ref_text and ref_text
    assert choice.finish_reason == ref_reason and choice.logprobs is None
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.completion_tokens == len(ref_ids) + (ref_reason == "stop")  # the EOS token counts
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    wait_kv_idle(server.worker_address)


def test_chat_streaming_equals_engine_with_usage_and_logprobs(client, model, chat_reference, tokenizer):
    prompt_ids, ref_ids, ref_reason, ref_text = chat_reference
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=24,
                                                 temperature=0, stream=True, logprobs=True, top_logprobs=2,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last_choice, usage_chunk = chunks
    assert "".join(c.choices[0].delta.content or "" for c in body) == ref_text
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in body)
    assert last_choice.choices[0].finish_reason == ref_reason
    assert usage_chunk.choices == []
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (
        len(prompt_ids), len(ref_ids) + (ref_reason == "stop"))
    entries = [e for c in body if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in entries[: len(ref_ids)]] == [tokenizer.decode([i]) for i in ref_ids]
    for e in entries:  # greedy: the chosen token is the most likely one
        assert e.logprob <= 0 and len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token


def test_completions_streaming_with_logprobs_equals_engine(client, model, engine, tokenizer):
    [(ref_ids, ref_reason)] = engine_generate(engine, [tokenizer.encode(PROMPTS[0])],
                                              SamplingParams(max_tokens=8, temperature=0.0))
    chunks = list(client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=2,
                                            stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == tokenizer.decode(ref_ids, skip_special_tokens=True)
    assert chunks[-1].choices[0].finish_reason == ref_reason
    tokens, lps, tops, offsets = [], [], [], []
    for c in chunks:
        if c.choices[0].logprobs:
            lp = c.choices[0].logprobs
            tokens += lp.tokens
            lps += lp.token_logprobs
            tops += lp.top_logprobs
            offsets += lp.text_offset
    assert tokens == [tokenizer.decode([i]) for i in ref_ids]
    assert offsets == [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
    for token, lp, top in zip(tokens, lps, tops):
        assert len(top) == 2 and max(top, key=top.get) == token
        assert top[token] == pytest.approx(lp, abs=1e-5) and lp <= 0


def test_token_id_prompt_and_stop_strings(client, model, engine, tokenizer):
    prompt_ids = tokenizer.encode(PROMPTS[3])
    [(ref_ids, _)] = engine_generate(engine, [prompt_ids], SamplingParams(max_tokens=24, temperature=0.0))
    ref_text = tokenizer.decode(ref_ids, skip_special_tokens=True)
    stop = ref_text[6:9]  # a stop string somewhere inside the reference reply
    assert stop and stop in ref_text
    whole = client.completions.create(model=model, prompt=prompt_ids, max_tokens=24, temperature=0)
    assert whole.choices[0].text == ref_text and whole.usage.prompt_tokens == len(prompt_ids)
    resp = client.completions.create(model=model, prompt=PROMPTS[3], max_tokens=24, temperature=0, stop=stop)
    assert resp.choices[0].text == ref_text[: ref_text.index(stop)]
    assert resp.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=model, prompt=PROMPTS[3], max_tokens=24, temperature=0,
                                              stop=["never seen", stop], stream=True))
    assert "".join(c.choices[0].text for c in streamed) == resp.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_max_tokens(client, model, server):
    resp = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert (resp.usage.completion_tokens, resp.choices[0].finish_reason) == (5, "length")
    chat = client.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=3, temperature=0,
                                          extra_body={"ignore_eos": True, "min_tokens": 3})
    assert (chat.usage.completion_tokens, chat.choices[0].finish_reason) == (3, "length")
    wait_kv_idle(server.worker_address)


def test_seed_reproducible_and_equal_to_engine(client, model, engine, tokenizer):
    kwargs = dict(model=model, prompt=PROMPTS[2], max_tokens=20, temperature=0.8, top_p=0.9, seed=1234,
                  extra_body={"top_k": 40})
    first = client.completions.create(**kwargs).choices[0].text
    second = client.completions.create(**kwargs).choices[0].text
    assert first == second
    params = SamplingParams(max_tokens=20, temperature=f32(0.8), top_p=f32(0.9), top_k=40, seed=1234)
    [(ref_ids, _)] = engine_generate(engine, [tokenizer.encode(PROMPTS[2])], params)
    assert first == tokenizer.decode(ref_ids, skip_special_tokens=True)


# --- cancellation ------------------------------------------------------------------------------------------------------

def test_disconnect_mid_stream_frees_kv(client, model, server):
    stream = client.chat.completions.create(model=model, messages=CHAT, stream=True, **LONG)
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got >= 3:
            break
    busy = worker_stats(server.worker_address)
    assert busy.num_open_requests == 1 and busy.gpu_kv_blocks_used > 0
    stream.close()  # the client hangs up
    wait_kv_idle(server.worker_address)


def test_non_streaming_client_timeout_frees_kv(client, model, server):
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=1.5).completions.create(model=model, prompt=PROMPTS[1], **LONG)
    wait_kv_idle(server.worker_address)


# --- errors -------------------------------------------------------------------------------------------------------------

def _user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


CHAT_INVALID = [
    ("temperature", dict(temperature=-1)),
    ("top_p", dict(top_p=1.5)),
    ("max_tokens", dict(max_tokens=0)),
    ("max_completion_tokens", dict(max_completion_tokens=-3)),
    ("presence_penalty", dict(presence_penalty=3)),
    ("frequency_penalty", dict(frequency_penalty=-2.5)),
    ("seed", dict(seed=-1)),
    ("stop", dict(stop=[""])),
    ("stop", dict(stop=["x"] * 17)),
    ("n", dict(n=2)),
    ("top_logprobs", dict(logprobs=True, top_logprobs=21)),
    ("top_logprobs", dict(top_logprobs=2)),
    ("logprobs", dict(logprobs="yes")),
    ("stream", dict(stream=1)),
    ("stream_options", dict(stream_options={"include_usage": True})),
    ("messages", dict(messages=[])),
    ("messages", dict(messages="hi")),
    ("messages[0].role", dict(messages=[{"role": "", "content": "hi"}])),
    ("messages[0].content", dict(messages=_user([{"type": "image_url", "image_url": {"url": "x"}}]))),
    ("messages", dict(messages=_user("word " * 9000))),
    ("top_k", dict(extra_body={"top_k": -2})),
    ("min_p", dict(extra_body={"min_p": 2})),
    ("repetition_penalty", dict(extra_body={"repetition_penalty": 0})),
    ("min_tokens", dict(max_tokens=4, extra_body={"min_tokens": 5})),
    ("stop_token_ids", dict(extra_body={"stop_token_ids": [10**6]})),
    ("tools", dict(tools=[{"type": "function", "function": {"name": "f"}}])),
    ("response_format", dict(response_format={"type": "json_object"})),
]

COMPLETION_INVALID = [
    ("prompt", dict(prompt="")),
    ("prompt", dict(prompt=[])),
    ("prompt", dict(prompt=[5, 10**6])),
    ("prompt", dict(prompt=[1] * 9000)),
    ("prompt", dict(prompt=["one", "two"])),
    ("prompt", dict(prompt=None)),
    ("logprobs", dict(logprobs=21)),
    ("max_tokens", dict(max_tokens=0)),
    ("echo", dict(echo=True)),
    ("best_of", dict(best_of=2)),
]


@pytest.mark.parametrize("param,kwargs", CHAT_INVALID, ids=[f"{p}-{i}" for i, (p, _) in enumerate(CHAT_INVALID)])
def test_chat_invalid_field_is_400_naming_it(client, model, param, kwargs):
    kwargs = {"messages": CHAT, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, **kwargs)
    assert_openai_error(err.value, 400, param, "invalid_request_error")


@pytest.mark.parametrize("param,kwargs", COMPLETION_INVALID,
                         ids=[f"{p}-{i}" for i, (p, _) in enumerate(COMPLETION_INVALID)])
def test_completion_invalid_field_is_400_naming_it(client, model, param, kwargs):
    kwargs = {"prompt": "hi", **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, **kwargs)
    assert_openai_error(err.value, 400, param, "invalid_request_error")


def test_unknown_model_bad_json_and_unknown_path(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert_openai_error(err.value, 404, "model", "invalid_request_error", "model_not_found")
    status, body, _ = http("POST", server.http_url + "/chat/completions", b'{"messages": [',
                           {"Content-Type": "application/json"})
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and body["error"]["param"] is None
    status, body, _ = http("GET", server.http_url + "/nothing-here")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def test_requests_share_the_gateway_metrics(client, model, server):
    def finished() -> float:
        text = urllib.request.urlopen(server.http_url.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("neoserve_requests_finished_total{"))

    before = finished()
    client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=2)
    assert finished() == before + 1


# --- a second gateway: API key, full queue, drain ------------------------------------------------------------------

def test_api_key_queue_full_and_drain(server):
    key = "s3cret-key"
    with tempfile.TemporaryDirectory() as tmp:
        proc, ports = start_gateway(server.worker_address, Path(tmp), "--http-port", "0", "--max-inflight", "1",
                                    "--max-queued", "0", "--retry-after-s", "0.25", api_key=key)
        base = f"http://127.0.0.1:{ports['http_port']}"
        try:
            deadline = time.monotonic() + 60
            while http("GET", base + "/health")[0] != 200:  # health needs no key
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
            for headers in ({}, {"Authorization": "Basic " + key}, {"X-Api-Key": "wrong"}):
                status, body, _ = http("GET", base + "/v1/models", headers=headers)
                assert status == 401 and body["error"]["code"] == "invalid_api_key"
            for wrong in ("wrong", key[:-1]):
                with openai.OpenAI(base_url=base + "/v1", api_key=wrong, max_retries=0) as bad:
                    with pytest.raises(openai.AuthenticationError) as err:
                        bad.completions.create(model="embedded", prompt="hi", max_tokens=1)
                assert_openai_error(err.value, 401, None, "invalid_request_error", "invalid_api_key")

            with openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120) as c:
                model = c.models.list().data[0].id
                # One request running fills the gateway (max_inflight 1, no queue): the next is refused at once.
                running = c.completions.create(model=model, prompt=PROMPTS[1], stream=True, **LONG)
                next(iter(running))
                t0 = time.monotonic()
                with pytest.raises(openai.RateLimitError) as err:
                    c.chat.completions.create(model=model, messages=CHAT, max_tokens=2)
                assert time.monotonic() - t0 < 2.0
                assert_openai_error(err.value, 429, None, "requests", "rate_limit_exceeded")
                assert (err.value.response.headers["retry-after"], err.value.response.headers["retry-after-ms"]) == (
                    "1", "250")
                running.close()
                wait_kv_idle(server.worker_address)

                # Drain: a running stream finishes, a new request gets 503, the process exits 0.
                short = iter(c.chat.completions.create(model=model, messages=CHAT, max_tokens=30, temperature=0,
                                                       stream=True, extra_body={"ignore_eos": True}))
                next(short)
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                with pytest.raises(openai.InternalServerError) as err:
                    c.completions.create(model=model, prompt="hi", max_tokens=1)
                assert_openai_error(err.value, 503, None, "server_error", "service_unavailable")
                assert http("GET", base + "/health")[0] == 503
                rest = list(short)
                assert rest[-1].choices[0].finish_reason == "length"
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wait_kv_idle(server.worker_address)
