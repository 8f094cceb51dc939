"""The OpenAI API's wire format, mapped onto the gateway's transport-neutral requests and events.

Parsing turns the JSON body of /v1/completions or /v1/chat/completions into a `PreparedRequest` with the same
checks the gRPC path runs (SamplingParams, gateway/requests.py), naming fields as the OpenAI API does: a bad field
is a 400 whose `param` is the client's own field name. Sampling fields map one to one; vLLM's extras (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids, skip_special_tokens, include_stop_str_in_output,
cache_salt) and skip_prefix_cache are accepted at the top level of the body, as vLLM accepts them. Unknown fields are ignored, as vLLM does (SDKs send
fields such as `user` that change nothing here); a known field this server does not implement is refused with a
400 naming it, unless it carries its neutral value (n=1, echo=false, ...).

Rendering turns TextDelta/Finished events into response objects and stream chunks, and exceptions into an HTTP
status with an OpenAI-shaped error body: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator

from neoserve.errors import ModelNotFoundError, ValidationError
from neoserve.outputs import TokenLogprob
from neoserve.sampling_params import NEUTRAL_DEFAULTS, GenerationDefaults, resolve, validate_prompt
from neoserve.tokenizer import ids_to_bytes

from gateway import requests
from gateway.generation import Finished, ModelState, TextDelta
from gateway.requests import PreparedRequest
from gateway.status import classify, log_if_internal

CHAT = "chat"
COMPLETION = "completion"

COMPLETION_DEFAULT_MAX_TOKENS = 16  # the OpenAI API's (and vLLM's) default for /v1/completions
# NOTE: the deepest a request's own fields nest is messages[i].content[j].text (4 levels); the rest is headroom.
MAX_JSON_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")
# NOTE: JSON has no -inf; a token the sampler filtered out has logprob -inf. vLLM reports such values as -9999.
MIN_LOGPROB = -9999.0

# Body field -> SamplingParams field, for fields that need no conversion.
_SAMPLING_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "top_k", "min_p",
                    "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids", "cache_salt",
                    "skip_prefix_cache")

# Fields of the OpenAI API this server does not implement -> the values that mean "not used".
_UNSUPPORTED = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}

@dataclass
class OpenAIRequest:
    """A parsed /v1/completions or /v1/chat/completions request."""

    endpoint: str  # CHAT or COMPLETION
    model: str  # the served model's name, echoed in responses
    prepared: PreparedRequest
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carries the usage
    logprobs: bool  # whether choices carry logprobs


# --- models ---------------------------------------------------------------------------------------------------------

def served_model_name(configured: str | None, model: ModelState) -> str:
    """The name /v1/models lists: --served-model-name, else the model's own name (as gRPC ModelInfo reports it)."""
    return configured or model.info.model_id


def accepted_model_names(configured: str | None, model: ModelState) -> tuple[str, ...]:
    """Names a request may give in `model`: the served name; without --served-model-name also the model spec the
    server was started with (the --model path, or "embedded"), which is what a vLLM user would type."""
    names = [served_model_name(configured, model)]
    if configured is None:
        names.append(model.info.model_spec or "embedded")
    return tuple(names)


def model_card(name: str, model: ModelState, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "neoserve",
            "root": model.info.model_spec or "embedded", "max_model_len": model.info.max_model_len}


# --- parsing --------------------------------------------------------------------------------------------------------

def load_body(raw: bytes | bytearray) -> dict[str, Any]:
    """The request's JSON object, checked for what JSON allows but no field here can take: nesting past
    MAX_JSON_DEPTH and strings that are not Unicode text (a lone UTF-16 surrogate such as "\\ud800")."""
    try:
        body = json.loads(raw)
    except RecursionError as e:
        raise ValidationError("body", f"the JSON nests too deeply to parse (a request needs at most "
                                      f"{MAX_JSON_DEPTH} levels)") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise ValidationError("body", f"could not parse the JSON body of the request: {e}") from e
    if not isinstance(body, dict):
        raise ValidationError("body", "the request body must be a JSON object")
    _check_json(body)
    return body


