"""The device prefix cache's index: which KV blocks hold which content, and which of them nobody references.

A block is cached once every one of its tokens' K/V is computed; its key (neoserve/prefix_hash.py) names the whole
prefix up to its last token, so the longest cached prefix of a new request is the longest run of its block keys
found here. A cached block whose last reference goes stays here, "parked", until the block manager needs a block
and no never-cached one is free: then the least recently parked one is evicted. Plain Python, no torch; the
BlockManager owns the reference counts and calls this.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from gpu_worker.sequence import Sequence
from neoserve.prefix_hash import chain_block_keys, root_key


@dataclass
class PrefixCacheStats:
    """Counters since start. Queries and hits count tokens at each admission (recomputes after a preemption too)."""

    queried_tokens: int = 0  # tokens of admitted sequences that were looked up
    hit_tokens: int = 0  # of those, tokens whose KV was found
    evicted_blocks: int = 0  # cached blocks given to other content

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class PrefixCache:
    def __init__(self, model_key: str, block_size: int):
        self.model_key = model_key
        self.block_size = block_size
        self._block_of: dict[bytes, int] = {}  # key -> block id
        self._key_of: dict[int, bytes] = {}  # block id -> key
        # NOTE: an OrderedDict as the LRU list: parking appends (most recent last), eviction pops the first, and an
        # unpark (a hit) removes from the middle in O(1).
        self._parked: OrderedDict[int, None] = OrderedDict()
        self.stats = PrefixCacheStats()

    @property
    def num_cached_blocks(self) -> int:
        return len(self._key_of)

    @property
    def num_parked_blocks(self) -> int:
        return len(self._parked)

    def uses_cache(self, seq: Sequence) -> bool:
        return not seq.params.skip_prefix_cache

    def keys(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The keys of seq's first `num_blocks` full blocks (hashed once per sequence, as its tokens become known)."""
        known = len(seq.block_keys)
        if known < num_blocks:
            parent = seq.block_keys[-1] if known else root_key(self.model_key, seq.params.cache_salt)
            tokens = seq.token_ids(known * self.block_size, num_blocks * self.block_size)
            seq.block_keys += chain_block_keys(parent, tokens, self.block_size)
        return seq.block_keys[:num_blocks]

    def match(self, seq: Sequence, max_tokens: int) -> list[int]:
        """Block ids of the longest cached prefix of seq within its first `max_tokens` tokens."""
        hits = []
        for key in self.keys(seq, max_tokens // self.block_size):
            block = self._block_of.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def next_key(self, seq: Sequence) -> bytes | None:
        """The key of the first block seq still has to compute, if that block is full of known tokens and is not
        the one holding the last token (which is always computed); None otherwise."""
        if not self.uses_cache(seq):
            return None
        i = seq.num_computed_tokens // self.block_size
        if (i + 1) * self.block_size > seq.num_tokens - 1:
            return None
        return self.keys(seq, i + 1)[i]

    def uncached_keys(self, seq: Sequence) -> list[bytes]:
        """Keys of the full blocks of seq's known tokens that it has not cached yet (it will compute them)."""
        if not self.uses_cache(seq):
            return []
        return self.keys(seq, seq.num_tokens // self.block_size)[seq.num_registered_blocks:]

    def is_cached(self, block: int) -> bool:
        return block in self._key_of

    def insert(self, block: int, key: bytes) -> bool:
        """Caches `block` under `key`; False (block stays private) when another block already holds that content."""
        if key in self._block_of or block in self._key_of:
            return False
        self._block_of[key] = block
        self._key_of[block] = key
        return True

    def park(self, block: int) -> None:
        """A cached block lost its last reference: it stays cached, first in line for eviction among the parked
        ones only after all parked earlier."""
        self._parked[block] = None

    def unpark(self, block: int) -> None:
        """A parked block is referenced again (a hit)."""
        del self._parked[block]

    def is_parked(self, block: int) -> bool:
        return block in self._parked

    def evict(self) -> int | None:
        """The least recently parked block, forgotten by the index (its content is about to be overwritten)."""
        if not self._parked:
            return None
        block, _ = self._parked.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        self.stats.evicted_blocks += 1
        return block

    def drop_parked(self) -> list[int]:
        """Forgets every unreferenced cached block (a reset); returns them, now ordinary free blocks."""
        blocks = list(self._parked)
        for block in blocks:
            del self._block_of[self._key_of.pop(block)]
        self._parked.clear()
        return blocks

    def record(self, queried_tokens: int, hit_tokens: int) -> None:
        self.stats.queried_tokens += queried_tokens
        self.stats.hit_tokens += hit_tokens
