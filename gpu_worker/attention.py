"""Attention over the worker's paged KV cache, in torch (SDPA), for a batch that mixes decodes and prefill chunks.

The flat batch holds decode tokens first (one per sequence), then the prefill chunks. Per-step metadata (slot
indices, masks) is built once by `AttentionMetadata.build` and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class PagedKVCache:
    """K and V of every layer in fixed-size blocks: per layer one K and one V tensor [num_blocks * block_size,
    kv_heads, head_dim].

    NOTE: slots are addressed flat (block * block_size + offset) so writes are one index_copy_ per layer and
    reads one index_select, whatever the batch.
    NOTE: one K and one V tensor per layer rather than one stacked buffer: a compiled step that writes into a slice
    of a stacked buffer copies the whole buffer back (functionalisation of a mutated view); writing into a tensor of
    its own stays in place."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots [T]; k, v [T, Hkv, D]."""
        self.k[layer].index_copy_(0, slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(0, slots, v.to(self.v[layer].dtype))

    def gather(self, layer: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """slots [N] -> k, v [N, Hkv, D] in `dtype` (the queries'; a bf16 cache serves fp32 activations)."""
        return self.k[layer].index_select(0, slots).to(dtype), self.v[layer].index_select(0, slots).to(dtype)

    def read_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """Every layer's K/V at `slots` [n] -> [layers, 2, n, Hkv, D] (KV moves to and from the sidecar)."""
        return torch.stack([torch.stack([k.index_select(0, slots), v.index_select(0, slots)])
                            for k, v in zip(self.k, self.v)])

    def write_slots(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """kv [layers, 2, n, Hkv, D] into `slots` [n] of every layer."""
        for layer in range(len(self.k)):
            self.write(layer, slots, kv[layer, 0], kv[layer, 1])

    def zero_(self) -> None:
        for t in (*self.k, *self.v):
            t.zero_()


@dataclass
class PrefillChunk:
    start: int  # first token of the chunk in the flat batch
    end: int
    context_start: int  # tokens of this sequence already in the cache before the chunk
    prefix_slots: torch.Tensor | None  # [context_start + n] cache slots of the whole context (None if no prefix)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of every new token
    num_decodes: int  # decode tokens occupy [0, num_decodes) of the flat batch
    decode_slots: torch.Tensor | None  # [B, L] cache slots of each decode's context, padded to L
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] True where the key position is inside the context
    prefills: list[PrefillChunk]

    @classmethod
    def build(cls, block_size: int, device: torch.device, slot_mapping: list[int],
              decode_block_tables: list[list[int]], decode_context_lens: list[int],
              prefills: list[tuple[int, int, int, list[int]]]) -> "AttentionMetadata":
        """prefills: (start, end, context_start, block_table) per chunk, in flat-batch order."""
        decode_slots = decode_mask = None
        if decode_block_tables:
            max_blocks = max(len(t) for t in decode_block_tables)
            tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in decode_block_tables], dtype=torch.int64)
            offsets = torch.arange(block_size, dtype=torch.int64)
            slots = (tables.unsqueeze(-1) * block_size + offsets).view(len(decode_block_tables), -1)  # [B, L]
            lens = torch.tensor(decode_context_lens, dtype=torch.int64)
            mask = torch.arange(slots.shape[1]).unsqueeze(0) < lens.unsqueeze(1)  # [B, L]
            decode_slots = slots.to(device, non_blocking=True)
            decode_mask = mask.view(len(decode_block_tables), 1, 1, -1).to(device, non_blocking=True)
        chunks = []
        for start, end, context_start, table in prefills:
            prefix = None
            if context_start > 0:
                total = context_start + (end - start)
                pos = torch.arange(total, dtype=torch.int64)
                table_t = torch.tensor(table, dtype=torch.int64)
                prefix = (table_t[pos // block_size] * block_size + pos % block_size).to(device, non_blocking=True)
            chunks.append(PrefillChunk(start, end, context_start, prefix))
        return cls(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64).to(device, non_blocking=True),
            num_decodes=len(decode_block_tables),
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            prefills=chunks,
        )


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D]; k, v [B, L, Hkv, D]; mask [B, 1, 1, L] -> [B, Hq * D].

    NOTE: GQA without repeating K/V: the query heads of one KV group become the SDPA "query length" axis,
    q [B, Hkv, G, D] against k [B, Hkv, L, D], so each K/V row is read once for its whole group."""
    b, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.view(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]
    out = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.reshape(b, hq * d)  # [B, Hq * D]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_start: int,
                      scale: float) -> torch.Tensor:
    """q [n, Hq, D]; k, v [context_start + n, Hkv, D] (the whole context, new tokens last) -> [n, Hq * D]."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    # NOTE: 4-D [1, heads, tokens, D]: CUDA's flash and memory-efficient kernels take only 4-D inputs.
    qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    gqa = hq != hkv
    if context_start == 0:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        # Query i sits at position context_start + i and sees keys 0..context_start + i.
        qpos = torch.arange(n, device=q.device).unsqueeze(1) + context_start
        mask = torch.arange(k.shape[0], device=q.device).unsqueeze(0) <= qpos  # [n, ctx]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1).reshape(n, hq * d)  # [n, Hq * D]


def paged_attention(cache: PagedKVCache, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Writes the new tokens' K/V into the cache, then attends. q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq * D]."""
    cache.write(layer, meta.slot_mapping, k, v)
    nd = meta.num_decodes
    if nd == q.shape[0]:  # decodes only: no output buffer to assemble
        b, L = meta.decode_slots.shape
        kc, vc = cache.gather(layer, meta.decode_slots.view(-1), q.dtype)  # [B * L, Hkv, D]
        return decode_attention(q, kc.view(b, L, *kc.shape[1:]), vc.view(b, L, *vc.shape[1:]), meta.decode_mask,
                                scale)
    out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])  # [T, Hq * D]
    if nd:
        b, L = meta.decode_slots.shape
        kc, vc = cache.gather(layer, meta.decode_slots.view(-1), q.dtype)  # [B * L, Hkv, D]
        out[:nd] = decode_attention(q[:nd], kc.view(b, L, *kc.shape[1:]), vc.view(b, L, *vc.shape[1:]),
                                    meta.decode_mask, scale)
    for chunk in meta.prefills:
        qs = q[chunk.start:chunk.end]
        if chunk.prefix_slots is None:
            ks, vs = k[chunk.start:chunk.end], v[chunk.start:chunk.end]
        else:
            ks, vs = cache.gather(layer, chunk.prefix_slots, q.dtype)
        out[chunk.start:chunk.end] = prefill_attention(qs, ks, vs, chunk.context_start, scale)
    return out
