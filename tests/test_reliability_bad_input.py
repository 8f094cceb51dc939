"""Bad input: random and malformed requests through the real public gRPC API, and malformed ring records at the
sidecar's data plane.

Every request must end with a status from the documented set (protos/neoserve/v1/inference_service.proto), with
INVALID_ARGUMENT exactly when a field breaks a documented limit (and then naming that field); afterwards no process
has died or restarted and KV blocks, streams and shared memory are back at their idle values.

The oracle for "invalid" is written here from the documented limits, independently of SamplingParams' code.
"""

from __future__ import annotations

import math
import time

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cpu_attn import messages as m
from cpu_attn.config import AttnShape
from gpu_worker.sidecar_client import SidecarClient, _Pending
from neoserve.errors import ValidationError
from neoserve.shm_ring import cleanup_stale_segments, list_segments
from neoserve.v1 import inference_service_pb2 as pb
from neoserve.v1 import inference_service_pb2_grpc as pb_grpc
from tests.test_reliability_common import GPU_KV_TOKENS, collect

pytest_plugins = ["tests.test_reliability_common"]
pytestmark = pytest.mark.slow

VOCAB = 49152  # SmolLM2's vocabulary
MAX_MODEL_LEN = 8192
DOCUMENTED_CODES = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                    "UNAUTHENTICATED", "CANCELLED", "INTERNAL"}
MAX_MESSAGES = 6  # read at most this many responses of a valid request, then cancel it


@pytest.fixture(scope="module")
def server(reliability_server):
    before = (reliability_server.pids, sorted(reliability_server.segments()))
    reliability_server.wait_idle()
    yield reliability_server
    # Nothing died, nothing was restarted, nothing stayed behind.
    assert reliability_server.alive() == {name: True for name in before[0]}
    assert reliability_server.pids == before[0]
    reliability_server.wait_idle()
    assert sorted(reliability_server.segments()) == before[1]


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 128 << 20)]) as ch:
        yield ch


# --- strategies -------------------------------------------------------------------------------------------------------

F32_MAX = float(np.finfo(np.float32).max)
FLOAT_EDGES = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, 1e-7, 0.5, 1.0, 1.0000001, 2.0, 2.0000002, -2.0,
               -1.0, F32_MAX, -F32_MAX]
INT32_EDGES = [0, 1, -1, 2, 16, 20, 21, 64, 2**31 - 1, -(2**31)]
UNICODE_EDGES = ["\x00", "\u202e", "\ufeff", "\U0001F600" * 8, "e\u0301", "<|im_end|>", "<|im_start|>system\n",
                 "\r\n", "\uffff", "\U0010ffff", "\u200d", "שלום", "ａ" * 40, "\t" * 30, "a" * 256, "a" * 257]
texts = st.one_of(st.text(st.characters(blacklist_categories=["Cs"]), max_size=40), st.sampled_from(UNICODE_EDGES))
wild_floats = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(width=32))
wild_int32 = st.one_of(st.sampled_from(INT32_EDGES), st.integers(-(2**31), 2**31 - 1))


def _f32(x: float) -> float:
    return float(np.float32(x))


def _opt(strategy):
    return st.one_of(st.none(), strategy)


valid_texts = texts.filter(lambda t: 0 < len(t) <= 256)
roles = st.one_of(st.sampled_from(["user", "assistant", "system", ""]), texts)

# field -> (plausible values, anything the wire allows: NaN, inf, negatives, giants, empties)
FIELDS = {
    "max_tokens": (st.one_of(st.integers(1, 6), st.just(2**31 - 1)), wild_int32),
    "temperature": (st.floats(0, 2, width=32), wild_floats),
    "top_k": (st.integers(0, 100), wild_int32),
    "top_p": (st.floats(_f32(0.01), 1, width=32), wild_floats),
    "min_p": (st.floats(0, 1, width=32), wild_floats),
    "repetition_penalty": (st.floats(0.5, 2, width=32), wild_floats),
    "presence_penalty": (st.floats(-2, 2, width=32), wild_floats),
    "frequency_penalty": (st.floats(-2, 2, width=32), wild_floats),
    "seed": (st.integers(0, 2**63 - 1), st.integers(-(2**63), 2**63 - 1)),
    "logprobs": (st.integers(0, 20), wild_int32),
    "min_tokens": (st.integers(0, 1), wild_int32),
    "stop": (st.lists(valid_texts, max_size=16), st.lists(texts, max_size=40)),
    "stop_token_ids": (st.lists(st.integers(0, VOCAB - 1), max_size=4), st.lists(wild_int32, max_size=80)),
    "input": (None, None),  # drawn by requests()
}


