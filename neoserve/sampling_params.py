"""Per-request generation parameters, validated on construction, and the one place that fills in what a request
leaves unset from the model's own generation defaults (`resolve`).

Shared by the gateway (which validates client input and resolves defaults) and the worker (which samples with
the resolved values it is sent).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from neoserve.errors import ValidationError

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_SEED = 2**63 - 1
MAX_CACHE_SALT_CHARS = 1024
MAX_INT32 = 2**31 - 1  # NOTE: the public gRPC API carries these counts as int32; JSON integers have no bound


def _number(name: str, value, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(name, f"must be a number, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        raise ValidationError(name, f"must be an integer, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(name, f"must be finite, got {value!r}")
    if not integer and isinstance(value, int) and abs(value) > 2**53:
        # NOTE: a JSON integer can have any number of digits; as a float it would overflow or lose digits.
        raise ValidationError(name, f"must be a number of a sensible size, got {str(value)[:40]}")
    return value


def _count(name: str, value, lo: int, hi: int = MAX_INT32, what: str = "") -> int:
    """An integer field in [lo, hi]; `what` explains the value's meaning in the error message."""
    _number(name, value, integer=True)
    if not lo <= value <= hi:
        shown = str(value) if len(str(value)) <= 24 else str(value)[:20] + "..."
        raise ValidationError(name, f"must be in [{lo}, {hi}]{what}, got {shown}")
    return value


@dataclass
class SamplingParams:
    """Sampling and stopping parameters of one request (vLLM semantics).

    temperature == 0 means greedy. top_k == 0 disables top-k. logprobs == None returns none; logprobs == n returns
    the chosen token's log-probability and the top n alternatives.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    # Prefix caching: requests share cached KV only when their salts are equal (isolates tenants, as vLLM's
    # cache_salt); skip_prefix_cache neither reads nor adds to the cache.
    cache_salt: str | None = None
    skip_prefix_cache: bool = False

    def __post_init__(self) -> None:
        _count("max_tokens", self.max_tokens, 1)
        _number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValidationError("temperature", f"must be >= 0 (0 means greedy), got {self.temperature}")
        _count("top_k", self.top_k, 0, what=" (0 disables top-k)")
        _number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValidationError("top_p", f"must be in (0, 1], got {self.top_p}")
        _number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValidationError("min_p", f"must be in [0, 1], got {self.min_p}")
        _number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValidationError("repetition_penalty", f"must be > 0 (1 disables it), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _number(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise ValidationError(name, f"must be in [-2, 2], got {value}")
        if self.seed is not None:
            _count("seed", self.seed, 0, MAX_SEED)
        if not isinstance(self.stop, (list, tuple)):
            raise ValidationError("stop", f"must be a list of strings, got {type(self.stop).__name__}")
        self.stop = list(self.stop)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValidationError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str):
                raise ValidationError("stop", f"each stop sequence must be a string, got {type(s).__name__}")
            if not s:
                raise ValidationError("stop", "stop strings must not be empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValidationError("stop", f"each stop string is at most {MAX_STOP_STRING_CHARS} characters")
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValidationError("stop_token_ids", "must be a list of integers")
        self.stop_token_ids = list(self.stop_token_ids)
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValidationError("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        for t in self.stop_token_ids:
            _count("stop_token_ids", t, 0, what=" (token ids)")
        if not isinstance(self.ignore_eos, bool):
            raise ValidationError("ignore_eos", "must be a boolean")
        _count("min_tokens", self.min_tokens, 0, self.max_tokens, what=" (at most max_tokens)")
        if self.logprobs is not None:
            _count("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.cache_salt is not None:
            if not isinstance(self.cache_salt, str):
                raise ValidationError("cache_salt", f"must be a string, got {type(self.cache_salt).__name__}")
            if not 0 < len(self.cache_salt) <= MAX_CACHE_SALT_CHARS:
                raise ValidationError("cache_salt", f"must be 1 to {MAX_CACHE_SALT_CHARS} characters (leave it out "
                                                    "for no salt)")
            try:
                self.cache_salt.encode("utf-8")
            except UnicodeEncodeError:
                raise ValidationError("cache_salt", "must be valid Unicode text (it has a lone surrogate)") from None
        if not isinstance(self.skip_prefix_cache, bool):
            raise ValidationError("skip_prefix_cache", "must be a boolean")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationDefaults:
    """The sampling values a model's makers recommend (neoserve/model_defaults.py reads them from its files).

    Requests that leave a field unset get these; the class defaults are the neutral values (no truncation, no
    penalty, temperature 1), used for a model that ships none.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    source: str = "neutral values (the model ships no generation defaults)"  # for logs: where they came from

    def __post_init__(self) -> None:
        SamplingParams(**self.sampling_fields())  # NOTE: validates them; a bad model file names the field

    def sampling_fields(self) -> dict[str, Any]:
        fields = asdict(self)
        del fields["source"]
        return fields


NEUTRAL_DEFAULTS = GenerationDefaults()


def resolve(requested: dict[str, Any], defaults: GenerationDefaults = NEUTRAL_DEFAULTS) -> SamplingParams:
    """The request's SamplingParams: the fields it set (`requested` holds only those; None counts as unset) over
    the model's generation defaults, over SamplingParams' own defaults. The only place defaults are resolved."""
    given = {name: value for name, value in requested.items() if value is not None}
    return SamplingParams(**{**defaults.sampling_fields(), **given})


def validate_prompt(prompt_token_ids: list[int], params: SamplingParams, *, max_model_len: int, vocab_size: int) -> None:
    """Checks a tokenized prompt against the model. Raises ValidationError naming the field."""
    if len(prompt_token_ids) == 0:
        raise ValidationError("prompt", "must not be empty")
    if len(prompt_token_ids) >= max_model_len:
        raise ValidationError(
            "prompt", f"is {len(prompt_token_ids)} tokens; the model's context is {max_model_len} tokens"
        )
    for t in prompt_token_ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValidationError("prompt_token_ids", f"token ids must be integers in [0, {vocab_size}), got {t!r}")
    for t in params.stop_token_ids:
        if t >= vocab_size:
            raise ValidationError("stop_token_ids", f"token ids must be < vocab size {vocab_size}, got {t}")
