"""Fixed binary records of the sidecar data plane (payloads of neoserve.shm_ring records).

Why fixed layouts: both ends view the tensors inside a ring slot in place (numpy/torch, zero-copy), so every
array must sit at an offset both sides compute the same way; a serialisation format would copy. All integers
are little-endian; every payload starts with a 64-byte header; every array starts at a 64-byte aligned offset
(relative to the payload, whose start is itself 64-byte aligned in the ring); tensors are float32, ids int64.
The ring record's `type` field holds the MsgType.

    ATTN        worker -> sidecar: one layer of a decode batch
                header: u64 tag, u32 layer, u32 batch B, u32 num_heads Hq, u32 num_kv_heads Hkv, u32 head_dim D,
                        u32 flags (bit 0: new k/v present)
                arrays: seq_ids i64[B], context_lens i64[B], q f32[B,Hq,D], (k f32[B,Hkv,D], v f32[B,Hkv,D])
                context_lens count the new token: its k/v go to position context_len - 1, attention covers
                [0, context_len).
    ATTN_OUT    sidecar -> worker: header u64 tag, u32 layer, u32 B, u32 Hq, u32 D, u64 compute start ns,
                u64 compute end ns (CLOCK_MONOTONIC, comparable across processes; for traces); out f32[B,Hq,D]
    KV_UPLOAD   worker -> sidecar: header u64 tag, i64 seq_id, u32 layer, u32 start, u32 num_tokens T,
                u32 Hkv, u32 D; k f32[T,Hkv,D], v f32[T,Hkv,D]   (swap a prefilled sequence's KV in)
    KV_DOWNLOAD worker -> sidecar: header u64 tag, i64 seq_id, u32 layer, u32 start, u32 end
    KV_DATA     sidecar -> worker: same layout as KV_UPLOAD (the answer to KV_DOWNLOAD)
    ACK         sidecar -> worker: header u64 tag (KV_UPLOAD done)
    ERROR       sidecar -> worker: header u64 tag, u32 ErrorCode, u32 n; utf-8 message u8[n]
                tag 0 means "the request could not be parsed" (e.g. a corrupt record).

Tags are the client's ticket numbers (>= 1); responses come back in request order.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

HEADER_BYTES = 64
ALIGN = 64
MAX_DIM = 1 << 16  # bound on any batch/head/dim/token count field, so a corrupt header cannot ask for TBs
MAX_ERROR_TEXT = 4096


class MsgType(enum.IntEnum):
    ATTN = 1
    ATTN_OUT = 2
    KV_UPLOAD = 3
    KV_DOWNLOAD = 4
    KV_DATA = 5
    ACK = 6
    ERROR = 7


class ErrorCode(enum.IntEnum):
    INTERNAL = 1  # a bug or an unexpected exception in the sidecar
    INVALID = 2  # a malformed request (shape mismatch, bad length, bad layer)
    UNKNOWN_SEQUENCE = 3  # a seq id the sidecar does not hold
    CAPACITY = 4  # the CPU KV cache is full
    CORRUPT = 5  # the ring record failed validation; tag is 0
    NOT_CONFIGURED = 6  # data-plane message before Configure


class MessageFormatError(ValueError):
    """A payload does not match its declared layout."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


_ATTN = struct.Struct("<QIIIIII")  # tag, layer, batch, num_heads, num_kv_heads, head_dim, flags
_ATTN_OUT = struct.Struct("<QIIIIQQ")  # tag, layer, batch, num_heads, head_dim, start_ns, end_ns
_KV = struct.Struct("<QqIIIII")  # tag, seq_id, layer, start, num_tokens, num_kv_heads, head_dim
_KV_DOWNLOAD = struct.Struct("<QqIII")  # tag, seq_id, layer, start, end
_ACK = struct.Struct("<Q")  # tag
_ERROR = struct.Struct("<QII")  # tag, code, text length
_TAG = struct.Struct("<Q")
FLAG_HAS_KV = 1


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if not 0 < value <= MAX_DIM:
            raise MessageFormatError(f"{name}={value} is out of range (1..{MAX_DIM})")


_ITEMSIZE = {np.int64: 8, np.float32: 4}


