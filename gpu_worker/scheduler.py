"""Decides, every step, which sequences run and how many tokens each computes. Plain Python, no torch.

One step mixes decodes (one token per running sequence) and prefill chunks (up to the token budget), as continuous
batching with chunked prefill does. When GPU KV blocks run out, the newest running sequence is preempted: its blocks
are freed and it is recomputed later from its prompt and the tokens it already produced (vLLM's recompute policy).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from gpu_worker.block_manager import BlockManager
from gpu_worker.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from seq.num_computed_tokens on

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens, so the step samples a next token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    decodes: list[ScheduledSeq] = field(default_factory=list)  # one token each
    prefills: list[ScheduledSeq] = field(default_factory=list)  # prompt chunks or recomputes
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, str]] = field(default_factory=list)  # can never fit: finished with an error

    @property
    def scheduled(self) -> list[ScheduledSeq]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drops a sequence (finished or aborted) and frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager

        # 1. Running sequences first, oldest first: decodes and unfinished prefill chunks.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not bm.can_allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:  # preempted itself: nothing older could give way
                break
            bm.allocate(seq, seq.num_computed_tokens + n)
            (out.prefills if seq.is_prefill else out.decodes).append(ScheduledSeq(seq, n))
            budget -= n
            i += 1

        # 2. Admit waiting sequences (FCFS) while budget, slots and blocks allow. None after a preemption this step:
        # NOTE: admitting then would just evict the sequence we preempted a moment ago.
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if bm.blocks_for(seq.num_tokens + 1) > bm.num_blocks:
                self.waiting.popleft()
                out.failed.append((seq, f"needs {seq.num_tokens + 1} tokens of KV; the cache holds "
                                        f"{bm.num_blocks * bm.block_size}"))
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if not bm.can_allocate(seq, seq.num_computed_tokens + n):
                break
            self.waiting.popleft()
            bm.allocate(seq, seq.num_computed_tokens + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            (out.prefills if seq.is_prefill else out.decodes).append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        for group in (out.decodes, out.prefills):
            group[:] = [s for s in group if s.seq is not seq]