def _check_json(body: dict[str, Any]) -> None:
    """Raises ValidationError naming the field ("messages[0].content") that nests too deep or holds a string
    that is not valid Unicode. Iterative: the depth a parser accepts must not overflow this walk's stack."""
    stack: list[tuple[str, Any, int]] = [(key, value, 1) for key, value in body.items()]
    for key in body:
        _check_text(key, "body")
    while stack:
        path, value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise ValidationError(path, f"nests deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(value, dict):
                for k, v in value.items():
                    _check_text(k, path)
                    stack.append((f"{path}.{k}", v, depth + 1))
            else:
                stack.extend((f"{path}[{i}]", v, depth + 1) for i, v in enumerate(value))


def _check_text(text: str, field: str) -> None:
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise ValidationError(field, f"contains a lone UTF-16 surrogate (\\u{ord(bad.group()):04x} at character "
                                     f"{bad.start()}), which is not Unicode text; send valid UTF-8 or a \\u escape "
                                     "pair")


def parse_chat(body: dict[str, Any], model: ModelState, names: tuple[str, ...]) -> OpenAIRequest:
    name = _check_common(body, names)
    logprobs = _bool(body, "logprobs", False)
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None and not logprobs:
        raise ValidationError("top_logprobs", "needs logprobs set to true")
    messages = _messages(body.get("messages"))
    # NOTE: the tokenizer reports a bad conversation and validate_prompt a too-long one as "prompt"; here the
    # client's field is "messages". max_completion_tokens replaced max_tokens in the OpenAI API; either works.
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    with _param_names({"prompt": "messages", "max_tokens": max_name, "logprobs": "top_logprobs"}):
        ids = requests.encode_chat(messages, model.tokenizer, "messages")
        max_tokens = body.get(max_name)
        if max_tokens is None:  # NOTE: as OpenAI and vLLM do: up to the end of the model's context
            max_tokens = max(1, model.info.max_model_len - len(ids))
        lp = (0 if top_logprobs is None else top_logprobs) if logprobs else None
        prepared = _prepared(body, model, ids, max_tokens=max_tokens, logprobs=lp)
    return _request(CHAT, body, name, prepared, logprobs)


def parse_completion(body: dict[str, Any], model: ModelState, names: tuple[str, ...]) -> OpenAIRequest:
    name = _check_common(body, names)
    with _param_names({"prompt_token_ids": "prompt"}):
        ids = _prompt_ids(body.get("prompt"), model.tokenizer)
        max_tokens = body.get("max_tokens")
        prepared = _prepared(body, model, ids, logprobs=body.get("logprobs"),
                             max_tokens=COMPLETION_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens)
    return _request(COMPLETION, body, name, prepared, prepared.params.logprobs is not None)


def _check_common(body: dict[str, Any], names: tuple[str, ...]) -> str:
    """Checks the fields both endpoints share but sampling does not use; returns the served model's name."""
    name = body.get("model")
    if name is not None:
        if not isinstance(name, str):
            raise ValidationError("model", "must be a string")
        if name not in names:
            raise ModelNotFoundError(name)
    for field, neutral in _UNSUPPORTED.items():
        value = body.get(field)
        if not any(value is v or (type(value) is type(v) and value == v) for v in neutral):
            raise ValidationError(field, f"is not supported by this server (got {json.dumps(value)[:80]})")
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise ValidationError("stream_options", "is only allowed when stream is true")
        if not isinstance(options, dict):
            raise ValidationError("stream_options", "must be an object")
        _bool(options, "include_usage", False, field="stream_options.include_usage")
    return names[0]


def _request(endpoint: str, body: dict[str, Any], name: str, prepared: PreparedRequest,
             logprobs: bool) -> OpenAIRequest:
    stream = _bool(body, "stream", False)
    include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
    return OpenAIRequest(endpoint, name, prepared, stream, include_usage, logprobs)


def _prepared(body: dict[str, Any], model: ModelState, ids: list[int], *, max_tokens, logprobs) -> PreparedRequest:
    kwargs = {field: body[field] for field in _SAMPLING_FIELDS if body.get(field) is not None}
    if kwargs.get("top_k") == -1 and type(kwargs["top_k"]) is int:
        kwargs["top_k"] = 0  # NOTE: vLLM's "no top-k" is -1; ours is 0
    stop = body.get("stop")
    if stop is not None:
        kwargs["stop"] = [stop] if isinstance(stop, str) else stop
    params = resolve({"max_tokens": max_tokens, "logprobs": logprobs, **kwargs}, _defaults(model))
    validate_prompt(ids, params, max_model_len=model.info.max_model_len, vocab_size=model.info.vocab_size)
    return PreparedRequest(ids, params, skip_special_tokens=_bool(body, "skip_special_tokens", True),
                           include_stop_str_in_output=_bool(body, "include_stop_str_in_output", False))


def _defaults(model: ModelState) -> GenerationDefaults:
    # NOTE: getattr: callers that describe a model by hand (tests, tools) may give no defaults: neutral ones then.
    return getattr(model, "defaults", NEUTRAL_DEFAULTS)


def _bool(body: dict[str, Any], name: str, default: bool, *, field: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValidationError(field or name, f"must be a boolean, got {json.dumps(value)[:80]}")
    return value


def _messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI chat messages -> {"role", "content"} dicts with text content (other message keys are dropped)."""
    if not isinstance(messages, list):
        raise ValidationError("messages", "must be a list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValidationError(f"messages[{i}]", "must be an object with role and content")
        role = m.get("role")
        if not isinstance(role, str):
            raise ValidationError(f"messages[{i}].role", "must be a string")
        content = m.get("content")
        if content is None and role != "assistant":
            # NOTE: as the OpenAI API: only an assistant turn (one that called tools) may come without content.
            raise ValidationError(f"messages[{i}].content", f"is required in a {role!r} message")
        out.append({"role": role, "content": _content(content, f"messages[{i}].content")})
    return out


def _content(content: Any, field: str) -> str:
    if content is None:  # an assistant turn that only called tools
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValidationError(field, "must be a string or a list of content parts")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValidationError(field, f"only text content parts are supported, got {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)  # NOTE: as vLLM joins text parts


def _prompt_ids(prompt: Any, tokenizer) -> list[int]:
    """A completions prompt: a string, token ids, or a list holding one of those (batches are not supported)."""
    if isinstance(prompt, str):
        return requests.encode_text(prompt, tokenizer, "prompt")
    if isinstance(prompt, list):
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)  # token ids, checked against the vocabulary by validate_prompt
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            return _prompt_ids(prompt[0], tokenizer)
        if all(isinstance(p, (str, list)) for p in prompt):
            raise ValidationError("prompt", f"one prompt per request is supported, got {len(prompt)}; "
                                            "send one request each")
    raise ValidationError("prompt", "must be a string, a list of token ids, or a list holding one of those")


@contextlib.contextmanager
def _param_names(names: dict[str, str]) -> Iterator[None]:
    """Renames the field of a ValidationError raised inside to the client's name for it."""
    try:
        yield
    except ValidationError as e:
        if e.field not in names or isinstance(e, ModelNotFoundError):
            raise
        raise ValidationError(names[e.field], e.message) from e


# --- rendering ------------------------------------------------------------------------------------------------------

def usage(fin: Finished) -> dict[str, int]:
    return {"prompt_tokens": fin.prompt_tokens, "completion_tokens": fin.completion_tokens,
            "total_tokens": fin.total_tokens, "prompt_tokens_details": {"cached_tokens": fin.cached_tokens}}


class ResponseFormat:
    """The response objects of one request. `ChatFormat` and `CompletionFormat` fill in what differs."""

    id_prefix = ""
    object_name = ""
    chunk_object_name = ""

    def __init__(self, req: OpenAIRequest, request_id: str, tokenizer):
        self.req = req
        self.id = self.id_prefix + request_id
        self.created = int(time.time())
        self._tokenizer = tokenizer
        self._bytes = tokenizer.byte_table(False)

    def _token(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])

    def _envelope(self, object_name: str, choices: list[dict], **extra) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.req.model,
                "choices": choices, **extra}

    def _chunk(self, choices: list[dict]) -> dict[str, Any]:
        # NOTE: with include_usage every chunk carries "usage": null but the last, as the OpenAI API does.
        extra = {"usage": None} if self.req.include_usage else {}
        return self._envelope(self.chunk_object_name, choices, **extra)

    # subclasses: what a choice looks like
    def _delta_choice(self, text: str, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        raise NotImplementedError

    def _final_choice(self, fin: Finished) -> dict[str, Any]:
        raise NotImplementedError

    def _full_choice(self, text: str, logprobs: list[TokenLogprob], fin: Finished) -> dict[str, Any]:
        raise NotImplementedError

    def stream_start(self) -> list[dict[str, Any]]:
        return []

    def stream_delta(self, ev: TextDelta) -> dict[str, Any] | None:
        """The chunk for one event; None when it carries nothing to send."""
        logprobs = ev.logprobs if self.req.logprobs else []
        if not ev.text and not logprobs:
            return None
        return self._chunk([self._delta_choice(ev.text, logprobs)])

    def stream_end(self, fin: Finished) -> list[dict[str, Any]]:
        chunks = [self._chunk([self._final_choice(fin)])]
        if self.req.include_usage:
            chunks.append(self._envelope(self.chunk_object_name, [], usage=usage(fin)))
        return chunks

    def full(self, deltas: list[TextDelta], fin: Finished) -> dict[str, Any]:
        text = "".join(d.text for d in deltas)
        logprobs = [lp for d in deltas for lp in d.logprobs] if self.req.logprobs else []
        return self._envelope(self.object_name, [self._full_choice(text, logprobs, fin)], usage=usage(fin))


class ChatFormat(ResponseFormat):
    id_prefix = "chatcmpl-"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": self._token(token_id), "logprob": max(logprob, MIN_LOGPROB),
                "bytes": list(ids_to_bytes(self._bytes, [token_id]))}

    def _logprobs(self, logprobs: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.req.logprobs:
            return None
        return {"content": [{**self._entry(lp.token_id, lp.logprob),
                             "top_logprobs": [self._entry(t, v) for t, v in lp.top]} for lp in logprobs]}

    def stream_start(self) -> list[dict[str, Any]]:
        return [self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])]

    def _delta_choice(self, text: str, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        return {"index": 0, "delta": {"content": text}, "logprobs": self._logprobs(logprobs), "finish_reason": None}

    def _final_choice(self, fin: Finished) -> dict[str, Any]:
        return {"index": 0, "delta": {}, "logprobs": None, "finish_reason": fin.finish_reason}

    def _full_choice(self, text: str, logprobs: list[TokenLogprob], fin: Finished) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": self._logprobs(logprobs),
                "finish_reason": fin.finish_reason}


