"""Prefix affinity: which backend served a prompt's leading KV blocks recently, so a request that shares them goes
where they may still be cached.

Keys are chained hashes of the prompt's full blocks of `block_size` tokens (the worker's KV block size, from its
Info): block i's key hashes its tokens with block i-1's key, so one key stands for the whole prefix up to it, as in
vLLM's automatic prefix caching and llm-d's prefix scorer. The table maps a key to the backends that were sent that
prefix and when; entries older than `ttl_s` or beyond `max_entries` (least recently used first) are forgotten. It
is the gateway's guess, not the worker's cache: it needs nothing from the worker but the block size.
"""

from __future__ import annotations

import hashlib
import time
from array import array
from collections import OrderedDict

MAX_HASHED_BLOCKS = 256  # NOTE: bounds hashing work per request; prompts agree or differ long before 4096 tokens


def block_hashes(token_ids: list[int], block_size: int, max_blocks: int = MAX_HASHED_BLOCKS) -> list[bytes]:
    """Chained keys of the prompt's full leading blocks (a partial last block has none: the worker caches only
    full blocks)."""
    keys: list[bytes] = []
    parent = b""
    for i in range(min(len(token_ids) // block_size, max_blocks)):
        block = array("I", token_ids[i * block_size:(i + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        keys.append(parent)
    return keys


class PrefixAffinity:
    def __init__(self, *, max_entries: int = 200_000, ttl_s: float = 600.0, clock=time.monotonic):
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._clock = clock
        self._table: OrderedDict[bytes, dict[str, float]] = OrderedDict()  # key -> {backend name: last sent}

    def __len__(self) -> int:
        return len(self._table)

    def matched_blocks(self, keys: list[bytes]) -> dict[str, int]:
        """For each backend that holds some of it: how many of the prompt's leading blocks it was sent recently."""
        now = self._clock()
        matched: dict[str, int] = {}
        for depth, key in enumerate(keys, start=1):
            holders = self._table.get(key)
            if not holders:
                break  # NOTE: chained keys: no backend can hold block i+1 of this prompt without block i
            live = [name for name, seen in holders.items() if now - seen <= self._ttl_s]
            if not live:
                break
            for name in live:
                if matched.get(name, 0) == depth - 1:  # only unbroken runs from the first block count
                    matched[name] = depth
        return matched

    def record(self, keys: list[bytes], backend: str) -> None:
        """`backend` was sent a prompt starting with these blocks."""
        now = self._clock()
        for key in keys:
            holders = self._table.get(key)
            if holders is None:
                holders = self._table[key] = {}
            else:
                self._table.move_to_end(key)
            holders[backend] = now
        while len(self._table) > self._max_entries:
            self._table.popitem(last=False)

    def forget(self, backend: str) -> None:
        """A backend left (removed, or restarted and so lost its cache): nothing of it is cached any more."""
        for key in [k for k, holders in self._table.items() if holders.pop(backend, None) is not None and not holders]:
            del self._table[key]
