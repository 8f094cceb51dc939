"""Thin Python face of the native decode-attention kernel (cpu_attn/csrc/attn_kernel.c) and of its arena.

Why a separate module: the C extension takes raw addresses and trusts them; this file is the one place that
turns tensors/arrays into (address, shape) pairs and checks dtypes, shapes and contiguity first, so that a
wrong call raises `ValidationError` instead of corrupting memory. `CpuKVCache` (kv_cache.py) owns the
bookkeeping (which block holds which token); this module owns nothing but the arena mapping.

Arena layout (see the C file for the reason): `[num_layers][num_blocks][num_kv_heads]` head-blocks, each the K
part `[block_size/32][head_dim][32]` followed by the V part `[head_dim_pad/32][block_size][32]` (head_dim_pad:
head_dim rounded up to 32; bf16 lanes stored pairwise interleaved).
"""

from __future__ import annotations

import functools
import mmap
import os
from dataclasses import dataclass

import numpy as np
import torch

from neoserve.errors import ValidationError

from cpu_attn import _attn_kernel as _native

DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
HUGE_PAGE = 2 << 20
# NOTE: Linux's MAP_HUGETLB; Python's mmap module does not export it.
_MAP_HUGETLB = 0x40000


# The resident team's view of a cache's bookkeeping and the team itself (cpu_attn/csrc/team.c).
CacheIndex = _native.CacheIndex
Team = _native.Team


def has_avx512() -> bool:
    """True when the AVX-512 path runs (CPU support checked at run time, and not forced off)."""
    return bool(_native.has_avx512())


def force_portable(flag: bool) -> None:
    """Route every call through the portable C path (lets tests check both paths on an AVX-512 machine)."""
    _native.set_force_portable(bool(flag))


def default_num_threads() -> int:
    """The cores this process may run on (the sidecar pins itself; its thread count follows)."""
    return len(os.sched_getaffinity(0))


class Arena:
    """One anonymous mapping, 2 MiB aligned, backed by huge pages where the kernel allows.

    Why: the KV working set is GiBs read at full bandwidth; huge pages (MAP_HUGETLB if reserved pages exist,
    else transparent huge pages via madvise) removed most TLB misses and measured +13-30% here.
    """

    def __init__(self, nbytes: int):
        if nbytes <= 0:
            raise ValidationError("nbytes", f"arena size must be positive, got {nbytes}")
        self.nbytes = nbytes
        size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
        self.huge_pages = "hugetlb"
        try:
            self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_HUGETLB)
            offset = 0
        except OSError:
            # NOTE: over-allocate by one huge page so the used range starts 2 MiB aligned (THP needs that).
            self._map = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.huge_pages = "thp"
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE)
            except (AttributeError, OSError):
                self.huge_pages = "none"
            base = np.frombuffer(self._map, dtype=np.uint8, count=1).ctypes.data
            offset = (-base) % HUGE_PAGE
        self.array = np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=offset)  # [nbytes]
        self.ptr = int(self.array.ctypes.data)


