"""Where the time of one sidecar attention call goes, for the small batches a pipelined decode step sends.

    python bench/bench_handoff.py                 # Llama-3-8B shape, bf16 KV, sidecar threads = all cores but one
    python bench/bench_handoff.py --threads 13 --quick --spin-us 50,3000

The H200 trace (BENCHMARKS.md) showed ~0.32 ms per sidecar call for 6 sequences x ~200 tokens, whose KV the kernel
reads in ~0.05 ms at that host's bandwidth. This splits such a call, per batch shape, into:

  kernel      CpuKVCache.decode (append the new K/V, attention) in this process with the same thread count: the
              sidecar's work
  handler     the sidecar's own start/end stamps around its request handler (validation, append, kernel, reply)
  round trip  the worker client's submit_attention + wait (CPU tensors, so no device copies): rings, wake-ups,
              Python on both sides

so `handler - kernel` is the sidecar's per-call overhead and `round trip - handler` the transport's. Round trips
are measured once per ring spin time (--spin-us: how long each end busy-waits before sleeping; the first value is
the baseline the others are compared with). The device
<-> pinned staging a CUDA worker adds is in the worker's logged performance model (perf_model.describe), which
profiles the same hand-off with device tensors. Medians over --iters calls, spaced --gap-us apart like the layers of
a step (a sleeping peer pays its wake-up, as in serving).

Then (--fixed, on by default; --fixed-only skips the split above) the sidecar's fixed cost per attention call,
today's Python data plane against the resident C team (`--data-plane python|team`), in the same run and
alternated --repeat times, at --fixed-batches sequences of --fixed-context tokens:

  kernel            the team's own stamps around append + attention in C (no Python): the kernel's time
  commit->answer    the client's stamps: from publishing the request to finding the answer in the ring
  fixed             commit->answer - kernel: what a call costs beyond its kernel (rings, wake-ups, parsing,
                    Python, thread hand-offs); the issue's goal is <= 15 us with the team
  round trip        the client's whole submit_attention + wait (its own Python included)

With --fixed-spin-us longer than --fixed-gap-us both ends spin between calls: this needs a core for each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from cpu_attn.config import AttnShape
from cpu_attn.kernel import Geometry
from cpu_attn.kv_cache import CpuKVCache
from gpu_worker.sidecar_client import SidecarClient
from neoserve.shm_ring import WaitPolicy

SHAPES = {"llama3-8b": (32, 32, 8, 128), "smollm2": (30, 9, 3, 64)}  # layers, Hq, Hkv, D
BATCHES = ((1, 16), (6, 200), (16, 1000))  # (sequences, context tokens)


def _median_us(fn, iters: int, gap_s: float) -> float:
    fn()
    times = []
    for _ in range(iters):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


def _fixed_costs(args, shape: AttnShape, kv_gib: float, data: dict) -> None:
    """Fixed cost per call of the Python data plane and the resident team (see the module doc)."""
    batches = [int(x) for x in args.fixed_batches.split(",") if x.strip()]
    n = args.fixed_context
    iters = 100 if args.quick else args.iters
    spin, gap = args.fixed_spin_us, args.fixed_gap_us / 1e6
    samples: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    print(f"# fixed cost per call: {n}-token contexts, ring spin {spin:.0f} us, calls {args.fixed_gap_us:.0f} us "
          f"apart, {args.threads} sidecar threads, {args.repeat} alternations; load average {os.getloadavg()}")
    for _ in range(args.repeat):
        for path in ("python", "team"):
            sidecar = SidecarClient.spawn(threads=args.threads, kv_cache_gib=kv_gib, shape=shape,
                                          policy=WaitPolicy(spin_us=spin),
                                          extra_args=["--spin-us", str(spin), "--data-plane", path])
            try:
                for b in batches:
                    ids = list(range(1, b + 1))
                    q, k_new, hist = (torch.randn(b, shape.num_heads, shape.head_dim),
                                      torch.randn(b, shape.num_kv_heads, shape.head_dim),
                                      torch.randn(n, shape.num_kv_heads, shape.head_dim))
                    sidecar.create_sequences(ids)
                    for sid in ids:
                        sidecar.upload_kv(sid, 0, 0, hist, hist)
                    sidecar.trace, sidecar.trace_client = {}, {}

                    def call():
                        sidecar.wait(sidecar.submit_attention(0, ids, [n + 1] * b, q, k_new, k_new))

                    round_trip = _median_us(call, iters, gap)
                    tickets = sorted(sidecar.trace)[1:]  # the first call warms up
                    span = statistics.median(sidecar.trace[t][1] - sidecar.trace[t][0] for t in tickets) / 1e3
                    answer = statistics.median(sidecar.trace_client[t][1] - sidecar.trace_client[t][0]
                                               for t in tickets) / 1e3
                    samples.setdefault((path, b), []).append((span, answer, round_trip))
                    sidecar.trace = sidecar.trace_client = None
                    sidecar.free_sequences(ids)
            finally:
                sidecar.close()
    med = {key: [statistics.median(x[i] for x in runs) for i in range(3)] for key, runs in samples.items()}
    print("path    sequences  kernel us  sidecar span us  commit->answer us  fixed us  round trip us  "
          "fixed vs python")
    for b in batches:
        kernel = med["team", b][0]
        for path in ("python", "team"):
            span, answer, round_trip = med[path, b]
            fixed = answer - kernel
            base = med["python", b][1] - kernel
            print(f"{path:6s}  {b:9d}  {kernel:9.1f}  {span:15.1f}  {answer:16.1f}  {fixed:8.1f}  {round_trip:13.1f}  "
                  f"{fixed / base if base > 0 else float('nan'):14.2f}x")
    print(f"# load average after: {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1))
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--gap-us", type=float, default=500.0, help="idle time between calls (default: 500)")
    parser.add_argument("--spin-us", default="50,3000", help="ring spin times to compare, us (default: 50,3000)")
    parser.add_argument("--quick", action="store_true", help="100 calls per shape")
    parser.add_argument("--no-fixed", dest="fixed", action="store_false", help="skip the fixed-cost comparison")
    parser.add_argument("--fixed-only", action="store_true", help="only the fixed-cost comparison")
    parser.add_argument("--fixed-batches", default="1,32", help="sequences per call (default: 1,32)")
    parser.add_argument("--fixed-context", type=int, default=16, help="tokens per sequence (default: 16)")
    parser.add_argument("--fixed-spin-us", type=float, default=3000.0, help="ring spin of both ends (default: 3000)")
    parser.add_argument("--fixed-gap-us", type=float, default=200.0, help="idle time between calls (default: 200)")
    parser.add_argument("--repeat", type=int, default=2, help="alternations of the two data planes (default: 2)")
    args = parser.parse_args()
    iters = 100 if args.quick else args.iters
    layers, hq, hkv, d = SHAPES[args.shape]
    dtype = getattr(torch, args.dtype)
    gap = args.gap_us / 1e6
    torch.set_num_threads(1)
    block = 128  # the sidecar's KV block (cpu_attn.kv_cache.DEFAULT_BLOCK_SIZE)
    blocks = sum(b * -(-(n + 1) // block) for b, n in BATCHES)
    kv_gib = 1.5 * blocks * Geometry.block_bytes(layers, hkv, d, block, dtype) / 2**30

    print(f"# sidecar hand-off, {args.shape} {args.dtype} KV, {args.threads} sidecar threads, medians of {iters} "
          f"calls {args.gap_us:.0f} us apart")
    data = {(b, n): (torch.randn(b, hq, d), torch.randn(b, hkv, d), torch.randn(n, hkv, d)) for b, n in BATCHES}
    ids_of = {}
    next_id = 1
    for b, n in BATCHES:
        ids_of[b, n] = list(range(next_id, next_id + b))
        next_id += b

    shape = AttnShape(layers, hq, hkv, d, dtype=args.dtype, scale=d ** -0.5)
    if args.fixed_only:
        fixed_blocks = sum(int(b) for b in args.fixed_batches.split(",")) * -(-(args.fixed_context + 1) // 128)
        _fixed_costs(args, shape, 2 * fixed_blocks * Geometry.block_bytes(layers, hkv, d, 128, dtype) / 2**30 + 0.05,
                     data)
        return

    # 1. Round trips through a real sidecar process. NOTE: first, before this process runs any OpenMP kernel: a
    # team spinning after its last region would take cores from the sidecar on a small host.
    spins = [float(x) for x in args.spin_us.split(",") if x.strip()]
    rounds, handlers = {}, {}
    for spin in spins:
        sidecar = SidecarClient.spawn(threads=args.threads, kv_cache_gib=kv_gib, shape=shape,
                                      policy=WaitPolicy(spin_us=spin), extra_args=["--spin-us", str(spin)])
        try:
            for b, n in BATCHES:
                ids, (q, k_new, hist) = ids_of[b, n], data[b, n]
                sidecar.create_sequences(ids)
                for s in ids:
                    sidecar.upload_kv(s, 0, 0, hist, hist)
                spans: list[int] = []

                def round_trip():
                    sidecar.trace = {}
                    ticket = sidecar.submit_attention(0, ids, [n + 1] * b, q, k_new, k_new)
                    sidecar.wait(ticket)
                    start, end = sidecar.trace[ticket]
                    spans.append(end - start)

                rounds[spin, b, n] = _median_us(round_trip, iters, gap)
                handlers[spin, b, n] = statistics.median(spans[1:]) / 1e3
                sidecar.free_sequences(ids)
        finally:
            sidecar.close()

    # 2. The same work in this process: the sidecar's kernel calls alone.
    local = CpuKVCache(layers, hkv, d, int(kv_gib * 2**30), dtype=dtype, num_threads=args.threads)
    kernels = {}
    for b, n in BATCHES:
        ids, (q, k_new, hist) = ids_of[b, n], data[b, n]
        for s in ids:
            local.add_sequence(s)
            local.reserve(s, n + 1)
            local.write(0, s, 0, hist, hist)
        ids_t, lens_t = torch.tensor(ids), torch.full((b,), n + 1)
        out = torch.empty(b, hq, d)

        def kernel():
            local.decode(0, ids_t, lens_t, q, k_new, k_new, out, d ** -0.5)

        kernels[b, n] = _median_us(kernel, iters, gap)
    print("spin us  batch        kernel us  handler us  round trip us  sidecar overhead us  transport us  "
          "vs first spin")
    for spin in spins:
        for b, n in BATCHES:
            t_kernel, t_handler, t_round = kernels[b, n], handlers[spin, b, n], rounds[spin, b, n]
            print(f"{spin:7.0f}  {b:3d} x {n:5d}  {t_kernel:9.1f}  {t_handler:10.1f}  {t_round:13.1f}  "
                  f"{t_handler - t_kernel:19.1f}  {t_round - t_handler:12.1f}  "
                  f"{rounds[spins[0], b, n] / t_round:12.2f}x")
    if args.fixed:
        fixed_blocks = sum(int(b) for b in args.fixed_batches.split(",")) * -(-(args.fixed_context + 1) // block)
        _fixed_costs(args, shape, kv_gib + 2 * fixed_blocks * Geometry.block_bytes(layers, hkv, d, block, dtype) / 2**30,
                     data)

if __name__ == "__main__":
    main()
