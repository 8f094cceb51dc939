"""Paged KV cache bookkeeping: which fixed-size blocks each sequence owns, shared prefix blocks included. Plain
Python, no torch."""

from __future__ import annotations

import heapq

from gpu_worker.prefix_cache import PrefixCache
from gpu_worker.sequence import Sequence


class BlockManager:
    """Hands out block ids of one paged cache. A sequence's block_table covers its first
    len(block_table) * block_size token positions.

    With a PrefixCache, blocks are reference-counted: a sequence admitted with a cached prefix shares those blocks
    (it never writes them: it computes only the positions after them), and a cached block whose last reference
    goes is parked in the cache instead of freed. Every block is then exactly one of: referenced, free (never
    cached), or parked (cached, unreferenced, evictable). Parked blocks count as free: an allocation takes a free
    block first and evicts the least recently parked one only when none is left."""

    def __init__(self, num_blocks: int, block_size: int, prefix_cache: PrefixCache | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        if prefix_cache is not None and prefix_cache.block_size != block_size:
            raise ValueError(f"prefix cache block size {prefix_cache.block_size} != {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        # NOTE: a min-heap: the lowest free ids go first, so the cached blocks gather at low ids and an idle engine's
        # top blocks stay free for ModelRunner.prompt_logits, which borrows them without asking.
        self._free: list[int] = list(range(num_blocks))
        self._refs: list[int] = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free ones and parked (evictable) cached ones."""
        parked = self.prefix_cache.num_parked_blocks if self.prefix_cache is not None else 0
        return len(self._free) + parked

    @property
    def num_used_blocks(self) -> int:
        """Blocks some sequence references."""
        return self.num_blocks - self.num_free_blocks

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs so that its table covers `num_tokens` positions."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"allocate: {needed} blocks needed, {self.num_free_blocks} free (call can_allocate "
                               "first)")
        for _ in range(needed):
            block = heapq.heappop(self._free) if self._free else self.prefix_cache.evict()
            self._refs[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        # NOTE: reversed: a sequence's last blocks are parked first, so they are evicted before its first ones,
        # which more requests share (a system prompt).
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def _release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] < 0:
            raise RuntimeError(f"block {block} freed more often than it was referenced")
        if self._refs[block] == 0:
            if self.prefix_cache is not None and self.prefix_cache.is_cached(block):
                self.prefix_cache.park(block)
            else:
                heapq.heappush(self._free, block)

    def _share(self, seq: Sequence, blocks: list[int]) -> None:
        for block in blocks:
            if self._refs[block] == 0:
                self.prefix_cache.unpark(block)
            self._refs[block] += 1
        seq.block_table = list(blocks)
        seq.num_computed_tokens = len(blocks) * self.block_size

    # --- prefix caching ---------------------------------------------------------------------------------------------
    def attach_cached_prefix(self, seq: Sequence) -> int:
        """Gives a sequence that holds no blocks (waiting: new or preempted) the longest cached prefix of its tokens
        and marks those tokens computed; returns how many. NOTE: at most num_tokens - 1 tokens: the last one is
        always computed, so that the step has its logits to sample from."""
        cache = self.prefix_cache
        if seq.block_table or seq.num_computed_tokens:
            raise RuntimeError(f"attach_cached_prefix: sequence {seq.seq_id} already holds KV")
        if cache is None or not cache.uses_cache(seq):
            return 0
        hits = cache.match(seq, seq.num_tokens - 1)
        self._share(seq, hits)
        seq.num_registered_blocks = len(hits)
        return seq.num_computed_tokens

    def detach(self, seq: Sequence) -> None:
        """Undoes attach_cached_prefix for a sequence that could not be admitted after all."""
        self.free(seq)
        seq.num_computed_tokens = 0

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Caches the blocks of `seq` that its computed tokens filled since the last call (after each step)."""
        cache = self.prefix_cache
        if cache is None or not cache.uses_cache(seq):
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if full <= seq.num_registered_blocks:
            return
        keys = cache.keys(seq, full)
        for i in range(seq.num_registered_blocks, full):
            cache.insert(seq.block_table[i], keys[i])
        seq.num_registered_blocks = full

    def skip_caching(self, seq: Sequence) -> None:
        """Keeps the blocks seq holds now out of the cache (KV copied in from elsewhere, e.g. a swap-in)."""
        seq.num_registered_blocks = len(seq.block_table)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child`, whose tokens start with `parent`'s computed ones, shares parent's full computed blocks (parallel
        sampling). NOTE: full blocks only: neither ever writes a shared block, so no copy-on-write is needed."""
        if child.block_table or child.num_computed_tokens:
            raise RuntimeError(f"fork: sequence {child.seq_id} already holds KV")
        n = min(parent.num_computed_tokens // self.block_size, len(parent.block_table))
        if child.token_ids(0, n * self.block_size) != parent.token_ids(0, n * self.block_size):
            raise ValueError("fork: the child's tokens do not start with the parent's")
        self._share(child, parent.block_table[:n])
        child.num_registered_blocks = min(parent.num_registered_blocks, n)

    def reset_prefix_cache(self) -> int:
        """Forgets every unreferenced cached block (they become free); returns how many."""
        if self.prefix_cache is None:
            return 0
        dropped = self.prefix_cache.drop_parked()
        for block in dropped:
            heapq.heappush(self._free, block)
        return len(dropped)

    def check(self, seqs: list[Sequence]) -> None:
        """Raises RuntimeError unless every block is accounted for: referenced exactly as often as the given
        sequences (all that hold blocks) list it, else exactly one of free and parked, parked ones cached."""
        refs = [0] * self.num_blocks
        for seq in seqs:
            for block in seq.block_table:
                refs[block] += 1
        if refs != self._refs:
            bad = [b for b in range(self.num_blocks) if refs[b] != self._refs[b]]
            raise RuntimeError(f"reference counts differ from the block tables at blocks {bad[:8]}")
        free = set(self._free)
        if len(free) != len(self._free):
            raise RuntimeError("a block is in the free list twice")
        cache = self.prefix_cache
        for block in range(self.num_blocks):
            parked = cache is not None and cache.is_parked(block)
            if (refs[block] > 0) + (block in free) + parked != 1:
                raise RuntimeError(f"block {block}: refs {refs[block]}, free {block in free}, parked {parked}")
            if parked and not cache.is_cached(block):
                raise RuntimeError(f"block {block} is parked but not cached")
            if block in free and cache is not None and cache.is_cached(block):
                raise RuntimeError(f"block {block} is free but still cached")


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
