"""`python -m gpu_worker.probe` (`neoserve probe`): measures this host with the project's own code paths and writes
the host profile `plan` (python -m gpu_worker.sim) costs its steps with.

    python -m gpu_worker.probe --out host.json                  # embedded SmolLM2 on this machine's device
    python -m gpu_worker.probe --model random:llama-3-8b --device cuda --dtype bfloat16

Measured, in this order (each with the thread count the launcher gives that process; gateway/launcher.plan_cpus):
  1. the sidecar hand-off: round trips of one attention call through a spawned sidecar (cpu_attn) and its rings,
     small and larger batches, calls spaced like a step's layers: the fixed cost per call and per sequence;
  2. host memory read bandwidth with the sidecar's threads (the kernel's native stream read, >= 4x L3 buffer);
  3. the decode-attention kernel's bandwidth (CpuKVCache, bf16 and fp32 KV, the model's KV heads, a working set
     past the caches);
  4. the worker's own step: an LLMEngine of the model times decode steps at a few batch sizes and one prefill
     chunk, beside the device's read bandwidth and GEMM throughput for the model's shapes with the same threads;
     the step's fixed and per-token costs are what those leave unexplained (least squares). Where the device is
     the CPU this runs twice: with all cores (gpu-only) and with the worker's share beside a sidecar;
  5. on a GPU: device copy bandwidth, GEMM TFLOP/s for the model's shapes, pinned H2D/D2H bandwidth.
Hand-off first: NOTE: an OpenMP team this process starts keeps spinning after its last region and would take
cores from the sidecar on a small host (as bench/bench_handoff.py orders it).

Everything it starts (sidecar, engine, buffers) is stopped and freed before it returns; it takes under 2 minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from cpu_attn.config import AttnShape
from cpu_attn.kernel import Arena, stream_read
from cpu_attn.kv_cache import CpuKVCache
from gpu_worker.sim.model_shape import ModelShape, resolve
from neoserve.errors import ModelLoadError

GB = 1e9
READ_BYTES = 2 << 30  # NOTE: 4x the development VM's 480 MiB L3, so the figure is DRAM's, not the cache's
KERNEL_WORKING_SET = 1 << 30
HANDOFF_GAP_S = 500e-6  # idle time between calls, like the layers of a step (a sleeping ring end pays its wake-up)
DECODE_BATCHES = (1, 4, 16)
DECODE_PROMPT = 128
PREFILL_TOKENS = 128
TIMED_STEPS = 4


def _median_s(fn, reps: int, gap_s: float = 0.0, sync=None) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if gap_s:
            time.sleep(gap_s)
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker_and_sidecar_threads(cores: int, on_gpu: bool) -> tuple[int, int, int]:
    """(worker threads alone, worker threads beside a sidecar, sidecar threads), as gateway/launcher.plan_cpus
    splits `cores` (the gateway's share of the last core left out)."""
    if cores == 1:
        return 1, 1, 1
    if on_gpu:
        return 1, 1, max(1, cores - 2) if cores >= 3 else 1
    sidecar = max(1, cores // 2)
    return cores, cores - sidecar, sidecar


# --- host: hand-off, read bandwidth, kernel -------------------------------------------------------------------------
def measure_handoff(shape: ModelShape, threads: int, kv_dtype: str, spin_us: float) -> dict:
    """Round trips of one layer's attention call through a real sidecar: (1 x 16), (8 x 16) and (8 x 512) tokens;
    the fixed cost per call and per sequence, with the kernel's KV read taken out by the (8 x 512) slope."""
    from gpu_worker.sidecar_client import SidecarClient
    from neoserve.shm_ring import WaitPolicy

    hq, hkv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    attn = AttnShape(shape.num_layers, hq, hkv, d, dtype=kv_dtype, scale=d ** -0.5)
    sidecar = SidecarClient.spawn(threads=threads, kv_cache_gib=0.25, shape=attn, policy=WaitPolicy(spin_us=spin_us),
                                  extra_args=["--spin-us", str(spin_us)])
    try:
        def probe(batch: int, ctx: int, first_id: int) -> float:
            ids = list(range(first_id, first_id + batch))
            sidecar.create_sequences(ids)
            hist = torch.randn(ctx - 1, hkv, d)
            for s in ids:
                sidecar.upload_kv(s, 0, 0, hist, hist)
            q, kv = torch.randn(batch, hq, d), torch.randn(batch, hkv, d)

            def call():
                sidecar.wait(sidecar.submit_attention(0, ids, [ctx] * batch, q, kv, kv))
            try:
                return _median_s(call, 60, HANDOFF_GAP_S)
            finally:
                sidecar.free_sequences(ids)

        t1, t8, t8l = probe(1, 16, 1), probe(8, 16, 100), probe(8, 512, 200)
    finally:
        sidecar.close()
    per_ctx = max(t8l - t8, 0.0) / (8 * (512 - 16))
    per_seq = max((t8 - t1) / 7 - 16 * per_ctx, 0.0)
    fixed = max(t1 - per_seq - 16 * per_ctx, 0.0)
    return {"handoff_us": 1e6 * fixed, "handoff_per_seq_us": 1e6 * per_seq, "spin_us": spin_us,
            "round_trip_us": {"1x16": 1e6 * t1, "8x16": 1e6 * t8, "8x512": 1e6 * t8l}}


def measure_read_bw(threads: int, nbytes: int = READ_BYTES, passes: int = 3) -> float:
    """Bytes/s of one streaming read of an `nbytes` buffer split over `threads` (median of `passes`)."""
    arena = Arena(nbytes)
    try:
        arena.array.fill(1)  # fault every page in before timing
        stream_read(arena.ptr, nbytes, threads)
        rates = []
        for _ in range(passes):
            t0 = time.perf_counter()
            _, nread = stream_read(arena.ptr, nbytes, threads)
            rates.append(nread / (time.perf_counter() - t0))
        return statistics.median(rates)
    finally:
        del arena


def measure_kernel_bw(shape: ModelShape, dtype: torch.dtype, threads: int, batch: int = 16, ctx: int = 1024) -> float:
    """K+V bytes/s of the sidecar's decode-attention kernel, layer after layer over a working set past the caches
    (bench/bench_cpu_attn.py's method, one configuration)."""
    hkv, d, hq = shape.num_kv_heads, shape.head_dim, shape.num_heads
    esize = torch.tensor([], dtype=dtype).element_size()
    layer_bytes = batch * ctx * hkv * d * 2 * esize
    layers = max(1, math.ceil(KERNEL_WORKING_SET / layer_bytes))
    cache = CpuKVCache(layers, hkv, d, int(layers * layer_bytes * 1.1) + (8 << 20), dtype=dtype, num_threads=threads)
    try:
        k = torch.randn(ctx, hkv, d)
        for s in range(batch):
            cache.add_sequence(s)
            cache.reserve(s, ctx)
            for layer in range(layers):
                cache.write(layer, s, 0, k, k)
        ids, lens = torch.arange(batch), torch.full((batch,), ctx)
        q = torch.randn(batch, hq, d)
        out = torch.empty_like(q)
        for layer in range(layers):  # warm-up pass
            cache.attention(layer, ids, lens, q, out, d ** -0.5)
        times = []
        for _ in range(2):
            for layer in range(layers):
                t0 = time.perf_counter()
                cache.attention(layer, ids, lens, q, out, d ** -0.5)
                times.append(time.perf_counter() - t0)
        return layer_bytes / statistics.median(times)
    finally:
        del cache


# --- the worker's device ----------------------------------------------------------------------------------------------
def measure_gemm(shape: ModelShape, device: torch.device, dtype: torch.dtype, tokens: int = PREFILL_TOKENS) -> float:
    """FLOP/s of the model's layer matmuls (fused QKV, o_proj, gate+up, down) at `tokens` rows."""
    h, q, kv, inter = shape.hidden_size, shape.q_size, shape.kv_size, shape.intermediate_size
    mats = [(h, q + 2 * kv), (q, h), (h, 2 * inter), (inter, h)]
    ws = [torch.randn(a, b, device=device, dtype=dtype) for a, b in mats]
    xs = [torch.randn(tokens, a, device=device, dtype=dtype) for a, _ in mats]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None

    def run():
        for x, w in zip(xs, ws):
            torch.mm(x, w)
    t = _median_s(run, 5, sync=sync)
    flops = sum(2 * tokens * a * b for a, b in mats)
    del ws, xs
    return flops / t


def measure_cuda(device: torch.device, dtype: torch.dtype, shape: ModelShape) -> dict:
    """Device copy bandwidth, GEMM throughput for the model's shapes, pinned H2D/D2H bandwidth."""
    nbytes = 1 << 30
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_bw = 2 * nbytes / _median_s(lambda: dst.copy_(src), 5, sync=sync)
    del src, dst
    host = torch.empty(nbytes // 4, dtype=torch.float32, pin_memory=True)
    dev = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    h2d = nbytes / _median_s(lambda: dev.copy_(host, non_blocking=True), 5, sync=sync)
    d2h = nbytes / _median_s(lambda: host.copy_(dev, non_blocking=True), 5, sync=sync)
    del host, dev
    flops = measure_gemm(shape, device, dtype, tokens=2048)
    props = torch.cuda.get_device_properties(device)
    torch.cuda.empty_cache()
    return {"kind": "cuda", "name": props.name, "memory_gib": props.total_memory / 2**30,
            "mem_bw_gbs": copy_bw / GB, "tflops": {str(dtype).removeprefix("torch."): flops / 1e12},
            "h2d_gbs": h2d / GB, "d2h_gbs": d2h / GB, "overlaps_host": True}


def weight_bytes(model) -> int:
    """Bytes a forward reads: every tensor the layers hold and the LM head (embedding rows are a gather)."""
    total = sum(t.numel() * t.element_size() for layer in model.layers for t in vars(layer).values()
                if isinstance(t, torch.Tensor))
    return total + model.lm_head.numel() * model.lm_head.element_size()


def time_engine_steps(engine, batches=DECODE_BATCHES) -> list[dict]:
    """Median seconds of decode-only steps at each batch size, and of one prefill chunk, through LLMEngine.step."""
    from neoserve.sampling_params import SamplingParams

    device = engine.runner.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    points = []
    for batch in batches:
        ids = [f"probe-{batch}-{i}" for i in range(batch)]
        for rid in ids:
            engine.add_request(rid, torch.randint(10, vocab - 10, (DECODE_PROMPT,), generator=gen).tolist(), params)
        while engine.scheduler.waiting or any(s.is_prefill for s in engine.scheduler.running):
            engine.step()
        engine.step()  # warm-up decode
        context = sum(s.num_tokens for s in engine.scheduler.running)
        times = []
        for _ in range(TIMED_STEPS):
            sync()
            t0 = time.perf_counter()
            engine.step()
            sync()
            times.append(time.perf_counter() - t0)
        points.append({"kind": "decode", "tokens": batch, "context": context + batch * (TIMED_STEPS // 2),
                       "seconds": statistics.median(times)})
        for rid in ids:
            engine.abort_request(rid)
    times = []
    for rep in range(3):
        engine.add_request(f"probe-prefill-{rep}", torch.randint(10, vocab - 10, (PREFILL_TOKENS,), generator=gen)
                           .tolist(), SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        sync()
        t0 = time.perf_counter()
        engine.step()
        sync()
        times.append(time.perf_counter() - t0)
        while engine.has_unfinished():
            engine.step()
    points.append({"kind": "prefill", "tokens": PREFILL_TOKENS, "context": 0, "seconds": statistics.median(times[1:])})
    return points


def fit_step_costs(points: list[dict], shape: ModelShape, weights: float, kv_bytes_per_token: int, mem_bw: float,
                   flops: float) -> dict:
    """What each measured step took beyond its roofline (weights and KV at mem_bw, FLOPs at `flops`): the curve
    `plan` interpolates by the step's tokens, and a least-squares line through it (fixed + per token, clipped at
    zero) for presets and for reading.

    NOTE: a curve, not the line alone: on a CPU the step's overhead is not linear in the batch (batch 1 runs
    GEMV kernels, larger batches GEMM kernels with packing), and the line misses the measured steps by 20-40%."""
    from gpu_worker.sim.host import DeviceCosts
    from gpu_worker.sim.roofline import Roofline

    dev = DeviceCosts(mem_bw=mem_bw, flops=flops, step_fixed_s=0.0, forward_fixed_s=0.0, per_token_s=0.0)
    roof = Roofline(shape=shape, device=dev, weight_bytes=weights, kv_bytes_per_token=kv_bytes_per_token,
                    cpu_kv_bytes_per_token=0, act_bytes=0, cpu_attn_bw=1.0, handoff_s=0.0, handoff_per_seq_s=0.0,
                    pcie=None, host_copy_bw=1.0, overlaps_host=False)

    def roofline_s(p: dict) -> float:
        if p["kind"] == "decode":
            return roof.forward_time(p["tokens"], p["context"], 0, p["tokens"])
        n = p["tokens"]
        return roof.forward_time(n, 0, n * (n + 1) // 2, 1)

    by_tokens: dict[int, list[float]] = {}
    for p in points:
        p["roofline_s"] = roofline_s(p)
        by_tokens.setdefault(p["tokens"], []).append(max(p["seconds"] - p["roofline_s"], 0.0))
    curve = [(t, statistics.fmean(v)) for t, v in sorted(by_tokens.items())]
    xs, ys = [t for t, _ in curve], [y for _, y in curve]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    per_token = max(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var, 0.0) if var else 0.0
    fixed = max(my - per_token * mx, 0.0)
    return {"step_fixed_ms": 1e3 * fixed, "per_token_us": 1e6 * per_token,
            "overhead_curve_ms": [[t, 1e3 * y] for t, y in curve]}


# --- the whole probe --------------------------------------------------------------------------------------------------
class Progress:
    """tqdm when installed (the bench extras), else one line per stage."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="probe", unit="stage", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def stage(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what)
        elif self.enabled:
            print(f"probe: {what} ...", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent.parent).stdout.strip() or None
    except OSError:
        return None


def _shape_without_weights(model: str | None) -> ModelShape:
    """The shape of `model` from its name or config.json; a GGUF file other than the embedded one has its shape
    inside the weights file, so its host measurements use Llama-3-8B's KV heads (the engine's shape is still its
    own)."""
    try:
        return resolve(model or "embedded")
    except (ModelLoadError, ValueError, KeyError, OSError):
        return resolve("llama-3-8b")


def probe(model: str | None, device: str, dtype: str, kv_dtype: str, spin_us: float, progress: bool) -> dict:
    from gpu_worker.config import EngineConfig
    from gpu_worker.engine import LLMEngine

    cores = len(os.sched_getaffinity(0))
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    alone, beside, sidecar_threads = worker_and_sidecar_threads(cores, on_gpu)
    bar = Progress(6 if on_gpu else 7, progress)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    try:
        # The model's shape first, without its weights: the sidecar and the kernel use its KV heads.
        bar.stage("model shape")
        engine = None
        shape = _shape_without_weights(model)
        bar.done()

        bar.stage("sidecar hand-off")
        handoff = measure_handoff(shape, sidecar_threads, kv_dtype, spin_us)
        bar.done()
        bar.stage("host read bandwidth")
        read_bw = measure_read_bw(sidecar_threads)
        bar.done()
        bar.stage("attention kernel bf16, fp32")
        attn = {name: measure_kernel_bw(shape, getattr(torch, name), sidecar_threads) / GB
                for name in ("bfloat16", "float32")}
        bar.done()

        bar.stage("engine load")
        engine = LLMEngine(EngineConfig(model=model, device=device, dtype=dtype, mode="gpu-only", threads=alone,
                                        gpu_kv_gib=1.0 if not on_gpu else None, max_num_seqs=max(DECODE_BATCHES),
                                        gpu_kv_tokens=None if not on_gpu else 65536))
        dev = engine.runner.device
        tdtype = engine.runner.dtype
        shape = ModelShape.from_model_config(engine.model_config)
        dtype_name = str(tdtype).removeprefix("torch.")
        weights = weight_bytes(engine.runner.model)
        kv_per_token = shape.kv_bytes_per_token(tdtype.itemsize)
        bar.done()

        result = {
            "name": f"{socket.gethostname()} ({_cpu_model()}, {cores} cores"
                    + (f", {torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ")"),
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit(),
            "cpu": {"model": _cpu_model(), "cores": cores, "sidecar_threads": sidecar_threads,
                    "read_bw_gbs": read_bw / GB, "attn_bw_gbs": attn, **handoff},
        }
        engine_section = {"model": shape.to_dict(), "model_spec": model or "embedded", "dtype": dtype_name,
                          "weight_bytes": weights}
        if dev.type == "cuda":
            bar.stage("device bandwidth, GEMM, PCIe")
            result["device"] = measure_cuda(dev, tdtype, shape)
            bar.done()
            bar.stage("engine steps")
            points = time_engine_steps(engine)
            d = result["device"]
            engine_section |= fit_step_costs(points, shape, weights, kv_per_token, d["mem_bw_gbs"] * GB,
                                             d["tflops"][dtype_name] * 1e12) | {"points": points}
            bar.done()
        else:
            result["device"] = {"kind": "cpu", "name": _cpu_model(), "overlaps_host": False}
            # NOTE: torch's intra-op thread count can change in a running process: one engine serves both settings.
            for role, threads in (("alone", alone), ("beside_sidecar", beside)):
                bar.stage(f"engine steps, {threads} threads")
                torch.set_num_threads(threads)
                bw = measure_read_bw(threads)
                flops = measure_gemm(shape, dev, tdtype)
                points = time_engine_steps(engine)
                engine_section[role] = {"threads": threads, "mem_bw_gbs": bw / GB, "gflops": flops / 1e9,
                                        "weight_bytes": weights,
                                        **fit_step_costs(points, shape, weights, kv_per_token, bw, flops),
                                        "points": points}
                bar.done()
        result["engine"] = engine_section
        result["probe_seconds"] = time.perf_counter() - t_start
        result["load_average"] = {"start": list(load_start), "end": list(os.getloadavg())}
        return result
    finally:
        bar.close()
        if engine is not None:
            engine.close()
            del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _overheads(section: dict) -> str:
    curve = ", ".join(f"{t} tok {ms:.1f} ms" for t, ms in section["overhead_curve_ms"])
    return f"{curve} (line: {section['step_fixed_ms']:.1f} ms + {section['per_token_us']:.0f} us/token)"


def summary(host: dict) -> str:
    c, d, e = host["cpu"], host["device"], host["engine"]
    lines = [f"host: {host['name']}",
             f"  host read bandwidth ({c['sidecar_threads']} sidecar threads): {c['read_bw_gbs']:.1f} GB/s",
             f"  attention kernel: bf16 KV {c['attn_bw_gbs']['bfloat16']:.1f} GB/s, "
             f"fp32 KV {c['attn_bw_gbs']['float32']:.1f} GB/s",
             f"  sidecar hand-off: {c['handoff_us']:.0f} us per call + {c['handoff_per_seq_us']:.1f} us per sequence "
             f"(round trips: " + ", ".join(f"{k} {v:.0f} us" for k, v in c["round_trip_us"].items()) + ")"]
    if d["kind"] == "cuda":
        dt = e["dtype"]
        lines += [f"  device: {d['name']}, {d['memory_gib']:.0f} GiB, copy bandwidth {d['mem_bw_gbs']:.0f} GB/s, "
                  f"GEMM {d['tflops'][dt]:.0f} TFLOP/s ({dt}), pinned H2D {d['h2d_gbs']:.1f} GB/s, "
                  f"D2H {d['d2h_gbs']:.1f} GB/s",
                  f"  engine step ({e['model']['name']}): beyond the roofline " + _overheads(e)]
    else:
        lines.append(f"  device: the CPU; engine {e['model']['name']} ({e['dtype']}, "
                     f"{e['weight_bytes'] / 1e6:.0f} MB of weights read per forward)")
        for role in ("alone", "beside_sidecar"):
            r = e[role]
            pts = ", ".join(f"{p['kind']} {p['tokens']} {1e3 * p['seconds']:.1f} ms" for p in r["points"])
            lines.append(f"  {role} ({r['threads']} threads): read {r['mem_bw_gbs']:.1f} GB/s, GEMM "
                         f"{r['gflops']:.0f} GFLOP/s; steps {pts}; beyond the roofline {_overheads(r)}")
    la = host["load_average"]
    lines.append(f"  took {host['probe_seconds']:.0f} s; load average {la['start'][0]:.2f} -> {la['end'][0]:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="neoserve probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="host.json", help="where to write the profile (default: host.json)")
    p.add_argument("--model", default=None, help="the model whose step to measure (default: embedded SmolLM2)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--cpu-kv-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                   help="the sidecar's KV dtype in the hand-off probe")
    p.add_argument("--ring-spin-us", type=float, default=None,
                   help="ring spin of the hand-off probe (default: as the launcher sets it: 3000 on dedicated "
                        "cores beside a GPU, else 50)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    spin = args.ring_spin_us if args.ring_spin_us is not None else \
        (3000.0 if on_gpu and len(os.sched_getaffinity(0)) >= 3 else 50.0)
    host = probe(args.model, args.device, args.dtype, args.cpu_kv_dtype, spin, not args.no_progress)
    Path(args.out).write_text(json.dumps(host, indent=1) + "\n")
    print(summary(host))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
