"""One request inside the worker: its tokens, its KV blocks and where its KV lives. Plain Python, no torch."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from neoserve.outputs import FinishReason
from neoserve.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()  # queued, or preempted and waiting to be recomputed
    RUNNING = enum.auto()  # holds KV blocks and is scheduled every step
    FINISHED = enum.auto()


class KVLocation(enum.Enum):
    GPU = "gpu"  # KV in the worker's paged cache; attention on the worker's device
    CPU = "cpu"  # KV in the cpu_attn sidecar; decode attention on the host CPU


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    location: KVLocation = KVLocation.GPU
    # Tokens whose K/V are in the cache. The newest sampled token is not computed until the next step.
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)  # GPU block ids, owned by the BlockManager
    # Prefix caching (gpu_worker/prefix_cache.py): content keys of the full blocks of the tokens known so far, and
    # how many leading entries of block_table the cache has seen (cached, or left private on purpose).
    block_keys: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at its first admission (usage)
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    generator: Any = None  # torch.Generator of a seeded request (made by the runner; opaque here)
    num_preemptions: int = 0
    cpu_wait_steps: int = 0  # consecutive steps a CPU decode was held back (the scheduler bounds it)
    num_emitted_tokens: int = 0  # output tokens already handed to the caller (the engine's delta cursor)
    num_emitted_logprobs: int = 0
    logprobs: list = field(default_factory=list)  # TokenLogprob per output token when params.logprobs is set

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """More than the newest token still needs computing (a fresh prompt, a chunk, or a recompute)."""
        return self.num_uncomputed_tokens > 1

    def token_ids(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]
