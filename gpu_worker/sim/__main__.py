"""`python -m gpu_worker.sim` (`neoserve plan`): predicts gpu-only, auto and cpu-all serving for a model, a host
profile and a workload, before anyone deploys it.

    python -m gpu_worker.probe --out host.json                    # measure this host first
    python -m gpu_worker.sim --host host.json --rates 1,2,4 --input-len uniform:64:192 --output-len uniform:16:32 \\
        --gpu-kv-tokens 512 --max-num-seqs 16
    python -m gpu_worker.sim --host a10g --model llama-3-8b --rates 0.5,1,2 --input-len normal:1000:100 \\
        --output-len uniform:50:400 --slo-ms 150 --slo-metric norm

Prints a table per mode and rate (throughput, TTFT, per-token and normalized latency percentiles, KV use, CPU decode
share, preemptions, R = host attention bandwidth x time to read the weights once / device KV bytes), the highest
rate each mode sustains under --slo-ms, and writes plan.json, plan.md and plan.png to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from gpu_worker.scheduler import MODES
from gpu_worker.sim import report, workload
from gpu_worker.sim.driver import SimConfig, cpu_kv_blocks, gpu_kv_blocks, simulate
from gpu_worker.sim.host import HostProfile
from gpu_worker.sim.model_shape import DTYPE_BYTES, ModelShape, resolve
from gpu_worker.sim.roofline import Roofline, build
from neoserve.errors import ModelLoadError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neoserve plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="host.json", help="host profile (probe's host.json) or a preset name "
                                                       "(t4, a10g, l4, a100-80g, h100, h200)")
    p.add_argument("--model", default=None, help="llama-3-8b, llama-2-7b, smollm2-135m, embedded or a config.json "
                                                 "(default: the model the probe measured)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPE_BYTES),
                   help="weights/activations/device KV (default: the probe's on a CPU device, else bfloat16)")
    p.add_argument("--modes", default="gpu-only,auto,cpu-all")
    p.add_argument("--rates", default="1,2,4", help="comma-separated request rates (req/s); 'inf' = all at once")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--input-len", default="128", type=workload.check_length_spec,
                   help="N, uniform:LO:HI or normal:MEAN:STD")
    p.add_argument("--output-len", default="64", type=workload.check_length_spec)
    p.add_argument("--trace", default=None, help="JSONL trace (arrival_s, input_len, output_len) instead of rates")
    p.add_argument("--seed", type=int, default=0)
    eng = p.add_argument_group("engine flags (as `neoserve serve`)")
    eng.add_argument("--max-num-seqs", type=int, default=256)
    eng.add_argument("--max-num-batched-tokens", type=int, default=2048)
    eng.add_argument("--max-model-len", type=int, default=8192)
    eng.add_argument("--block-size", type=int, default=16)
    eng.add_argument("--gpu-kv-tokens", type=int, default=None)
    eng.add_argument("--gpu-kv-gib", type=float, default=None)
    eng.add_argument("--cpu-kv-gib", type=float, default=4.0)
    eng.add_argument("--cpu-kv-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    eng.add_argument("--latency-bound-ms", type=float, default=None)
    eng.add_argument("--max-cpu-wait-steps", type=int, default=4)
    slo = p.add_argument_group("latency SLO: the highest rate each mode sustains")
    slo.add_argument("--slo-ms", type=float, default=None, help="the bound (ms, per token for tpot and norm)")
    slo.add_argument("--slo-metric", default="norm", choices=report.SLO_METRICS)
    slo.add_argument("--slo-percentile", type=int, default=50, choices=(50, 90, 99))
    slo.add_argument("--slo-requests", type=int, default=300, help="fewest requests per search run")
    slo.add_argument("--slo-window-s", type=float, default=30.0,
                     help="each search run sends for at least this long (more requests at higher rates)")
    slo.add_argument("--slo-rate-range", default=None, help="LO:HI req/s to search (default: around --rates)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a host figure, e.g. engine.step_fixed_ms=2 or cpu.handoff_us=20")
    p.add_argument("--out", default=None, help="folder for plan.json, plan.md, plan.png (default: none written)")
    p.add_argument("--json", action="store_true", help="print the JSON result instead of the tables")
    return p


def _rates(text: str) -> list[float]:
    return [math.inf if x.strip() == "inf" else float(x) for x in text.split(",") if x.strip()]


class Planner:
    """One host, model and engine configuration; runs a workload in a mode."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.host = HostProfile.load(args.host)
        for item in args.set:
            key, _, value = item.partition("=")
            self.host.set(key, value)
        if args.model is not None:
            self.shape = resolve(args.model)
        elif self.host.engine_model():
            self.shape = ModelShape.from_dict(self.host.engine_model())
        else:
            raise ValueError(f"--model is needed: {self.host.origin} names no measured model")
        on_cpu = self.host.device_kind == "cpu"
        self.dtype = args.dtype or (self.host.engine_dtype() if on_cpu else None) or "bfloat16"
        if on_cpu and args.model is not None and self.host.engine_model() and \
                self.shape != ModelShape.from_dict(self.host.engine_model()):
            print(f"plan: warning: {self.host.origin} measured the engine with {self.host.engine_model()['name']}, "
                  f"not {self.shape.name}: its step costs are for that model", file=sys.stderr)

    def config(self, mode: str) -> SimConfig:
        a = self.args
        return SimConfig(mode=mode, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                         max_model_len=a.max_model_len, block_size=a.block_size, gpu_kv_tokens=a.gpu_kv_tokens,
                         gpu_kv_gib=a.gpu_kv_gib, cpu_kv_gib=a.cpu_kv_gib, cpu_kv_dtype=a.cpu_kv_dtype,
                         latency_bound_ms=a.latency_bound_ms, max_cpu_wait_steps=a.max_cpu_wait_steps)

    def roofline(self, mode: str) -> Roofline:
        return build(self.shape, self.host, mode, self.dtype, self.args.cpu_kv_dtype)

    def r_ratio(self, mode: str) -> float:
        """R = BW_cpu * T_w / K: KV bytes the host's attention reads while the device reads its weights once, over
        the device's KV bytes. Above ~1 the host can attend to as much KV as the device holds within a step."""
        rl = self.roofline(mode)
        blocks = gpu_kv_blocks(self.config(mode), rl, self.host.device_kind, self.host.device_memory_bytes)
        return rl.cpu_attn_bw * rl.weights_read_time() / (blocks * self.args.block_size * rl.kv_bytes_per_token)

    def run(self, mode: str, requests: list[workload.Request], rate) -> dict:
        cfg, rl = self.config(mode), self.roofline(mode)
        res = simulate(requests, cfg, rl, gpu_kv_blocks(cfg, rl, self.host.device_kind, self.host.device_memory_bytes),
                       cpu_kv_blocks(cfg, rl))
        return report.summarize(res, "inf" if rate == math.inf else rate, self.r_ratio(mode))

    def poisson(self, rate: float, n: int) -> list[workload.Request]:
        a = self.args
        return workload.poisson(rate, n, a.input_len, a.output_len, a.seed, a.max_model_len)


