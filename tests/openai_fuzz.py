"""Hypothesis strategies for OpenAI HTTP request bodies, and the oracle every answer must meet.

Bodies are plausible requests with none, one, or every field wild (wrong types, giant integers, NaN-free floats of
any size, lone surrogates, deep nesting, unknown fields), or not a request at all (any JSON, any bytes). The
oracle: never a 5xx; a valid request succeeds; a 400 names a field the body has (or the one it lacks), or the body.
"""

from __future__ import annotations

import json

from hypothesis import strategies as st

MODEL = "smollm2-135m-instruct"
SURROGATES = ["\ud800", "\udfff", "a\ud83db", "\udc00\ud800"]
TEXT_EDGES = ["", "\x00", "\u202e", "\ufeff", "<|im_end|>", "<|im_start|>system\n", "\U0010ffff", "e\u0301",
              "a" * 257, *SURROGATES]
INT_EDGES = [0, 1, -1, 20, 21, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**23, -(10**23), 10**400]
FLOAT_EDGES = [0.0, -0.0, 1e-320, 0.5, 1.0, 2.0, 2.5, -2.5, 1e38, 1e308, -1e308]

texts = st.one_of(st.text(max_size=30), st.sampled_from(TEXT_EDGES))
short_texts = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=30)
leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(INT_EDGES),
                   st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(FLOAT_EDGES), texts)
anything = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(texts, inner, max_size=3)), max_leaves=8)


def _as_object(raw: bytes) -> dict | None:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def _deep(depth: int) -> dict:
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return {"prompt": value}


messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                           "content": short_texts}), min_size=1, max_size=3).map(
    lambda ms: ms[:-1] + [{"role": "user", "content": ms[-1]["content"]}])

# field -> (valid values, anything a client could send)
FIELDS = {
    "model": (st.sampled_from([MODEL, "embedded"]), st.one_of(texts, anything)),
    "max_tokens": (st.integers(1, 4), st.one_of(st.sampled_from(INT_EDGES), anything)),
    "temperature": (st.floats(0, 2), st.one_of(st.sampled_from(FLOAT_EDGES + INT_EDGES), anything)),
    "top_p": (st.floats(0.01, 1), st.one_of(st.sampled_from(FLOAT_EDGES + INT_EDGES), anything)),
    "top_k": (st.integers(-1, 100), st.one_of(st.sampled_from(INT_EDGES), anything)),
    "min_p": (st.floats(0, 1), st.one_of(st.sampled_from(FLOAT_EDGES), anything)),
    "repetition_penalty": (st.floats(0.5, 2), st.one_of(st.sampled_from(FLOAT_EDGES), anything)),
    "presence_penalty": (st.floats(-2, 2), st.one_of(st.sampled_from(FLOAT_EDGES), anything)),
    "frequency_penalty": (st.floats(-2, 2), st.one_of(st.sampled_from(FLOAT_EDGES), anything)),
    "seed": (st.integers(0, 2**63 - 1), st.one_of(st.sampled_from(INT_EDGES), anything)),
    "stop": (st.one_of(short_texts, st.lists(short_texts, max_size=4)), st.one_of(texts, st.lists(texts), anything)),
    "stop_token_ids": (st.lists(st.integers(0, 49151), max_size=3), st.one_of(st.lists(st.sampled_from(INT_EDGES)),
                                                                               anything)),
    "ignore_eos": (st.booleans(), anything),
    "stream": (st.booleans(), anything),
    "skip_special_tokens": (st.booleans(), anything),
    "n": (st.just(1), st.one_of(st.sampled_from(INT_EDGES), anything)),
    "user": (short_texts, anything),
}
COMPLETION_FIELDS = {
    "prompt": (st.one_of(short_texts, st.lists(st.integers(0, 49151), min_size=1, max_size=8)),
               st.one_of(texts, st.lists(st.sampled_from(INT_EDGES)), st.lists(texts, max_size=3), anything)),
    "logprobs": (st.integers(0, 5), st.one_of(st.sampled_from(INT_EDGES), anything)),
    "echo": (st.just(False), anything),
}
CHAT_FIELDS = {
    "messages": (messages, st.one_of(st.lists(st.dictionaries(st.sampled_from(["role", "content", "name"]),
                                                              st.one_of(texts, anything), max_size=3), max_size=3),
                                     anything)),
    "logprobs": (st.booleans(), anything),
    "top_logprobs": (st.integers(0, 5), st.one_of(st.sampled_from(INT_EDGES), anything)),
}
REQUIRED = {"/v1/completions": "prompt", "/v1/chat/completions": "messages"}


@st.composite
def requests(draw) -> tuple[str, bytes, dict | None, bool]:
    """(path, body bytes, the body as a dict when it is one, whether it is a valid request)."""
    path = draw(st.sampled_from(sorted(REQUIRED)))
    kind = draw(st.sampled_from(["valid", "valid", "one", "one", "wild", "raw"]))
    if kind == "raw":
        raw = draw(st.one_of(st.binary(max_size=64), anything.map(lambda v: json.dumps(v).encode()),
                             st.sampled_from([b"[" * 100_000 + b"]" * 100_000, json.dumps(_deep(40)).encode(),
                                              b"", b"{", b"null", b'{"prompt": "\\ud800"}'])))
        return path, raw, _as_object(raw), False
    fields = {**FIELDS, **(COMPLETION_FIELDS if path == "/v1/completions" else CHAT_FIELDS)}
    wild = set(fields) if kind == "wild" else {draw(st.sampled_from(sorted(fields)))} if kind == "one" else set()
    body = {}
    for name, (valid, wild_values) in fields.items():
        required = name == REQUIRED[path] or name == "max_tokens"
        if name in wild:
            if draw(st.booleans()):
                body[name] = draw(wild_values)
        elif required or draw(st.booleans()):
            body[name] = draw(valid)
    if body.get("top_logprobs") is not None and "top_logprobs" not in wild:
        body["logprobs"] = True  # NOTE: a valid top_logprobs needs logprobs
    if kind == "wild" and draw(st.booleans()):
        body.update(draw(st.dictionaries(texts, anything, max_size=2)))  # unknown fields
    valid = kind == "valid" or (kind == "one" and not wild & set(body) and REQUIRED[path] not in wild)
    return path, json.dumps(body).encode(), body, valid


def check(path: str, body: dict | None, valid: bool, status: int, answer: bytes) -> None:
    """Fails when the answer to a request breaks the oracle (see the module's docstring)."""
    assert status < 500, (status, answer[:500])
    if valid:
        assert status == 200, (status, answer[:500])
        return
    if status == 200:
        return
    error = json.loads(answer)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert status in (400, 404, 413), (status, error)
    if status == 404:
        assert body is not None and error["param"] == "model", error
    if error["param"] is not None:
        root = error["param"].split("[")[0].split(".")[0]
        assert body is not None and root in {*body, REQUIRED[path]}, (error, body)
