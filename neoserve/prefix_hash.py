"""Content keys of KV blocks: what the worker's prefix cache indexes blocks by, and what a router can compute from a
prompt's token ids alone to send requests that share a prefix to the same worker.

A full block's key is SHA-256 over its parent's key and its tokens; the first block's parent is the root key of
(model, cache salt). Two requests get the same key for block i exactly when their first (i + 1) * block_size tokens,
their model and their salt are the same, so a key names a whole prefix, not just one block.

NOTE: a cryptographic hash rather than Python's hash(): tenants send arbitrary token ids, and a crafted collision
would let one request read another's KV (vLLM moved to SHA-256 for the same reason). Shared by the worker
(gpu_worker/prefix_cache.py) and routers; imports no process package.
"""

from __future__ import annotations

import hashlib
import struct

KEY_VERSION = b"neoserve-prefix-v1"


def root_key(model_key: str, cache_salt: str | None = None) -> bytes:
    """The parent key of a request's first block: the model (anything that changes its KV) and the tenant's salt.
    No salt and an empty salt are the same."""
    h = hashlib.sha256(KEY_VERSION)
    for part in (model_key, cache_salt or ""):
        data = part.encode("utf-8")
        h.update(struct.pack("<Q", len(data)))  # NOTE: length-prefixed, so ("ab", "c") and ("a", "bc") differ
        h.update(data)
    return h.digest()


def block_key(parent: bytes, token_ids: list[int] | tuple[int, ...]) -> bytes:
    """The key of one full block: its parent's key chained with its token ids."""
    return hashlib.sha256(parent + struct.pack(f"<{len(token_ids)}I", *token_ids)).digest()


def chain_block_keys(parent: bytes, token_ids: list[int], block_size: int) -> list[bytes]:
    """The keys of the full blocks of `token_ids`, the first one's parent being `parent` (a root key, or the key
    of the block before these tokens: a growing sequence hashes each block once)."""
    keys = []
    for i in range(len(token_ids) // block_size):
        parent = block_key(parent, token_ids[i * block_size:(i + 1) * block_size])
        keys.append(parent)
    return keys


def prefix_block_keys(token_ids: list[int], block_size: int, model_key: str, cache_salt: str | None = None,
                      max_blocks: int | None = None) -> list[bytes]:
    """The keys of the full blocks of a prompt (at most `max_blocks`): a router's view of its prefix."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if max_blocks is not None:
        token_ids = token_ids[:max_blocks * block_size]
    return chain_block_keys(root_key(model_key, cache_salt), token_ids, block_size)
