"""Figures of a simulated run (the same definitions as bench/serve.py's), the highest rate that meets a latency
SLO, and the throughput-latency plot."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

from gpu_worker.sim.driver import SimResult

SLO_METRICS = ("tpot", "norm", "ttft")  # per-token latency, NEO's normalized latency, time to first token


def _percentiles(values: list[float], scale: float = 1e3) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "n": 0}
    v = sorted(x * scale for x in values)

    def pct(p: float) -> float:  # NOTE: linear interpolation, as numpy.percentile's default
        k = (len(v) - 1) * p / 100
        lo, hi = math.floor(k), math.ceil(k)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "mean": statistics.fmean(v), "n": len(v)}


def summarize(res: SimResult, rate: float | str, r_ratio: float | None = None) -> dict:
    """One run's figures. Latencies in ms (norm: ms per output token), throughputs per second of virtual time."""
    done = [r for r in res.requests if r.failed is None and r.last_token_s is not None and r.tokens >= r.output_len]
    ends = [r.last_token_s for r in res.requests if r.last_token_s is not None]
    span = (max(ends) - min(r.arrival_s for r in res.requests)) if ends else 0.0
    out_tokens = sum(r.tokens for r in res.requests)
    return {
        "mode": res.mode,
        "rate": rate,
        "num_requests": len(res.requests),
        "completed": len(done),
        "failed": sum(1 for r in res.requests if r.failed is not None),
        "duration_s": span,
        "request_throughput": len(done) / span if span > 0 else 0.0,
        "output_token_throughput": out_tokens / span if span > 0 else 0.0,
        "ttft_ms": _percentiles([r.first_token_s - r.arrival_s for r in done]),
        "tpot_ms": _percentiles([(r.last_token_s - r.first_token_s) / (r.tokens - 1) for r in done if r.tokens >= 2]),
        "norm_latency_ms": _percentiles([(r.last_token_s - r.arrival_s) / r.tokens for r in done]),
        "e2e_ms": _percentiles([r.last_token_s - r.arrival_s for r in done]),
        "gpu_kv_use": {"mean": res.gpu_kv_use_mean, "peak": res.gpu_kv_use_peak, "blocks": res.gpu_blocks},
        "cpu_kv_use": {"mean": res.cpu_kv_use_mean, "peak": res.cpu_kv_use_peak, "blocks": res.cpu_blocks},
        "cpu_decode_share": res.cpu_decodes / res.decodes if res.decodes else 0.0,
        "preemptions": res.preemptions,
        "swap_outs": res.swap_outs,
        "swap_ins": res.swap_ins,
        "steps": res.steps,
        "pipelined_steps": res.pipelined_steps,
        "R": r_ratio,
        "sim_wall_s": res.wall_s,
    }


def slo_value(summary: dict, metric: str, percentile: int) -> float | None:
    key = {"tpot": "tpot_ms", "norm": "norm_latency_ms", "ttft": "ttft_ms"}[metric]
    return summary[key][f"p{percentile}"]


def meets(summary: dict, metric: str, percentile: int, slo_ms: float) -> bool:
    """Every request completed and the metric's percentile is within the SLO."""
    v = slo_value(summary, metric, percentile)
    return summary["completed"] == summary["num_requests"] and v is not None and v <= slo_ms


def max_rate(run_at: Callable[[float], dict], metric: str, percentile: int, slo_ms: float, lo: float, hi: float,
             iterations: int = 7) -> tuple[float | None, dict | None]:
    """The highest rate in [lo, hi] whose run meets the SLO (bisection, assuming latency grows with the rate):
    (rate, its summary), or (None, None) when even `lo` misses it.

    NOTE: per-token latency alone does not see a growing queue (gpu-only keeps its batch and lets requests wait),
    so an SLO on tpot should be read beside TTFT; `norm` ((end - arrival) / tokens, NEO's) includes the wait."""
    s_lo = run_at(lo)
    if not meets(s_lo, metric, percentile, slo_ms):
        return None, None
    s_hi = run_at(hi)
    if meets(s_hi, metric, percentile, slo_ms):
        return hi, s_hi
    best, best_s = lo, s_lo
    for _ in range(iterations):
        mid = math.sqrt(lo * hi)  # NOTE: geometric: rates span orders of magnitude across hosts
        s = run_at(mid)
        if meets(s, metric, percentile, slo_ms):
            lo, best, best_s = mid, mid, s
        else:
            hi = mid
    return best, best_s


def table(runs: list[dict]) -> str:
    """Markdown table of the runs."""
    head = ("| mode | rate | out tok/s | TTFT p50 (ms) | TPOT p50 / p90 (ms) | norm. latency p50 (ms/tok) | "
            "GPU KV mean | CPU decodes | preempt. | R |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = [head]
    for r in runs:
        def f(x, spec=".1f"):
            return "-" if x is None else format(x, spec)
        rate = r["rate"] if isinstance(r["rate"], str) else f"{r['rate']:g}"
        rows.append(f"| {r['mode']} | {rate} | {f(r['output_token_throughput'])} | {f(r['ttft_ms']['p50'])} | "
                    f"{f(r['tpot_ms']['p50'])} / {f(r['tpot_ms']['p90'])} | {f(r['norm_latency_ms']['p50'])} | "
                    f"{r['gpu_kv_use']['mean']:.0%} | {r['cpu_decode_share']:.0%} | {r['preemptions']} | "
                    f"{f(r['R'], '.2f')} |")
    return "\n".join(rows)


def plot(runs: list[dict], path: str, title: str, slo: tuple[str, int, float] | None = None) -> str | None:
    """Output tokens/s against p50 per-token and normalized latency, one curve per mode. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "tpot_ms", "p50 per-token latency (ms)"),
                           (axes[1], "norm_latency_ms", "p50 normalized latency (ms/token)")):
        for mode in dict.fromkeys(r["mode"] for r in runs):
            pts = sorted((r["output_token_throughput"], r[key]["p50"]) for r in runs
                         if r["mode"] == mode and r[key]["p50"] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        if slo is not None and {"tpot": "tpot_ms", "norm": "norm_latency_ms"}.get(slo[0]) == key:
            ax.axhline(slo[2], color="grey", linestyle="--", label=f"SLO p{slo[1]} {slo[2]:g} ms")
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