@dataclass(frozen=True)
class Geometry:
    """Shape of a KV arena, passed to every native call."""

    arena_ptr: int
    num_blocks: int
    num_layers: int
    num_kv_heads: int
    block_size: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CODES:
            raise ValidationError("dtype", f"must be one of float32, bfloat16, float16, got {self.dtype}")
        if self.block_size <= 0 or self.block_size % 64:
            raise ValidationError("block_size", f"must be a positive multiple of 64, got {self.block_size}")
        for name in ("num_blocks", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValidationError(name, f"must be positive, got {getattr(self, name)}")

    @property
    def head_dim_padded(self) -> int:
        return -(-self.head_dim // 32) * 32

    @staticmethod
    def block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block (block_size tokens, every layer, K and V)."""
        head_dim_padded = -(-head_dim // 32) * 32
        esize = torch.tensor([], dtype=dtype).element_size()
        return num_layers * num_kv_heads * block_size * (head_dim + head_dim_padded) * esize

    @functools.cached_property
    def as_tuple(self) -> tuple:
        """The form every native call takes (built once: frozen dataclass)."""
        return (self.arena_ptr, self.num_blocks, self.num_layers, self.num_kv_heads, self.block_size,
                self.head_dim, DTYPE_CODES[self.dtype])


def _check_f32(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if t.dtype != torch.float32 or t.shape != shape or not t.is_contiguous() or t.device.type != "cpu":
        raise ValidationError(name, f"expected a contiguous CPU float32 tensor of shape {list(shape)}, got "
                                    f"{t.dtype} {list(t.shape)} on {t.device} (contiguous={t.is_contiguous()})")


def _check_index(name: str, a: np.ndarray, dtype: type, n: int | None = None) -> None:
    if a.dtype != dtype or a.ndim != 1 or not a.flags.c_contiguous or (n is not None and a.shape[0] != n):
        raise ValidationError(name, f"expected a contiguous 1-D {np.dtype(dtype).name} array"
                                    + (f" of length {n}" if n is not None else ""))


def _check_attention(geom: Geometry, layer: int, table: np.ndarray, row_tokens: np.ndarray, rows: np.ndarray,
                     context_lens: np.ndarray, q: torch.Tensor, out: torch.Tensor) -> None:
    batch = rows.shape[0]
    if q.dim() != 3 or q.shape[0] != batch or q.shape[2] != geom.head_dim or q.shape[1] % geom.num_kv_heads:
        raise ValidationError("q", f"expected [B={batch}, Hq (multiple of {geom.num_kv_heads}), {geom.head_dim}], "
                                   f"got {list(q.shape)}")
    _check_f32("q", q, tuple(q.shape))
    _check_f32("out", out, tuple(q.shape))
    _check_index("rows", rows, np.int64)
    _check_index("context_lens", context_lens, np.int64, batch)
    _check_index("row_tokens", row_tokens, np.int64)
    if table.dtype != np.int32 or table.ndim != 2 or not table.flags.c_contiguous:
        raise ValidationError("table", "expected a contiguous 2-D int32 array")
    if not 0 <= layer < geom.num_layers:
        raise ValidationError("layer", f"must be in [0, {geom.num_layers}), got {layer}")


def paged_attention(geom: Geometry, layer: int, table: np.ndarray, row_tokens: np.ndarray, rows: np.ndarray,
                    context_lens: np.ndarray, q: torch.Tensor, out: torch.Tensor, scale: float,
                    num_threads: int) -> None:
    """out[b] = softmax(q[b] K_b^T * scale) V_b over positions [0, context_lens[b]) of table row rows[b].

    table: [num_rows, stride] int32 block ids; row_tokens: [num_rows] int64, positions each row's blocks hold
    valid data for (the native side refuses a context length outside [1, row_tokens[row]]); rows,
    context_lens: [B] int64.
    """
    _check_attention(geom, layer, table, row_tokens, rows, context_lens, q, out)
    try:
        _native.attention(geom.as_tuple, layer, table, table.shape[1], row_tokens, rows, context_lens,
                          q.data_ptr(), q.shape[1], out.data_ptr(), float(scale), int(num_threads))
    except ValueError as e:
        raise ValidationError("context_lens", str(e)) from None


def decode(geom: Geometry, layer: int, table: np.ndarray, row_tokens: np.ndarray, row_blocks: np.ndarray,
           rows: np.ndarray, context_lens: np.ndarray, q: torch.Tensor, k: torch.Tensor | None,
           v: torch.Tensor | None, out: torch.Tensor, scale: float, num_threads: int) -> None:
    """One decode step of one layer: store the new tokens' K/V ([B, Hkv, D] fp32, or None when stored already)
    at positions context_lens - 1, advance row_tokens, then paged_attention (same arguments). row_blocks: [num_rows]
    int64, blocks each row holds. The native side checks the context lengths against row_tokens and row_blocks
    before it writes anything."""
    _check_attention(geom, layer, table, row_tokens, rows, context_lens, q, out)
    if (k is None) != (v is None):
        raise ValidationError("k", "give both k and v, or neither")
    if k is not None:
        _check_f32("k", k, (rows.shape[0], geom.num_kv_heads, geom.head_dim))
        _check_f32("v", v, (rows.shape[0], geom.num_kv_heads, geom.head_dim))
    _check_index("row_blocks", row_blocks, np.int64, row_tokens.shape[0])
    try:
        _native.decode(geom.as_tuple, layer, table, table.shape[1], row_tokens, row_blocks, rows, context_lens,
                       q.data_ptr(), q.shape[1], 0 if k is None else k.data_ptr(), 0 if v is None else v.data_ptr(),
                       out.data_ptr(), float(scale), int(num_threads))
    except ValueError as e:
        raise ValidationError("context_lens", str(e)) from None


def _copy(store: bool, geom: Geometry, layer: int, blocks: np.ndarray, offsets: np.ndarray, k: torch.Tensor,
          v: torch.Tensor, num_threads: int) -> None:
    n = blocks.shape[0]
    _check_index("blocks", blocks, np.int32)
    _check_index("offsets", offsets, np.int32, n)
    _check_f32("k", k, (n, geom.num_kv_heads, geom.head_dim))
    _check_f32("v", v, (n, geom.num_kv_heads, geom.head_dim))
    if not 0 <= layer < geom.num_layers:
        raise ValidationError("layer", f"must be in [0, {geom.num_layers}), got {layer}")
    try:
        (_native.store if store else _native.load)(geom.as_tuple, layer, blocks, offsets, k.data_ptr(),
                                                   v.data_ptr(), int(num_threads))
    except ValueError as e:
        raise ValidationError("positions", str(e)) from None


def store_tokens(geom: Geometry, layer: int, blocks: np.ndarray, offsets: np.ndarray, k: torch.Tensor,
                 v: torch.Tensor, num_threads: int) -> None:
    """Write token i's K/V ([n, Hkv, D] fp32) into block blocks[i] at slot offsets[i], converting to the dtype."""
    _copy(True, geom, layer, blocks, offsets, k, v, num_threads)


def load_tokens(geom: Geometry, layer: int, blocks: np.ndarray, offsets: np.ndarray, k_out: torch.Tensor,
                v_out: torch.Tensor, num_threads: int) -> None:
    """Inverse of store_tokens: fill k_out/v_out ([n, Hkv, D] fp32) from the arena."""
    _copy(False, geom, layer, blocks, offsets, k_out, v_out, num_threads)


def stream_read(ptr: int, nbytes: int, num_threads: int) -> tuple[float, int]:
    """Read [ptr, ptr+nbytes) once, split over threads; returns (checksum, bytes actually read)."""
    return _native.stream_read(int(ptr), int(nbytes), int(num_threads))
