"""Paged KV cache bookkeeping: which fixed-size blocks each sequence owns. Plain Python, no torch."""

from __future__ import annotations

from collections import deque

from gpu_worker.sequence import Sequence


class BlockManager:
    """Hands out block ids of one paged cache. A sequence's block_table covers its first
    len(block_table) * block_size token positions."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs so that its table covers `num_tokens` positions."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"allocate: {needed} blocks needed, {len(self._free)} free (call can_allocate first)")
        for _ in range(needed):
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        # NOTE: reversed so the most recently used blocks are handed out last (keeps tables of hot sequences warm).
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []


class CpuKVBudget:
    """The scheduler's view of the sidecar's KV capacity: block counts per sequence, no block ids.

    NOTE: the sidecar pages its own arena; mirroring its block size and count here lets the scheduler decide
    placements without a round trip, and the sidecar's own CapacityError remains the backstop."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._blocks: dict[int, int] = {}  # seq_id -> blocks reserved
        self._used = 0

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self._used

    @property
    def num_used_blocks(self) -> int:
        return self._used

    def _needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - self._blocks.get(seq.seq_id, 0))

    def can_reserve(self, seq: Sequence, num_tokens: int) -> bool:
        return self._needed(seq, num_tokens) <= self.num_free_blocks

    def reserve(self, seq: Sequence, num_tokens: int) -> None:
        needed = self._needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"reserve: {needed} CPU blocks needed, {self.num_free_blocks} free")
        self._blocks[seq.seq_id] = self._blocks.get(seq.seq_id, 0) + needed
        self._used += needed

    def free(self, seq: Sequence) -> None:
        self._used -= self._blocks.pop(seq.seq_id, 0)