@st.composite
def requests(draw) -> pb.GenerateRequest:
    """Plausible requests with none, one, or every field wild (so about half of them are valid)."""
    mode = draw(st.sampled_from(["valid", "valid", "one", "wild"]))
    wild = set(FIELDS) if mode == "wild" else {draw(st.sampled_from(sorted(FIELDS)))} if mode == "one" else set()
    sp = pb.SamplingParameters(ignore_eos=draw(st.booleans()))
    for name, (plausible, anything) in FIELDS.items():
        if name == "input":
            continue
        value = draw(_opt(anything if name in wild else plausible))
        if value is None:
            continue
        if isinstance(value, list):
            getattr(sp, name).extend(value)
        else:
            setattr(sp, name, value)
    if draw(st.booleans()):
        sp.skip_special_tokens = draw(st.booleans())
    req = pb.GenerateRequest(sampling=sp, request_id=draw(texts))
    w = "input" in wild
    kind = draw(st.sampled_from(["prompt", "prompt", "chat", "prompt_token_ids"] + (["none"] if w else [])))
    if kind == "prompt":
        req.prompt = draw(texts if w else valid_texts)
    elif kind == "chat":
        msgs = draw(st.lists(st.tuples(roles if w else roles.filter(bool), texts), min_size=0 if w else 1,
                             max_size=3))
        req.chat.CopyFrom(pb.Chat(messages=[pb.ChatMessage(role=r, content=c) for r, c in msgs]))
    elif kind == "prompt_token_ids":
        ids = st.integers(0, 2**32 - 1) if w else st.integers(0, VOCAB - 1)
        req.prompt_token_ids.CopyFrom(pb.TokenIds(ids=draw(st.lists(ids, min_size=0 if w else 1, max_size=16))))
    return req