def _progress(done: int, total: int, what: str) -> None:
    if sys.stderr.isatty():
        width = 30
        fill = int(width * done / max(total, 1))
        print(f"\rplan [{'#' * fill}{'.' * (width - fill)}] {done}/{total} {what:40.40}", end="", file=sys.stderr,
              flush=True)
        if done == total:
            print(file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            print(f"plan: unknown mode {m!r} (one of {', '.join(MODES)})", file=sys.stderr)
            return 2
    try:
        planner = Planner(args)
    except (ModelLoadError, ValueError, KeyError, OSError) as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    rates = ["trace"] if args.trace else _rates(args.rates)
    trace = workload.load_trace(args.trace) if args.trace else None
    runs, total = [], len(modes) * len(rates)
    for mode in modes:
        for rate in rates:
            _progress(len(runs), total, f"{mode} at {rate}")
            reqs = trace if trace is not None else planner.poisson(rate, args.num_requests)
            runs.append(planner.run(mode, reqs, rate))
    _progress(total, total, "done")

    slo = {}
    if args.slo_ms is not None:
        finite = [r for r in rates if r not in ("trace", math.inf)] or [1.0]
        lo, hi = (float(x) for x in args.slo_rate_range.split(":")) if args.slo_rate_range else \
            (min(finite) / 8, max(finite) * 8)
        for i, mode in enumerate(modes):
            _progress(i, len(modes), f"SLO search: {mode}")
            # NOTE: a fixed request count at a high rate is a short burst the queue absorbs and drains: latency
            # would pass an SLO the rate cannot sustain. Sending for a fixed window makes the queue show.
            rate, summary = report.max_rate(lambda r, m=mode: planner.run(
                m, planner.poisson(r, max(args.slo_requests, math.ceil(r * args.slo_window_s))), r),
                                             args.slo_metric, args.slo_percentile, args.slo_ms, lo, hi)
            slo[mode] = {"max_rate": rate, "output_token_throughput":
                         summary["output_token_throughput"] if summary else None}
        _progress(len(modes), len(modes), "done")
        base = slo.get("gpu-only", {}).get("output_token_throughput")
        for mode, v in slo.items():
            v["vs_gpu_only"] = (v["output_token_throughput"] / base
                                if base and v["output_token_throughput"] is not None else None)

    result = {
        "host": planner.host.name, "host_file": planner.host.origin, "model": planner.shape.to_dict(),
        "dtype": planner.dtype, "engine": vars(planner.config(modes[0])) | {"mode": None},
        "workload": {"trace": args.trace} if args.trace else {
            "rates": ["inf" if r == math.inf else r for r in rates], "num_requests": args.num_requests,
            "input_len": args.input_len, "output_len": args.output_len, "seed": args.seed},
        "runs": runs,
        "slo": {"metric": args.slo_metric, "percentile": args.slo_percentile, "ms": args.slo_ms,
                "per_mode": slo} if args.slo_ms is not None else None,
    }
    md = report.table(runs)
    if slo:
        md += (f"\n\nHighest rate under {args.slo_metric} p{args.slo_percentile} <= {args.slo_ms:g} ms "
               f"(each try sends for >= {args.slo_window_s:g} s, >= {args.slo_requests} requests):\n\n| mode | max rate (req/s) | out tok/s | vs gpu-only |\n"
               "|---|---:|---:|---:|\n")
        for mode, v in slo.items():
            fmt = (lambda x, s: "-" if x is None else format(x, s))
            md += (f"| {mode} | {fmt(v['max_rate'], '.3g')} | {fmt(v['output_token_throughput'], '.1f')} | "
                   f"{fmt(v['vs_gpu_only'], '.2f')} |\n")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.json").write_text(json.dumps(result, indent=1))
        (out / "plan.md").write_text(md + "\n")
        title = f"{planner.shape.name} on {planner.host.name} ({planner.dtype}), plan (simulated)"
        png = report.plot(runs, str(out / "plan.png"), title,
                          (args.slo_metric, args.slo_percentile, args.slo_ms) if args.slo_ms else None)
        if png is None:
            print("plan: matplotlib is not installed (pip install -e .[bench]): no plot", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"# {planner.shape.name} ({planner.dtype}) on {planner.host.name} [{planner.host.origin}]")
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
