"""The sidecar's paged CPU KV cache: one preallocated arena, fixed-size blocks, per-sequence block tables.

Why paged: sequences arrive (swap-out after a GPU prefill) and leave at any time with any length; fixed-size
blocks from one arena never fragment and make the capacity check exact. A block holds `block_size` tokens of
one sequence for every layer, so a sequence is reserved once, not per layer.

Why this layout and dtype (measured with bench/bench_cpu_attn.py): head-major 128-token blocks let the kernel
stream K and V at close to the machine's read bandwidth (token-major blocks reached half of it). The kernel
reads bf16 at about the same bytes/s as fp32 (the conversion is one ALU op per 16 values), so bf16 serves
~1.9x the tokens per second and holds 2x the tokens per GiB; bf16 keeps fp32's exponent range, so outlier
keys cannot overflow as they could in fp16. Pass dtype=torch.float32 where bit-level agreement with an fp32
reference matters more than capacity. Attention math is fp32 in every case.

Not thread-safe: one caller owns an instance. In the sidecar that is whoever holds SidecarState.lock, which
also takes `native_index`'s mutex: the resident team (cpu_attn/csrc/team.c) reads the bookkeeping through that
index (block table, tokens, blocks held, seq_id -> row), so every change here is made under that mutex.
"""

from __future__ import annotations

from typing import Sequence as SequenceT

import numpy as np
import torch

from neoserve.errors import CapacityError, ValidationError

from cpu_attn.kernel import (DTYPE_CODES, Arena, CacheIndex, Geometry, decode, default_num_threads, load_tokens,
                             paged_attention, store_tokens)

IntsLike = torch.Tensor | np.ndarray | SequenceT[int]

DEFAULT_DTYPE = torch.bfloat16
DEFAULT_BLOCK_SIZE = 128


class UnknownSequenceError(ValidationError):
    """A sequence id the cache does not hold (the sidecar answers UNKNOWN_SEQUENCE)."""


