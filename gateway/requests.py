"""Turns a client request into what the worker runs: prompt token ids and validated SamplingParams.

`PreparedRequest` is the transport-neutral result. This module builds it from a gRPC GenerateRequest and holds the
input checks both transports share (gateway/openai_protocol.py builds it from OpenAI JSON with the same helpers).
All client-input validation happens here (and in SamplingParams itself), so a bad field is reported with its name
before any work reaches the worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from neoserve.errors import ValidationError
from neoserve.internal.v1 import worker_pb2
from neoserve.sampling_params import NEUTRAL_DEFAULTS, GenerationDefaults, SamplingParams, resolve, validate_prompt
from neoserve.v1 import inference_service_pb2 as pb

# Optional proto fields (and SamplingParams fields of the same name): unset ones get the model's defaults.
_OPTIONAL_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty", "seed", "logprobs", "cache_salt")
MAX_CHAT_MESSAGES = 1024
MAX_PROMPT_CHARS = 4_000_000  # NOTE: bounds tokenizer work per request long before max_model_len is checked


@dataclass
class PreparedRequest:
    """A validated request, whichever transport it came from."""

    prompt_token_ids: list[int]
    params: SamplingParams
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


def sampling_params_from_proto(sp: pb.SamplingParameters,
                               defaults: GenerationDefaults = NEUTRAL_DEFAULTS) -> tuple[SamplingParams, bool]:
    """(SamplingParams, skip_special_tokens); fields the request leaves unset get the model's `defaults`. Raises
    ValidationError naming the field."""
    kwargs = {name: getattr(sp, name) for name in _OPTIONAL_FIELDS if sp.HasField(name)}
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if name in kwargs:
            kwargs[name] = float(kwargs[name])
    kwargs["stop"] = list(sp.stop)
    kwargs["stop_token_ids"] = list(sp.stop_token_ids)
    kwargs["ignore_eos"] = sp.ignore_eos
    kwargs["min_tokens"] = sp.min_tokens
    kwargs["skip_prefix_cache"] = sp.skip_prefix_cache
    params = resolve(kwargs, defaults)
    skip_special = sp.skip_special_tokens if sp.HasField("skip_special_tokens") else True
    return params, skip_special


def check_messages(messages: list[dict[str, str]], field: str) -> None:
    """Bounds a conversation before the chat template renders it. `field` is the transport's name for the list."""
    if not messages:
        raise ValidationError(field, "must contain at least one message")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise ValidationError(field, f"at most {MAX_CHAT_MESSAGES} messages")
    for i, m in enumerate(messages):
        if not m["role"]:
            raise ValidationError(f"{field}[{i}].role", "must not be empty")
    if sum(len(m["content"]) for m in messages) > MAX_PROMPT_CHARS:
        raise ValidationError(field, f"at most {MAX_PROMPT_CHARS} characters in all")


def encode_text(text: str, tokenizer, field: str) -> list[int]:
    """Token ids of a raw-text prompt (tokenized as is). `field` names it in errors."""
    if len(text) > MAX_PROMPT_CHARS:
        raise ValidationError(field, f"at most {MAX_PROMPT_CHARS} characters")
    if not text:
        raise ValidationError(field, "must not be empty")
    return list(tokenizer.encode(text))


def encode_chat(messages: list[dict[str, str]], tokenizer, field: str) -> list[int]:
    """Token ids of a conversation: checked, rendered with the model's chat template plus the generation prompt."""
    check_messages(messages, field)
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ValidationError as e:  # the tokenizer names the field "messages"; the transport may call it otherwise
        raise ValidationError(field, e.message) from e
    if isinstance(ids, str):
        ids = tokenizer.encode(ids)
    return list(ids)


def prompt_token_ids(request, tokenizer) -> list[int]:
    """Token ids of a GenerateRequest's or TokenizeRequest's input (whichever oneof member is set)."""
    kind = request.WhichOneof("input")
    if kind in ("prompt", "text"):
        return encode_text(getattr(request, kind), tokenizer, kind)
    if kind == "chat":
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        return encode_chat(messages, tokenizer, "chat.messages")
    if kind == "prompt_token_ids":
        return list(request.prompt_token_ids.ids)
    raise ValidationError("input", "set one of prompt, chat or prompt_token_ids")


def prepare(request: pb.GenerateRequest, tokenizer, *, max_model_len: int, vocab_size: int,
            defaults: GenerationDefaults = NEUTRAL_DEFAULTS) -> PreparedRequest:
    params, skip_special = sampling_params_from_proto(request.sampling, defaults)
    ids = prompt_token_ids(request, tokenizer)
    validate_prompt(ids, params, max_model_len=max_model_len, vocab_size=vocab_size)
    return PreparedRequest(ids, params, skip_special)


def worker_params(params: SamplingParams) -> worker_pb2.SamplingParams:
    out = worker_pb2.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
        min_p=params.min_p, repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos, min_tokens=params.min_tokens, skip_prefix_cache=params.skip_prefix_cache,
    )
    if params.cache_salt is not None:
        out.cache_salt = params.cache_salt
    if params.seed is not None:
        out.seed = params.seed
    if params.logprobs is not None:
        out.logprobs = params.logprobs
    return out