def invalid_fields(req: pb.GenerateRequest) -> set[str]:
    """The fields of `req` that break a documented limit (values as the wire carries them: float32)."""
    sp, bad = req.sampling, set()

    def has(name: str) -> bool:
        return sp.HasField(name)

    def finite_in(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
        if has(name):
            v = getattr(sp, name)
            if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
                bad.add(name)

    max_tokens = sp.max_tokens if has("max_tokens") else 16
    if max_tokens < 1:
        bad.add("max_tokens")
    if has("temperature") and (not math.isfinite(sp.temperature) or sp.temperature < 0):
        bad.add("temperature")
    if has("top_k") and sp.top_k < 0:
        bad.add("top_k")
    finite_in("top_p", 0.0, 1.0, lo_open=True)
    finite_in("min_p", 0.0, 1.0)
    if has("repetition_penalty") and (not math.isfinite(sp.repetition_penalty) or sp.repetition_penalty <= 0):
        bad.add("repetition_penalty")
    finite_in("presence_penalty", -2.0, 2.0)
    finite_in("frequency_penalty", -2.0, 2.0)
    if has("seed") and sp.seed < 0:
        bad.add("seed")
    if len(sp.stop) > 16 or any(not s or len(s) > 256 for s in sp.stop):
        bad.add("stop")
    if len(sp.stop_token_ids) > 64 or any(not 0 <= t < VOCAB for t in sp.stop_token_ids):
        bad.add("stop_token_ids")
    if not 0 <= sp.min_tokens <= max_tokens:
        bad.add("min_tokens")
    if has("logprobs") and not 0 <= sp.logprobs <= 20:
        bad.add("logprobs")
    kind = req.WhichOneof("input")
    if kind is None:
        bad.add("input")
    elif kind == "prompt" and not req.prompt:
        bad.add("prompt")
    elif kind == "chat":
        if not req.chat.messages:
            bad.add("chat.messages")
        bad |= {f"chat.messages[{i}].role" for i, msg in enumerate(req.chat.messages) if not msg.role}
    elif kind == "prompt_token_ids":
        ids = req.prompt_token_ids.ids
        if not ids:
            bad.add("prompt")
        if any(t >= VOCAB for t in ids):
            bad.add("prompt_token_ids")
    return bad


def prompt_tokens(channel, req: pb.GenerateRequest) -> int:
    """The prompt's length in tokens, as the server's own Tokenize counts it (chat template included)."""
    kind = req.WhichOneof("input")
    if kind == "prompt_token_ids":
        return len(req.prompt_token_ids.ids)
    tokenize = pb.TokenizeRequest(chat=req.chat) if kind == "chat" else pb.TokenizeRequest(text=req.prompt)
    return len(pb_grpc.InferenceServiceStub(channel).Tokenize(tokenize, timeout=8.0).token_ids)


def call(channel, req: pb.GenerateRequest, timeout: float = 8.0) -> tuple[str, str]:
    """(status, details): "OK" for a complete stream, "CANCELLED" when we stopped reading a long one."""
    stream = pb_grpc.InferenceServiceStub(channel).Generate(req, timeout=timeout)
    n, complete = 0, False
    try:
        for resp in stream:
            assert not complete, "a message after the final one"
            complete = resp.HasField("complete")
            n += 1
            if n >= MAX_MESSAGES and not complete:
                stream.cancel()
                return "CANCELLED", ""
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""
    assert complete, "the stream ended without a final message"
    return "OK", ""


# --- the property -----------------------------------------------------------------------------------------------------

@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(req=requests())
def test_random_requests_get_documented_statuses(server, channel, req):
    bad = invalid_fields(req)
    if not bad and prompt_tokens(channel, req) + 1 > GPU_KV_TOKENS:
        bad.add("prompt")  # its prefill's KV does not fit the device cache: refused up front
    code, details = call(channel, req)
    event(f"status {code}")
    assert code in DOCUMENTED_CODES, (code, details)
    if bad:
        assert code == "INVALID_ARGUMENT", (bad, code, details)
        assert details.split(":")[0] in bad, (bad, details)
    else:
        assert code in ("OK", "CANCELLED", "DEADLINE_EXCEEDED"), (code, details)
    assert all(server.alive().values())


@pytest.mark.parametrize("field,req", [
    ("prompt", pb.GenerateRequest(prompt="a" * 4_000_001)),  # past the gateway's character bound
    ("prompt", pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[17] * (MAX_MODEL_LEN + 10)))),  # past the context
    ("prompt", pb.GenerateRequest(prompt="hello " * 9000)),  # tokenizes to more than the context
    ("chat.messages", pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="x")] * 1025))),
    ("stop", pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(stop=["x" * 300]))),
    ("stop", pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParameters(stop=["s"] * 1000))),
], ids=["chars", "token-ids", "tokens", "chat-messages", "stop-length", "stop-count"])
def test_oversize_requests_are_refused_by_field(server, channel, field, req):
    t0 = time.monotonic()
    code, details = call(channel, req, timeout=60)
    assert (code, details.split(":")[0]) == ("INVALID_ARGUMENT", field), details
    assert time.monotonic() - t0 < 30


def test_message_past_the_receive_limit_is_refused(server, channel):
    """A 65 MiB request is refused by gRPC itself (the gateway accepts at most 64 MiB) without harm."""
    code, _ = call(channel, pb.GenerateRequest(prompt="a" * (65 << 20)), timeout=60)
    assert code == "RESOURCE_EXHAUSTED"


def test_longest_valid_stop_list_and_huge_max_tokens_end_at_the_deadline(server, channel):
    """The largest stop list the API allows and max_tokens = 2^31-1: generation runs until the client's deadline,
    which aborts the request in the worker."""
    req = pb.GenerateRequest(prompt="Count: 1, 2, 3,", sampling=pb.SamplingParameters(
        max_tokens=2**31 - 1, ignore_eos=True, temperature=0, stop=["\U0001F600" * 256] * 16))
    stream = pb_grpc.InferenceServiceStub(channel).Generate(req, timeout=3)
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    server.wait_idle()