class CompletionFormat(ResponseFormat):
    id_prefix = "cmpl-"
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def __init__(self, req: OpenAIRequest, request_id: str, tokenizer):
        super().__init__(req, request_id, tokenizer)
        self._offset = 0  # characters of completion text before the next token, for logprobs.text_offset

    def _logprobs(self, logprobs: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.req.logprobs:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in logprobs:
            token = self._token(lp.token_id)
            out["tokens"].append(token)
            out["token_logprobs"].append(max(lp.logprob, MIN_LOGPROB))
            out["top_logprobs"].append({self._token(t): max(v, MIN_LOGPROB) for t, v in lp.top})
            out["text_offset"].append(self._offset)
            self._offset += len(token)
        return out

    def _delta_choice(self, text: str, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": self._logprobs(logprobs), "finish_reason": None}

    def _final_choice(self, fin: Finished) -> dict[str, Any]:
        return {"index": 0, "text": "", "logprobs": None, "finish_reason": fin.finish_reason}

    def _full_choice(self, text: str, logprobs: list[TokenLogprob], fin: Finished) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": self._logprobs(logprobs), "finish_reason": fin.finish_reason}


def response_format(req: OpenAIRequest, request_id: str, tokenizer) -> ResponseFormat:
    return (ChatFormat if req.endpoint == CHAT else CompletionFormat)(req, request_id, tokenizer)


# --- errors ---------------------------------------------------------------------------------------------------------

def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, error body, headers) for an exception raised while serving a request."""
    failure = classify(exc)
    log_if_internal(failure, exc)
    status = failure.status
    headers = {}
    if failure.retry_after_ms is not None:
        # NOTE: Retry-After takes whole seconds; the OpenAI SDKs read the finer retry-after-ms first.
        headers = {"Retry-After": str(math.ceil(failure.retry_after_ms / 1000)),
                   "retry-after-ms": str(failure.retry_after_ms)}
    param = failure.field if failure.field != "body" else None
    # NOTE: the message of an error that names a field still starts with it, as gRPC clients get it.
    return status.http_status, error_body(failure.details, status.http_type, param, status.http_code), headers
