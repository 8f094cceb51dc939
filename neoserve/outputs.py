"""What the engine hands back per request and step. Plain data, shared by worker and gateway."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id, or a stop string
    LENGTH = "length"  # max_tokens or the model's context reached
    ABORT = "abort"  # cancelled by the client, a deadline, or a shutdown
    ERROR = "error"  # the server failed this request


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class RequestOutput:
    """Tokens a request produced since its previous RequestOutput (a delta), and whether it finished."""

    request_id: str
    new_token_ids: list[int]
    num_prompt_tokens: int
    num_output_tokens: int  # total so far, including new_token_ids
    new_logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None  # the token that stopped it, if any (not part of new_token_ids' text)
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (usage: cached_tokens)
