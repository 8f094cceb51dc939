"""Benchmark of the CPU decode-attention kernel (issue 3, bench parts (a) and (b)).

Prints, in one run:
  (a) the machine's read bandwidth measured on the spot (bench/membw.py, a buffer of >= 4x L3);
  (b) the kernel's effective bandwidth (K+V bytes read / time) for Llama-3-8B (32 q heads, 8 kv heads, d=128)
      and SmolLM2 (9/3, d=64) shapes, batch 16-64, contexts 512-4096, as a fraction of (a), with the
      same attention through torch SDPA on contiguous per-sequence fp32 KV as the baseline ratio.

Why the layers: the KV of one layer at these shapes can fit in the 480 MiB L3, so every configuration builds
enough layers that the cache holds >= 2 GiB and calls attention layer after layer, as a decode step does; each
call then streams its layer from DRAM. `--quick` runs a seconds-long subset (working set below 4x L3: a smoke
run, not a figure to report).

Run: `python bench/bench_cpu_attn.py [--quick] [--threads N] [--dtypes bfloat16,float32]`.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from membw import measure_read_bandwidth  # noqa: E402

from cpu_attn.kernel import Arena, default_num_threads, has_avx512, stream_read  # noqa: E402
from cpu_attn.kv_cache import CpuKVCache  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


SHAPES = [Shape("llama3-8b", 32, 8, 128), Shape("smollm2", 9, 3, 64)]
FULL_CONFIGS = [(16, 4096), (32, 2048), (64, 1024), (64, 512), (16, 512)]  # (batch, context)
QUICK_CONFIGS = [(16, 512)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Result:
    median_s: float
    best_s: float
    layer_bytes: int

    @property
    def median_gbs(self) -> float:
        return self.layer_bytes / self.median_s / 1e9

    @property
    def best_gbs(self) -> float:
        return self.layer_bytes / self.best_s / 1e9


def layers_for(layer_bytes: int, working_set: int) -> int:
    return max(1, math.ceil(working_set / layer_bytes))


class LocalProbe:
    """One streaming read of a buffer as large as the working set, right before and after each measurement.

    Why: on a shared machine the bandwidth left to us changes within seconds; the fraction that says how good
    the kernel is compares it with what the same threads could read at that moment.
    """

    def __init__(self, nbytes: int, threads: int):
        self.arena = Arena(nbytes)
        self.arena.array.fill(1)
        self.threads = threads

    def gbs(self) -> float:
        t0 = time.perf_counter()
        _, nread = stream_read(self.arena.ptr, self.arena.nbytes, self.threads)
        return nread / (time.perf_counter() - t0) / 1e9


def bench_kernel(shape: Shape, batch: int, ctx: int, dtype: torch.dtype, threads: int, working_set: int,
                 rounds: int) -> Result:
    esize = torch.tensor([], dtype=dtype).element_size()
    layer_bytes = batch * ctx * shape.num_kv_heads * shape.head_dim * 2 * esize
    num_layers = layers_for(layer_bytes, working_set)
    cache = CpuKVCache(num_layers, shape.num_kv_heads, shape.head_dim, int(num_layers * layer_bytes * 1.02) + (8 << 20),
                       dtype=dtype, num_threads=threads)
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(ctx, shape.num_kv_heads, shape.head_dim, generator=gen)  # [ctx, Hkv, D]
    v = torch.randn(ctx, shape.num_kv_heads, shape.head_dim, generator=gen)  # [ctx, Hkv, D]
    for s in range(batch):
        cache.add_sequence(s)
        cache.reserve(s, ctx)
    for layer in range(num_layers):
        for s in range(batch):
            cache.write(layer, s, 0, k, v)
    ids = torch.arange(batch)
    lens = torch.full((batch,), ctx)
    q = torch.randn(batch, shape.num_q_heads, shape.head_dim, generator=gen)  # [B, Hq, D]
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(shape.head_dim)
    for layer in range(num_layers):  # warm-up pass (thread pool, page tables)
        cache.attention(layer, ids, lens, q, out, scale)
    times = []
    for _ in range(rounds):
        for layer in range(num_layers):
            t0 = time.perf_counter()
            cache.attention(layer, ids, lens, q, out, scale)
            times.append(time.perf_counter() - t0)
    return Result(statistics.median(times), min(times), layer_bytes)


def bench_sdpa(shape: Shape, batch: int, ctx: int, threads: int, working_set: int, rounds: int) -> Result:
    """torch SDPA over contiguous per-sequence fp32 KV [B, Hkv, ctx, D] (GQA through enable_gqa)."""
    torch.set_num_threads(threads)
    layer_bytes = batch * ctx * shape.num_kv_heads * shape.head_dim * 2 * 4
    num_layers = layers_for(layer_bytes, working_set)
    gen = torch.Generator().manual_seed(0)
    kv = [(torch.randn(batch, shape.num_kv_heads, ctx, shape.head_dim, generator=gen),  # [B, Hkv, ctx, D]
           torch.randn(batch, shape.num_kv_heads, ctx, shape.head_dim, generator=gen))
          for _ in range(num_layers)]
    q = torch.randn(batch, shape.num_q_heads, 1, shape.head_dim, generator=gen)  # [B, Hq, 1, D]
    for k, v in kv:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    times = []
    for _ in range(rounds):
        for k, v in kv:
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            times.append(time.perf_counter() - t0)
    return Result(statistics.median(times), min(times), layer_bytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (small working set)")
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default: cores this process may use)")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated cache dtypes")
    ap.add_argument("--working-set-gib", type=float, default=None, help="KV bytes per configuration (default 2)")
    ap.add_argument("--rounds", type=int, default=None, help="passes over all layers per configuration")
    ap.add_argument("--no-sdpa", action="store_true", help="skip the torch SDPA baseline")
    ap.add_argument("--shapes", default=",".join(s.name for s in SHAPES), help="comma-separated shape names")
    args = ap.parse_args()

    threads = args.threads or default_num_threads()
    torch.set_num_threads(threads)
    working_set = int((args.working_set_gib or (0.25 if args.quick else 2.0)) * 2**30)
    rounds = args.rounds or (2 if args.quick else 4)
    configs = QUICK_CONFIGS if args.quick else FULL_CONFIGS
    dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",")]

    print(f"# CPU decode attention benchmark: {threads} threads, AVX-512 path: {has_avx512()}, "
          f"KV working set per configuration {working_set / 2**30:.2f} GiB"
          + (" (quick: below 4x L3, smoke run only)" if args.quick else ""))
    print(f"# load average at start: {os.getloadavg()[0]:.2f} (other processes share these cores)")
    probe_bytes = working_set if args.quick else max(working_set, 2 << 30)
    bw = measure_read_bandwidth(probe_bytes, threads, passes=3 if args.quick else 5)
    print(f"(a) {bw}")
    probe = LocalProbe(probe_bytes, threads)
    print("(b) kernel effective bandwidth = K+V bytes read / time per layer call (median and best over all calls);")
    print("    frac(a) = median / (a) median; local = read bandwidth probed just before+after this row, "
          "frac(loc) = median / local;")
    print("    Mtok/s = KV tokens of one layer per second; sdpa = torch SDPA on contiguous fp32 KV, x = its time / ours")
    print(f"{'shape':10} {'dtype':9} {'B':>3} {'ctx':>5} {'layerMB':>8} {'ms/layer':>9} {'GB/s med':>9} "
          f"{'GB/s best':>9} {'frac(a)':>8} {'local':>6} {'frac(loc)':>9} {'Mtok/s':>7} {'sdpa GB/s':>9} "
          f"{'x sdpa':>7}")
    shapes = [s for s in SHAPES if s.name in args.shapes.split(",")]
    for shape in shapes:
        for batch, ctx in configs:
            sdpa = None if args.no_sdpa else bench_sdpa(shape, batch, ctx, threads, working_set, rounds)
            for dtype in dtypes:
                before = probe.gbs()
                r = bench_kernel(shape, batch, ctx, dtype, threads, working_set, rounds)
                local = (before + probe.gbs()) / 2
                mtok = batch * ctx / r.median_s / 1e6
                sdpa_cols = (f"{sdpa.median_gbs:9.1f} {sdpa.median_s / r.median_s:6.2f}x" if sdpa else "")
                print(f"{shape.name:10} {str(dtype).removeprefix('torch.'):9} {batch:3d} {ctx:5d} "
                      f"{r.layer_bytes / 1e6:8.1f} {r.median_s * 1e3:9.2f} {r.median_gbs:9.1f} {r.best_gbs:9.1f} "
                      f"{r.median_gbs / bw.median_gbs:8.2f} {local:6.1f} {r.median_gbs / local:9.2f} {mtok:7.1f} "
                      f"{sdpa_cols}", flush=True)
    del probe
    bw_end = measure_read_bandwidth(probe_bytes, threads, passes=3 if args.quick else 5)
    print(f"(a) again at the end: {bw_end}")
    print(f"# load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