def _view(buf: np.ndarray, offset: int, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    # NOTE: math.prod and a size table, not np.prod / np.dtype: this runs several times per layer call on both
    # ends, and numpy's reductions on a tuple cost microseconds each.
    nbytes = math.prod(shape) * _ITEMSIZE[dtype]
    return buf[offset:offset + nbytes].view(dtype).reshape(shape)


def read_tag(buf: np.ndarray) -> int:
    """The tag of any payload (every header starts with it); 0 if the payload is too short to have one."""
    if buf.shape[0] < _TAG.size:
        return 0
    return _TAG.unpack_from(buf, 0)[0]


# ------------------------------------------------------------------------------------------------------ ATTN

@dataclass(frozen=True)
class AttnLayout:
    """Offsets of one ATTN payload; both ends derive them from the header fields alone."""

    batch: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    has_kv: bool

    def __post_init__(self) -> None:
        _check_dims(batch=self.batch, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                    head_dim=self.head_dim)

    @cached_property  # NOTE: computed once per layout, read on every call
    def seq_ids_offset(self) -> int:
        return HEADER_BYTES

    @cached_property
    def context_lens_offset(self) -> int:
        return _align(self.seq_ids_offset + 8 * self.batch)

    @cached_property
    def q_offset(self) -> int:
        return _align(self.context_lens_offset + 8 * self.batch)

    @cached_property
    def k_offset(self) -> int:
        return _align(self.q_offset + 4 * self.batch * self.num_heads * self.head_dim)

    @cached_property
    def v_offset(self) -> int:
        return _align(self.k_offset + 4 * self.batch * self.num_kv_heads * self.head_dim)

    @cached_property
    def nbytes(self) -> int:
        if not self.has_kv:
            return self.k_offset
        return self.v_offset + 4 * self.batch * self.num_kv_heads * self.head_dim

    def views(self, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None,
                                              np.ndarray | None]:
        """(seq_ids [B] i64, context_lens [B] i64, q [B,Hq,D] f32, k [B,Hkv,D] f32 | None, v | None)."""
        b, hq, hkv, d = self.batch, self.num_heads, self.num_kv_heads, self.head_dim
        seq_ids = _view(buf, self.seq_ids_offset, np.int64, (b,))  # [B]
        context_lens = _view(buf, self.context_lens_offset, np.int64, (b,))  # [B]
        q = _view(buf, self.q_offset, np.float32, (b, hq, d))  # [B, Hq, D]
        if not self.has_kv:
            return seq_ids, context_lens, q, None, None
        k = _view(buf, self.k_offset, np.float32, (b, hkv, d))  # [B, Hkv, D]
        v = _view(buf, self.v_offset, np.float32, (b, hkv, d))  # [B, Hkv, D]
        return seq_ids, context_lens, q, k, v


# NOTE: both ends build a layout per layer call from a handful of batch shapes: reuse them (frozen, hashable).
attn_layout = lru_cache(maxsize=1024)(AttnLayout)


def write_attn_header(buf: np.ndarray, tag: int, layer: int, layout: AttnLayout) -> None:
    _ATTN.pack_into(buf, 0, tag, layer, layout.batch, layout.num_heads, layout.num_kv_heads, layout.head_dim,
                    FLAG_HAS_KV if layout.has_kv else 0)


def read_attn_header(buf: np.ndarray) -> tuple[int, int, AttnLayout]:
    """(tag, layer, layout); MessageFormatError if the payload length does not match the layout exactly."""
    if buf.shape[0] < HEADER_BYTES:
        raise MessageFormatError(f"ATTN payload of {buf.shape[0]} bytes is shorter than its header")
    tag, layer, batch, hq, hkv, d, flags = _ATTN.unpack_from(buf, 0)
    layout = attn_layout(batch, hq, hkv, d, bool(flags & FLAG_HAS_KV))
    if layout.nbytes != buf.shape[0]:
        raise MessageFormatError(f"ATTN payload is {buf.shape[0]} bytes, its header describes {layout.nbytes}")
    return tag, layer, layout


# -------------------------------------------------------------------------------------------------- ATTN_OUT

@dataclass(frozen=True)
class AttnOutLayout:
    batch: int
    num_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        _check_dims(batch=self.batch, num_heads=self.num_heads, head_dim=self.head_dim)

    @cached_property
    def nbytes(self) -> int:
        return HEADER_BYTES + 4 * self.batch * self.num_heads * self.head_dim

    def out_view(self, buf: np.ndarray) -> np.ndarray:
        return _view(buf, HEADER_BYTES, np.float32, (self.batch, self.num_heads, self.head_dim))  # [B, Hq, D]


attn_out_layout = lru_cache(maxsize=1024)(AttnOutLayout)


def write_attn_out_header(buf: np.ndarray, tag: int, layer: int, layout: AttnOutLayout, start_ns: int = 0,
                          end_ns: int = 0) -> None:
    _ATTN_OUT.pack_into(buf, 0, tag, layer, layout.batch, layout.num_heads, layout.head_dim, start_ns, end_ns)


def read_attn_out_header(buf: np.ndarray) -> tuple[int, int, AttnOutLayout]:
    if buf.shape[0] < HEADER_BYTES:
        raise MessageFormatError(f"ATTN_OUT payload of {buf.shape[0]} bytes is shorter than its header")
    tag, layer, batch, hq, d, _, _ = _ATTN_OUT.unpack_from(buf, 0)
    layout = attn_out_layout(batch, hq, d)
    if layout.nbytes != buf.shape[0]:
        raise MessageFormatError(f"ATTN_OUT payload is {buf.shape[0]} bytes, its header describes {layout.nbytes}")
    return tag, layer, layout


def read_attn_out_times(buf: np.ndarray) -> tuple[int, int]:
    """(start_ns, end_ns) of the sidecar's work on this batch, CLOCK_MONOTONIC."""
    return _ATTN_OUT.unpack_from(buf, 0)[5:7]


# ---------------------------------------------------------------------------------------- KV_UPLOAD / KV_DATA

@dataclass(frozen=True)
class KVLayout:
    """K and V of `num_tokens` consecutive tokens of one sequence and one layer."""

    num_tokens: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        _check_dims(num_tokens=self.num_tokens, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)

    @property
    def k_offset(self) -> int:
        return HEADER_BYTES

    @property
    def v_offset(self) -> int:
        return _align(self.k_offset + 4 * self.num_tokens * self.num_kv_heads * self.head_dim)

    @property
    def nbytes(self) -> int:
        return self.v_offset + 4 * self.num_tokens * self.num_kv_heads * self.head_dim

    @staticmethod
    def bytes_per_token(num_kv_heads: int, head_dim: int) -> int:
        return 2 * 4 * num_kv_heads * head_dim

    def views(self, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.num_tokens, self.num_kv_heads, self.head_dim)
        k = _view(buf, self.k_offset, np.float32, shape)  # [T, Hkv, D]
        v = _view(buf, self.v_offset, np.float32, shape)  # [T, Hkv, D]
        return k, v


def write_kv_header(buf: np.ndarray, tag: int, seq_id: int, layer: int, start: int, layout: KVLayout) -> None:
    _KV.pack_into(buf, 0, tag, seq_id, layer, start, layout.num_tokens, layout.num_kv_heads, layout.head_dim)


def read_kv_header(buf: np.ndarray) -> tuple[int, int, int, int, KVLayout]:
    """(tag, seq_id, layer, start, layout) of a KV_UPLOAD or KV_DATA payload."""
    if buf.shape[0] < HEADER_BYTES:
        raise MessageFormatError(f"KV payload of {buf.shape[0]} bytes is shorter than its header")
    tag, seq_id, layer, start, num_tokens, hkv, d = _KV.unpack_from(buf, 0)
    layout = KVLayout(num_tokens, hkv, d)
    if layout.nbytes != buf.shape[0]:
        raise MessageFormatError(f"KV payload is {buf.shape[0]} bytes, its header describes {layout.nbytes}")
    return tag, seq_id, layer, start, layout


# ------------------------------------------------------------------------------------------------ KV_DOWNLOAD

KV_DOWNLOAD_BYTES = HEADER_BYTES


def write_kv_download(buf: np.ndarray, tag: int, seq_id: int, layer: int, start: int, end: int) -> None:
    _KV_DOWNLOAD.pack_into(buf, 0, tag, seq_id, layer, start, end)


def read_kv_download(buf: np.ndarray) -> tuple[int, int, int, int, int]:
    """(tag, seq_id, layer, start, end)."""
    if buf.shape[0] != KV_DOWNLOAD_BYTES:
        raise MessageFormatError(f"KV_DOWNLOAD payload is {buf.shape[0]} bytes, expected {KV_DOWNLOAD_BYTES}")
    tag, seq_id, layer, start, end = _KV_DOWNLOAD.unpack_from(buf, 0)
    if not 0 <= start < end or end - start > MAX_DIM:
        raise MessageFormatError(f"KV_DOWNLOAD range [{start}, {end}) is empty or too long")
    return tag, seq_id, layer, start, end


# ------------------------------------------------------------------------------------------------- ACK / ERROR

ACK_BYTES = HEADER_BYTES


def write_ack(buf: np.ndarray, tag: int) -> None:
    _ACK.pack_into(buf, 0, tag)


def error_nbytes(text: str) -> int:
    return HEADER_BYTES + len(_error_text(text))


def _error_text(text: str) -> bytes:
    raw = text.encode("utf-8", "replace")
    if len(raw) > MAX_ERROR_TEXT:
        # NOTE: only the human-readable explanation is shortened, and it says so; the code is always exact.
        raw = raw[:MAX_ERROR_TEXT - 16].decode("utf-8", "ignore").encode() + b" [...shortened]"
    return raw


def write_error(buf: np.ndarray, tag: int, code: ErrorCode, text: str) -> None:
    raw = _error_text(text)
    _ERROR.pack_into(buf, 0, tag, int(code), len(raw))
    buf[HEADER_BYTES:HEADER_BYTES + len(raw)] = np.frombuffer(raw, dtype=np.uint8)


def read_error(buf: np.ndarray) -> tuple[int, ErrorCode, str]:
    if buf.shape[0] < HEADER_BYTES:
        raise MessageFormatError("ERROR payload is shorter than its header")
    tag, code, n = _ERROR.unpack_from(buf, 0)
    if HEADER_BYTES + n > buf.shape[0]:
        raise MessageFormatError("ERROR text runs past the payload")
    try:
        code = ErrorCode(code)
    except ValueError:
        code = ErrorCode.INTERNAL
    return tag, code, bytes(buf[HEADER_BYTES:HEADER_BYTES + n]).decode("utf-8", "replace")