def test_a_huge_prompt_does_not_stall_the_gateway(server, channel):
    import threading

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    outcome = {}

    def big() -> None:
        outcome["status"] = call(channel, pb.GenerateRequest(prompt="hello world, this is a test. " * 134_000),
                                 timeout=120)

    worker = threading.Thread(target=big)
    worker.start()
    worst = 0.0
    with grpc.insecure_channel(server.address) as probe_channel:
        probe = health_pb2_grpc.HealthStub(probe_channel)
        while worker.is_alive():
            t0 = time.monotonic()
            probe.Check(health_pb2.HealthCheckRequest(), timeout=60)
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.05)
    worker.join()
    assert outcome["status"][0] == "INVALID_ARGUMENT"  # ~1 M tokens: longer than the context
    assert worst < 0.5, f"a health check waited {worst:.2f} s behind the tokenizer"


# --- hand-serialized payloads: what typed stubs cannot send -----------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, data: bytes) -> bytes:  # length-delimited (wire type 2)
    return _varint(number << 3 | 2) + _varint(len(data)) + data


SAMPLING_3 = pb.SamplingParameters(max_tokens=3, temperature=0, ignore_eos=True).SerializeToString()
UNDECODABLE = {
    "invalid-utf8-prompt": _field(1, b"hi \xff\xfe there") + _field(4, SAMPLING_3),
    "overlong-utf8-prompt": _field(1, b"\xc0\xaf") + _field(4, SAMPLING_3),
    "surrogate-utf8-prompt": _field(1, b"\xed\xa0\x80") + _field(4, SAMPLING_3),
    "invalid-utf8-stop": _field(1, b"Hello") + _field(4, SAMPLING_3 + _field(10, b"\xff")),
    "invalid-utf8-chat": _field(2, _field(1, _field(1, b"user") + _field(2, b"\x80abc"))) + _field(4, SAMPLING_3),
    "truncated": _field(1, b"Hello")[:-2],
    "garbage": b"\xff" * 11,
}


@pytest.mark.parametrize("payload", UNDECODABLE.values(), ids=UNDECODABLE.keys())
def test_undecodable_request_is_invalid_argument(server, channel, payload):
    generate = channel.unary_stream("/neoserve.v1.InferenceService/Generate")
    with pytest.raises(grpc.RpcError) as err:
        list(generate(payload, timeout=20))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.value.code(), err.value.details())


def test_undecodable_request_harms_nothing(server, channel):
    """An undecodable request ends at once and the server keeps serving."""
    generate = channel.unary_stream("/neoserve.v1.InferenceService/Generate")
    tokenize = channel.unary_unary("/neoserve.v1.InferenceService/Tokenize")
    for payload in UNDECODABLE.values():
        with pytest.raises(grpc.RpcError) as err:
            list(generate(payload, timeout=20))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError):
        tokenize(_field(1, b"\xff\xfe"), timeout=20)
    assert all(server.alive().values())


def test_unknown_fields_are_ignored_and_wrong_wire_types_refused(server, channel, reference):
    generate = channel.unary_stream("/neoserve.v1.InferenceService/Generate",
                                    response_deserializer=pb.GenerateResponse.FromString)
    unknown = (_field(1, b"Hello") + _field(4, SAMPLING_3) + _varint(99 << 3) + _varint(7)
               + _field(100, b"\xff\x00junk") + _varint(101 << 3 | 5) + b"abcd")  # varint, bytes, fixed32
    _, ids, complete = collect(generate(unknown, timeout=60))
    assert ids == reference.greedy("Hello", 3) and complete.usage.completion_tokens == 3
    for payload in (_varint(1 << 3) + _varint(5) + _field(4, SAMPLING_3), b""):  # prompt as a varint; nothing
        with pytest.raises(grpc.RpcError) as err:
            list(generate(payload, timeout=20))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("input:")


# --- the sidecar's data plane: malformed and oversized ring records ---------------------------------------------------
# (tests/test_sidecar.py covers corrupt ring records - bad magic, a length past the slot - and per-request errors
# such as unknown sequences; these are well-framed records whose payload lies about itself or cannot be answered.)

PREFIX = "nsrelbad"
SHAPE = AttnShape(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64, dtype="float32")


