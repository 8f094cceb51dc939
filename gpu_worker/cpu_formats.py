"""Which weight formats serve which batch sizes on this CPU, chosen by measuring them here at start-up.

A CPU decode step is a few matrix products per layer over weights that do not fit any cache, so its time is the
GEMMs' time, and which format is fastest depends on the batch and on the processor:
  - at small batches a step reads the weights once and does little arithmetic: fewer bytes win, so 4- or 8-bit
    weights (`quant.py`) beat dense ones;
  - at larger batches arithmetic catches up and the block-quantized kernels, which unpack every weight for a
    handful of rows, lose to dense GEMMs;
  - dense bf16 GEMMs are fast only where the CPU has bf16 dot products (avx512_bf16, AMX); elsewhere oneDNN
    converts every tile and fp32 is several times faster (measured: 4.5x at 256 rows on an AVX-512 Xeon without
    avx512_bf16).
Rather than a table of CPU models, `plan_formats` times one layer's projections and the LM head in each format at
each batch bucket, on random weights of the model's shapes (~0.3 s), and picks per bucket.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from gpu_worker.config import QUANTIZATIONS
from gpu_worker.model import quant
from gpu_worker.model.config import ModelConfig

log = logging.getLogger(__name__)

PROBE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
PREFILL_ROWS = 256  # rows of the GEMMs that pick the dense dtype (prefill chunks and large decode batches)


@dataclass(frozen=True)
class FormatPlan:
    dense_dtype: torch.dtype  # weights and activations of prefills and of decode batches above quant_max_batch
    quant: str | None  # "q4" / "q8" weights for decode batches up to quant_max_batch
    quant_max_batch: int  # 0 when quant is None
    kv_dtype: torch.dtype

    @classmethod
    def exact(cls) -> "FormatPlan":
        """fp32 everywhere: the path the transformers oracle tests run."""
        return cls(torch.float32, None, 0, torch.float32)

    def describe(self) -> str:
        dense = str(self.dense_dtype).removeprefix("torch.")
        if self.quant is None:
            return f"dense {dense} weights, {str(self.kv_dtype).removeprefix('torch.')} KV"
        return (f"{self.quant} weights for decode batches <= {self.quant_max_batch}, dense {dense} above and for "
                f"prefills, {str(self.kv_dtype).removeprefix('torch.')} KV")


def source_quant(source_type: str | None) -> str | None:
    """The quantization that serves a checkpoint's stored format: 4-bit and smaller GGUF types -> q4 (Q4_1 and
    Q4_0 map exactly, see quant.py), 5- to 8-bit ones -> q8 (Q8_0 exactly); float checkpoints -> None (dense)."""
    if not source_type:
        return None
    name = source_type.upper()
    if name.startswith(("Q4", "IQ4", "Q3", "Q2", "IQ3", "IQ2", "IQ1")):
        return "q4"
    if name.startswith(("Q5", "Q6", "Q8")):
        return "q8"
    return None


def plan_formats(mc: ModelConfig, dtype: str, quantization: str, source_type: str | None,
                 max_batch: int) -> FormatPlan:
    """dtype: EngineConfig.dtype on the CPU ("auto" or a name); quantization: one of QUANTIZATIONS."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if dtype == "float32" and quantization == "auto":
        # NOTE: --dtype float32 is the exact path the transformers oracle tests run: dense fp32 everywhere.
        return FormatPlan.exact()
    quant_kind = source_quant(source_type) if quantization == "auto" else (
        None if quantization == "none" else quantization)
    shapes = _projection_shapes(mc)
    if quant_kind is not None and any(in_f % quant.GROUP for _, in_f in shapes):
        log.warning("%s weights need input sizes divisible by %d (this model has %s): serving dense", quant_kind,
                    quant.GROUP, sorted({in_f for _, in_f in shapes}))
        quant_kind = None
    if dtype == "auto":
        dense = min((torch.float32, torch.bfloat16), key=lambda dt: _time_dense(shapes, PREFILL_ROWS, dt))
    else:
        dense = getattr(torch, dtype)
    quant_max = 0
    if quant_kind is not None:
        quant_max = _quant_crossover(shapes, mc, quant_kind, dense, min(max_batch, PROBE_BATCHES[-1]))
        if quantization != "auto":
            quant_max = max(quant_max, 1)  # asked for by name: at least batch 1 runs it
        if quant_max == 0:
            log.info("%s weights lose to dense %s ones at every batch size here: serving dense", quant_kind, dense)
            quant_kind = None
    # NOTE: bf16 KV off the exact path: half the bytes of every decode's attention (read back in fp32).
    kv = torch.bfloat16
    plan = FormatPlan(dense, quant_kind, quant_max, kv)
    log.info("CPU weight formats: %s", plan.describe())
    return plan


def _projection_shapes(mc: ModelConfig) -> list[tuple[int, int]]:
    """[out, in] of one layer's fused projections, then the LM head's."""
    h = mc.hidden_size
    return [(mc.q_size + 2 * mc.kv_size, h), (h, mc.q_size), (2 * mc.intermediate_size, h),
            (h, mc.intermediate_size), (mc.vocab_size, h)]


def _bench(fn, budget_s: float = 0.01) -> float:
    fn()  # warm-up (first-call allocations, oneDNN primitive creation)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s and n >= 2:
            return elapsed / n


def _time_dense(shapes, rows: int, dtype: torch.dtype) -> float:
    total = 0.0
    for out_f, in_f in shapes[:-1]:
        w = torch.randn(out_f, in_f, dtype=dtype)
        x = torch.randn(rows, in_f, dtype=dtype)
        total += _bench(lambda: torch.nn.functional.linear(x, w))
    return total


def _quant_crossover(shapes, mc: ModelConfig, kind: str, dense: torch.dtype, max_batch: int) -> int:
    """Largest probe batch (<= max_batch) up to which the quantized layer + head beat the dense ones."""
    layers = mc.num_layers
    weights = []
    for i, (out_f, in_f) in enumerate(shapes):
        w = torch.randn(out_f, in_f)
        head = i == len(shapes) - 1
        q = quant.quantize(w, "q8" if head else kind)
        weights.append((q, w.to(dense), 1 if head else layers))
    best = 0
    for b in PROBE_BATCHES:
        if b > max_batch:
            break
        tq = td = 0.0
        for q, d, repeat in weights:
            x = torch.randn(b, d.shape[1], dtype=dense)
            tq += repeat * _bench(lambda: quant.linear(x, q))
            td += repeat * _bench(lambda: torch.nn.functional.linear(x, d))
        if tq >= td:
            break
        best = b
    return best
