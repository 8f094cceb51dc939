"""Configuration of the cpu_attn sidecar process and of the model shape it serves."""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass

from neoserve.errors import ValidationError
from neoserve.internal.v1 import sidecar_pb2 as pb

KV_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_KV_CACHE_CLASS = "cpu_attn.kv_cache:CpuKVCache"


def is_local_address(address: str) -> bool:
    """True for a unix socket or a loopback host ("127.0.0.1:0", "[::1]:5000", "localhost:5000")."""
    if address.startswith("unix:") or address.startswith("unix-abstract:"):
        return True
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class AttnShape:
    """What the sidecar must know about the model: the attention shape of every layer."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"  # KV cache storage dtype; data-plane tensors are always float32
    scale: float = 0.0  # softmax scale; 0 means 1/sqrt(head_dim)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 65536:
                raise ValidationError(name, f"must be an integer in [1, 65536], got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValidationError("num_heads", f"{self.num_heads} is not a multiple of num_kv_heads "
                                               f"{self.num_kv_heads}")
        if self.dtype not in KV_DTYPES:
            raise ValidationError("dtype", f"must be one of {', '.join(KV_DTYPES)}, got {self.dtype!r}")
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise ValidationError("scale", f"must be finite and >= 0, got {self.scale!r}")

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale > 0 else 1.0 / math.sqrt(self.head_dim)


@dataclass
class SidecarConfig:
    """Start-up settings of one sidecar process (`python -m cpu_attn --help`)."""

    threads: int = 1  # torch/OpenMP threads of the attention kernel; should equal len(cpus)
    cpus: list[int] | None = None  # CPUs to pin the process to (os.sched_setaffinity); None leaves it as is
    kv_cache_gib: float = 1.0
    control_address: str = "127.0.0.1:0"  # gRPC control; "unix:/path" or a loopback host:port
    allow_remote_control: bool = False  # binding the control service beyond loopback needs this on purpose
    slot_size: int = 64 * 1024
    request_slots: int = 512  # 32 MiB request ring: a 64-sequence Llama-3-8B layer is ~1.6 MiB
    response_slots: int = 256  # 16 MiB response ring
    shm_prefix: str = "neoserve"
    kv_cache_class: str = DEFAULT_KV_CACHE_CLASS  # "module:Class" with the CpuKVCache API (tests swap it)
    parent_pid: int | None = None  # exit when this process is gone (a SIGKILLed worker leaves no orphan)
    shape: AttnShape | None = None  # configure at start-up instead of via the Configure RPC
    # How long the data plane busy-waits for the next request before yielding, then sleeping (WaitPolicy.spin_us).
    # Long spins pay off only on cores of its own: a sleeping end's wake-up costs ~0.1 ms in a VM.
    spin_us: float = 50.0
    # Serve attention requests with the resident C team (cpu_attn/csrc/team.c) instead of the Python loop.
    resident_team: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.threads, int) or not 1 <= self.threads <= 1024:
            raise ValidationError("threads", f"must be an integer in [1, 1024], got {self.threads!r}")
        if self.cpus is not None:
            if not self.cpus:
                raise ValidationError("cpus", "must name at least one CPU")
            available = os.sched_getaffinity(0)
            unknown = sorted(set(self.cpus) - available)
            if unknown:
                raise ValidationError("cpus", f"CPUs {unknown} are not available to this process "
                                              f"(available: {sorted(available)})")
        if not (math.isfinite(self.kv_cache_gib) and self.kv_cache_gib > 0):
            raise ValidationError("kv_cache_gib", f"must be > 0, got {self.kv_cache_gib!r}")
        if not is_local_address(self.control_address) and not self.allow_remote_control:
            raise ValidationError("control_address", f"{self.control_address!r} is not loopback or a unix socket; "
                                                     "pass --allow-remote-control to bind it anyway")
        if self.slot_size < 128 or self.slot_size % 64:
            raise ValidationError("slot_size", f"must be a multiple of 64 and >= 128, got {self.slot_size}")
        for name in ("request_slots", "response_slots"):
            value = getattr(self, name)
            if value < 2 or value & (value - 1):
                raise ValidationError(name, f"must be a power of two >= 2, got {value}")
        if not (math.isfinite(self.spin_us) and 0 <= self.spin_us <= 1e6):
            raise ValidationError("spin_us", f"must be in [0, 1e6] microseconds, got {self.spin_us!r}")
        if ":" not in self.kv_cache_class:
            raise ValidationError("kv_cache_class", f"must be 'module:Class', got {self.kv_cache_class!r}")

    @property
    def kv_cache_bytes(self) -> int:
        return int(self.kv_cache_gib * (1 << 30))


def shape_to_pb(shape: AttnShape | None) -> pb.SidecarModelShape | None:
    """The control service's wire form of a shape (None stays None: "not configured")."""
    if shape is None:
        return None
    return pb.SidecarModelShape(num_layers=shape.num_layers, num_heads=shape.num_heads,
                                num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim, dtype=shape.dtype,
                                scale=shape.scale)


def shape_from_pb(msg: pb.SidecarModelShape) -> AttnShape:
    return AttnShape(msg.num_layers, msg.num_heads, msg.num_kv_heads, msg.head_dim, msg.dtype or "float32",
                     msg.scale)