def _ints(x: IntsLike, name: str) -> np.ndarray:
    """Any 1-D integer container -> contiguous int64 numpy array (zero-copy for CPU int64 tensors/arrays)."""
    a = np.asarray(x.cpu().numpy() if isinstance(x, torch.Tensor) else x)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise ValidationError(name, f"expected a 1-D integer sequence, got shape {a.shape} dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


def _floats(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """K/V input -> contiguous fp32 CPU tensor (no copy when it already is one)."""
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()


class CpuKVCache:
    """Paged KV cache of `num_layers` layers in `capacity_bytes` of host memory, with decode attention."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity_bytes: int,
                 dtype: torch.dtype = DEFAULT_DTYPE, num_threads: int | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE):
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if value <= 0:
                raise ValidationError(name, f"must be positive, got {value}")
        if num_threads is not None and num_threads <= 0:
            raise ValidationError("num_threads", f"must be positive, got {num_threads}")
        if block_size <= 0 or block_size % 64:
            raise ValidationError("block_size", f"must be a positive multiple of 64, got {block_size}")
        if dtype not in DTYPE_CODES:
            raise ValidationError("dtype", f"must be one of float32, bfloat16, float16, got {dtype}")
        self.block_bytes = Geometry.block_bytes(num_layers, num_kv_heads, head_dim, block_size, dtype)
        num_blocks = capacity_bytes // self.block_bytes
        if num_blocks < 1:
            raise ValidationError("capacity_bytes", f"{capacity_bytes} bytes is less than one block "
                                                    f"({self.block_bytes} bytes)")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.dtype = dtype
        self.num_threads = num_threads or default_num_threads()
        self.num_blocks = int(num_blocks)
        self._arena = Arena(self.num_blocks * self.block_bytes)
        self.geometry = Geometry(self._arena.ptr, self.num_blocks, num_layers, num_kv_heads, block_size, head_dim,
                                 dtype)
        # NOTE: a stack, lowest ids on top, so a fresh cache fills the arena from its start.
        self._free_blocks: list[int] = list(range(self.num_blocks - 1, -1, -1))
        self._row_of: dict[int, int] = {}  # seq_id -> row of the per-row state below
        # NOTE: per-row numpy state (rows are recycled) so the native call gets whole tables, not Python lists;
        # the table's stride (blocks per sequence) and its row count grow on demand.
        self._table = np.zeros((16, 64), dtype=np.int32)  # [rows, max blocks per sequence] block ids
        self._blocks_held = np.zeros(16, dtype=np.int64)  # [rows]
        self._tokens = np.zeros(16, dtype=np.int64)  # [rows] highest written position + 1
        self._free_rows: list[int] = list(range(15, -1, -1))
        # NOTE: the team's view of the bookkeeping above; it keeps the arena mapped while a team may read it.
        self.native_index = CacheIndex(self.geometry.as_tuple, self._arena)
        self._bind()

    # ---------------------------------------------------------------- sequences and blocks

    def add_sequence(self, seq_id: int) -> None:
        seq_id = int(seq_id)
        if seq_id in self._row_of:
            raise ValidationError("seq_id", f"sequence {seq_id} already exists")
        if not self._free_rows:
            self._grow_rows()
        row = self._free_rows.pop()
        self._blocks_held[row] = 0
        self._tokens[row] = 0
        self._row_of[seq_id] = row
        self.native_index.set(seq_id, row)

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Make the sequence's blocks cover `num_tokens` positions. All or nothing: CapacityError changes nothing."""
        row = self._row(seq_id)
        if num_tokens < 0:
            raise ValidationError("num_tokens", f"must be >= 0, got {num_tokens}")
        needed = -(-int(num_tokens) // self.block_size) - int(self._blocks_held[row])
        if needed <= 0:
            return
        if needed > len(self._free_blocks):
            raise CapacityError(f"CPU KV cache full: sequence {seq_id} needs {needed} more blocks of "
                                f"{self.block_size} tokens, {len(self._free_blocks)} free of {self.num_blocks}")
        held = int(self._blocks_held[row])
        if held + needed > self._table.shape[1]:
            self._grow_stride(held + needed)
        new = self._free_blocks[-needed:]
        del self._free_blocks[-needed:]
        self._table[row, held:held + needed] = new[::-1]
        self._blocks_held[row] = held + needed

    def free_sequence(self, seq_id: int) -> None:
        row = self._row(seq_id)
        held = int(self._blocks_held[row])
        # NOTE: pushed in reverse so the sequence's first block is handed out first next time.
        self._free_blocks.extend(self._table[row, :held][::-1].tolist())
        self._blocks_held[row] = 0
        self._tokens[row] = 0
        del self._row_of[int(seq_id)]
        self.native_index.discard(int(seq_id))
        self._free_rows.append(row)

    def num_tokens(self, seq_id: int) -> int:
        """Tokens stored for the sequence (highest position written on any layer + 1)."""
        return int(self._tokens[self._row(seq_id)])

    def stats(self) -> dict:
        used = self.num_blocks - len(self._free_blocks)
        return {
            "blocks_total": self.num_blocks,
            "blocks_used": used,
            "block_size": self.block_size,
            "bytes_total": self.num_blocks * self.block_bytes,
            "bytes_used": used * self.block_bytes,
            "dtype": str(self.dtype).removeprefix("torch."),
            "num_sequences": len(self._row_of),
            "tokens": {seq: int(self._tokens[row]) for seq, row in self._row_of.items()},
            "huge_pages": self._arena.huge_pages,
            "num_threads": self.num_threads,
        }

    # ---------------------------------------------------------------- data

    def write(self, layer: int, seq_id: int, start_pos: int, k, v) -> None:
        """Store K/V of positions [start_pos, start_pos+T) of one sequence (prefill copy-out, swap-in)."""
        row = self._row(seq_id)
        self._check_layer(layer)
        k, v = _floats(k), _floats(v)
        n = k.shape[0] if k.dim() == 3 else -1
        if start_pos < 0 or n < 0 or start_pos + n > self._capacity(row):
            raise ValidationError("start_pos", f"positions [{start_pos}, {start_pos + n}) of sequence {seq_id} "
                                               f"are outside its reserved {self._capacity(row)} tokens (reserve first)")
        pos = np.arange(start_pos, start_pos + n, dtype=np.int64)
        blocks = self._table[row, pos // self.block_size]
        offsets = (pos % self.block_size).astype(np.int32)
        store_tokens(self.geometry, layer, blocks, offsets, k, v, self.num_threads)
        if n:
            self._tokens[row] = max(int(self._tokens[row]), start_pos + n)

    def append(self, layer: int, seq_ids: IntsLike, positions: IntsLike, k, v) -> None:
        """Store one new token per sequence (decode step): k, v [B, Hkv, D] at positions [B]."""
        self._check_layer(layer)
        rows = self._rows(seq_ids)
        pos = _ints(positions, "positions")
        if pos.shape[0] != rows.shape[0]:
            raise ValidationError("positions", f"expected {rows.shape[0]} positions, got {pos.shape[0]}")
        if pos.size and ((pos < 0).any() or (pos >= self._blocks_held[rows] * self.block_size).any()):
            raise ValidationError("positions", "a position is negative or beyond its sequence's reserved tokens")
        blocks = self._table[rows, pos // self.block_size]
        offsets = (pos % self.block_size).astype(np.int32)
        store_tokens(self.geometry, layer, blocks, offsets, _floats(k), _floats(v), self.num_threads)
        np.maximum.at(self._tokens, rows, pos + 1)

    def read(self, layer: int, seq_id: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions [start, end) as fp32 [end-start, Hkv, D] (swap-out back to the GPU)."""
        row = self._row(seq_id)
        self._check_layer(layer)
        if not 0 <= start <= end <= self._tokens[row]:
            raise ValidationError("end", f"range [{start}, {end}) is outside the {int(self._tokens[row])} tokens "
                                         f"of sequence {seq_id}")
        pos = np.arange(start, end, dtype=np.int64)
        blocks = self._table[row, pos // self.block_size]
        offsets = (pos % self.block_size).astype(np.int32)
        k = torch.empty(end - start, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = torch.empty(end - start, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        load_tokens(self.geometry, layer, blocks, offsets, k, v, self.num_threads)
        return k, v

    def attention(self, layer: int, seq_ids: IntsLike, context_lens: IntsLike, q: torch.Tensor, out: torch.Tensor,
                  scale: float) -> None:
        """Decode attention of B sequences of one layer over positions [0, context_lens[b]); writes out in place.

        q, out: [B, Hq, D] fp32 contiguous; Hq a multiple of num_kv_heads (GQA: q head j reads kv head j // G).
        """
        # NOTE: the native side checks 1 <= context_lens[b] <= tokens stored (the caller appends first).
        paged_attention(self.geometry, layer, self._table, self._tokens, self._rows(seq_ids),
                        _ints(context_lens, "context_lens"), q, out, scale, self.num_threads)

    def decode(self, layer: int, seq_ids: IntsLike, context_lens: IntsLike, q: torch.Tensor,
               k: torch.Tensor | np.ndarray | None, v: torch.Tensor | np.ndarray | None, out: torch.Tensor,
               scale: float) -> None:
        """One layer of a decode step, as the sidecar serves it: stores each new token's K/V (k, v [B, Hkv, D],
        or None when an earlier call stored them) at position context_lens[b] - 1, reserving blocks as needed,
        then writes attention over [0, context_lens[b]) into out (as `attention`).

        With k/v a context length must be the tokens held + 1 (the step's first layer) or the tokens held (a later
        layer: the first one counted the token already). All or nothing: a refused batch changes nothing.
        """
        self._check_layer(layer)
        ids = seq_ids.tolist() if isinstance(seq_ids, (torch.Tensor, np.ndarray)) else list(seq_ids)
        rows = self._rows(ids)
        if len(set(ids)) != len(ids):
            raise ValidationError("seq_ids", "a sequence appears twice in one batch")
        lens = _ints(context_lens, "context_lens")
        if lens.shape[0] != rows.shape[0]:
            raise ValidationError("context_lens", f"expected {rows.shape[0]} context lengths, got {lens.shape[0]}")
        if k is not None:
            # NOTE: a new block only every block_size tokens, so the common case is one vector compare. Before
            # reserving, the batch is checked here as the native call would check it: a refused batch must not
            # have reserved anything.
            short = np.flatnonzero(lens > self._blocks_held[rows] * self.block_size).tolist()
            if short:
                have = self._tokens[rows]
                bad = np.flatnonzero((lens < 1) | ((lens != have) & (lens != have + 1)))
                if bad.size:
                    i = int(bad[0])
                    raise ValidationError("context_lens", f"sequence {ids[i]}: context_len {lens[i]} with new k/v, "
                                                          f"but it holds {have[i]} tokens (expected {have[i] + 1} "
                                                          f"or {have[i]})")
            for i in short:
                self.reserve(ids[i], int(lens[i]))  # CapacityError: earlier reservations stay with their sequences
            k, v = _floats(k), _floats(v)
        decode(self.geometry, layer, self._table, self._tokens, self._blocks_held, rows, lens, q, k, v, out, scale,
               self.num_threads)

    # ---------------------------------------------------------------- helpers

    def _row(self, seq_id: int) -> int:
        try:
            return self._row_of[int(seq_id)]
        except KeyError:
            raise UnknownSequenceError("seq_id", f"unknown sequence {seq_id}") from None

    def _rows(self, seq_ids: IntsLike) -> np.ndarray:
        ids = seq_ids.tolist() if isinstance(seq_ids, (torch.Tensor, np.ndarray)) else seq_ids
        try:
            return np.fromiter((self._row_of[s] for s in ids), dtype=np.int64, count=len(ids))
        except KeyError as e:
            raise UnknownSequenceError("seq_ids", f"unknown sequence {e.args[0]}") from None

    def _capacity(self, row: int) -> int:
        return int(self._blocks_held[row]) * self.block_size

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValidationError("layer", f"must be in [0, {self.num_layers}), got {layer}")

    def _grow_rows(self) -> None:
        old = self._table.shape[0]
        self._table = np.concatenate([self._table, np.zeros_like(self._table)])
        self._blocks_held = np.concatenate([self._blocks_held, np.zeros(old, dtype=np.int64)])
        self._tokens = np.concatenate([self._tokens, np.zeros(old, dtype=np.int64)])
        self._free_rows.extend(range(2 * old - 1, old - 1, -1))
        self._bind()

    def _grow_stride(self, at_least: int) -> None:
        stride = min(max(at_least, 2 * self._table.shape[1]), self.num_blocks)
        table = np.zeros((self._table.shape[0], stride), dtype=np.int32)
        table[:, :self._table.shape[1]] = self._table
        self._table = table
        self._bind()

    def _bind(self) -> None:
        """Points the native index at the current arrays (they are replaced, never resized, when they grow)."""
        self.native_index.bind(self._table, self._table.shape[1], self._tokens, self._blocks_held)
