"""Block-quantized weights for the CPU: 4-bit (as GGUF's Q4_1) and 8-bit (as Q8_0), in groups of 32 inputs.

A projection's weight is one of three kinds, all called through `linear(x, w)`:
  - a dense tensor [out, in]   -> F.linear
  - `Q4Weight`: w = d * q + m  -> neoserve::q4_linear (gpu_worker/csrc/qgemm.cpp)
  - `Q8Weight`: w = d * q      -> neoserve::q8_linear
Activations stay fp32 (or bf16 where the dense model runs bf16); the kernels compute in fp32.

GGUF's Q4_1 stores each group of 32 weights as d * q + m with q in [0, 15] (d, m fp16), and Q8_0 as d * q with q in
[-127, 127]: quantizing the dequantized weights again with the same rule (per-group min/max, resp. absmax) recovers
the file's q, d and m, so a GGUF model is served with its own numbers, and any other checkpoint gets the same
formats. The layouts are the kernels' (see qgemm.cpp); the ops register on import of gpu_worker._qgemm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import gpu_worker._qgemm  # noqa: F401  (registers torch.ops.neoserve.*)

GROUP = 32


@dataclass
class Q4Weight:
    q: torch.Tensor  # [out, in / 2] uint8: byte i of a group holds element i (low nibble) and i + 16 (high)
    dm: torch.Tensor  # [out, 2, in / 32] fp16: scales d (plane 0) and offsets m (plane 1) of the groups

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.dm.nbytes


@dataclass
class Q8Weight:
    q: torch.Tensor  # [out, in] int8
    d: torch.Tensor  # [out, in / 32] fp16

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes


Weight = torch.Tensor | Q4Weight | Q8Weight


@torch.library.register_fake("neoserve::q4_linear")
def _q4_fake(x, q, dm):
    return x.new_empty(x.shape[0], q.shape[0])


@torch.library.register_fake("neoserve::q8_linear")
def _q8_fake(x, q, d):
    return x.new_empty(x.shape[0], q.shape[0])


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] -> [T, out] in x's dtype."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    if isinstance(w, Q4Weight):
        y = torch.ops.neoserve.q4_linear(x, w.q, w.dm)
    else:
        y = torch.ops.neoserve.q8_linear(x, w.q, w.d)
    return y if bias is None else y + bias


def weight_nbytes(w: Weight) -> int:
    return w.nbytes if not isinstance(w, torch.Tensor) else w.numel() * w.element_size()


def _groups(w: torch.Tensor) -> torch.Tensor:
    out_f, in_f = w.shape
    if in_f % GROUP:
        raise ValueError(f"block quantization needs in_features divisible by {GROUP}, got {in_f}")
    return w.float().reshape(out_f, in_f // GROUP, GROUP)  # [out, groups, 32]


def quantize_q4(w: torch.Tensor) -> Q4Weight:
    """w [out, in] -> 4-bit groups with min/max: d = (max - min) / 15, m = min (GGUF's Q4_1 rule)."""
    g = _groups(w)
    lo = g.amin(dim=-1, keepdim=True)
    hi = g.amax(dim=-1, keepdim=True)
    d = ((hi - lo) / 15).half().float()  # NOTE: rounded to fp16 first, as stored, so q is chosen against it
    m = lo.half().float()
    # NOTE: a constant group (d == 0) keeps q = 0 and its value in m.
    q = torch.where(d > 0, (g - m) / d.clamp(min=torch.finfo(torch.float16).tiny), 0).round().clamp(0, 15)
    q = q.to(torch.uint8)  # [out, groups, 32]
    packed = (q[..., :16] | (q[..., 16:] << 4)).reshape(w.shape[0], -1)  # [out, in / 2]
    dm = torch.stack([d.squeeze(-1), m.squeeze(-1)], dim=1)  # [out, 2, groups]
    return Q4Weight(packed.contiguous(), dm.half().contiguous())


def quantize_q8(w: torch.Tensor) -> Q8Weight:
    """w [out, in] -> 8-bit groups with absmax: d = max|w| / 127 (GGUF's Q8_0 rule)."""
    g = _groups(w)
    d = (g.abs().amax(dim=-1, keepdim=True) / 127).half().float()  # [out, groups, 1]
    q = torch.where(d > 0, g / d.clamp(min=torch.finfo(torch.float16).tiny), 0).round().clamp(-127, 127)
    return Q8Weight(q.to(torch.int8).reshape(w.shape).contiguous(), d.squeeze(-1).half().contiguous())


def quantize(w: torch.Tensor, kind: str) -> Q4Weight | Q8Weight:
    """kind: "q4" or "q8"."""
    if kind == "q4":
        return quantize_q4(w)
    if kind == "q8":
        return quantize_q8(w)
    raise ValueError(f"quantization kind must be q4 or q8, got {kind!r}")


def dequantize(w: Weight) -> torch.Tensor:
    """Back to fp32 [out, in] (tests and accuracy tools; the serving path never dequantizes)."""
    if isinstance(w, torch.Tensor):
        return w.float()
    if isinstance(w, Q8Weight):
        out_f, in_f = w.q.shape
        return (w.q.float().view(out_f, -1, GROUP) * w.d.float().unsqueeze(-1)).reshape(out_f, in_f)
    out_f = w.q.shape[0]
    b = w.q.view(out_f, -1, GROUP // 2)  # [out, groups, 16]
    q = torch.cat([b & 0xF, b >> 4], dim=-1).float()  # [out, groups, 32]
    d, m = w.dm.float().unbind(1)  # [out, groups] each
    return (q * d.unsqueeze(-1) + m.unsqueeze(-1)).reshape(out_f, -1)