@pytest.fixture
def sidecar():
    cleanup_stale_segments(PREFIX)
    # NOTE: a response ring of 4 x 4 KiB slots, smaller than the request ring, so a valid request can ask for more
    # than one response can carry.
    client = SidecarClient.spawn(threads=1, kv_cache_gib=0.01, shape=SHAPE, shm_prefix=PREFIX, timeout=20,
                                 extra_args=["--slot-size", "4096", "--request-slots", "32", "--response-slots", "4"])
    try:
        yield client
    finally:
        client.close()
    assert list_segments(PREFIX) == []


def _send_raw(client: SidecarClient, msg_type: int, payload: bytes) -> int:
    tag = client._take_tag()
    buf = client._reserve(len(payload))
    buf[:] = np.frombuffer(payload, np.uint8)
    client._publish(tag, msg_type, _Pending(m.MsgType.ACK, lambda msg: None))
    return tag


def _attn_header(tag: int, batch: int, flags: int = 0) -> bytes:
    head = bytearray(m.HEADER_BYTES)
    m._ATTN.pack_into(head, 0, tag, 0, batch, SHAPE.num_heads, SHAPE.num_kv_heads, SHAPE.head_dim, flags)
    return bytes(head)


def _kv_header(tag: int, seq_id: int, layer: int, start: int, num_tokens: int) -> bytes:
    head = bytearray(m.HEADER_BYTES)
    m._KV.pack_into(head, 0, tag, seq_id, layer, start, num_tokens, SHAPE.num_kv_heads, SHAPE.head_dim)
    return bytes(head)


def _kv_download(tag: int, seq_id: int, layer: int, start: int, end: int) -> bytes:
    buf = np.zeros(m.KV_DOWNLOAD_BYTES, np.uint8)
    m.write_kv_download(buf, tag, seq_id, layer, start, end)
    return buf.tobytes()


def test_malformed_and_oversized_records_are_rejected_and_the_sidecar_keeps_serving(sidecar):
    client = sidecar
    client.create_sequences([1])
    q, kv = torch.randn(1, 8, 64), torch.randn(1, 2, 64)
    client.attention(0, [1], [1], q, kv, kv)
    errors_before = client.stats()["errors"]
    malformed = {
        # an ATTN header describing 65536 rows in a 64-byte payload: a length past the record
        "attn-length-past-record": (m.MsgType.ATTN, lambda tag: _attn_header(tag, m.MAX_DIM)),
        # a row count past any sane bound (it would ask for terabytes)
        "attn-dims-out-of-range": (m.MsgType.ATTN, lambda tag: _attn_header(tag, 2**31)),
        # a payload too short to carry even its tag
        "too-short": (m.MsgType.ATTN, lambda tag: b"\x01\x02\x03"),
        # a KV upload whose header claims more tokens than the payload holds
        "kv-length-past-record": (m.MsgType.KV_UPLOAD, lambda tag: _kv_header(tag, 1, 0, 0, 1000) + b"\0" * 512),
        # a record type the sidecar does not know
        "unknown-type": (99, lambda tag: _attn_header(tag, 1)),
    }
    for name, (msg_type, make) in malformed.items():
        with pytest.raises(ValidationError) as err:
            client.wait(_send_raw(client, msg_type, make(client._next_tag)))
        assert err.value.field == "request", name
    # Oversized answers: a valid 8-row batch whose output does not fit the 16 KiB response ring, and a KV download
    # of more tokens than one response holds. Both are refused (never truncated) and the cache is unchanged.
    tokens_before = client.stats()["sequence_tokens"][1]
    with pytest.raises(ValidationError, match="exceeds the ring's maximum"):
        client.wait(client.submit_attention(0, list(range(1, 9)), [1] * 8, torch.randn(8, 8, 64)))
    with pytest.raises(ValidationError, match="do not fit one response"):
        client.wait(_send_raw(client, m.MsgType.KV_DOWNLOAD, _kv_download(client._next_tag, 1, 0, 0, 1000)))
    stats = client.stats()
    assert stats["sequence_tokens"][1] == tokens_before
    assert stats["errors"] == errors_before + len(malformed) + 2  # each one was counted and reported
    assert client.health().status == 1  # SERVING
    out = client.attention(0, [1], [2], q, kv, kv)  # and the data plane still computes, in order
    assert out.shape == (1, 8, 64) and torch.isfinite(out).all()
    assert client.free_sequences([1]) == 1
