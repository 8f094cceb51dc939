"""Reporting of bench/serve.py results: mode-vs-baseline comparisons, markdown tables and the throughput-latency plot.

    python bench/plot.py bench/results/serve.json    # redraw serve.png and reprint the tables from a results file

The comparison the scheduling issue asks for is throughput at equal (or better) p50 per-token latency: for each rate
of the baseline (gpu-only), the most output-token throughput any point of the other mode reaches with a p50 TPOT no
higher than the baseline's at that rate, divided by the baseline's throughput there. The same-rate ratio is reported
beside it (at a rate both modes sustain it is ~1 by construction: both deliver what is offered).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

BASELINE = "gpu-only"
MODE_ORDER = ("gpu-only", "auto", "cpu-all")


def _mode_key(mode: str) -> tuple[int, str]:
    return (MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), mode)


def _rate_key(rate) -> float:
    return math.inf if rate == "inf" else float(rate)


def _fmt_rate(rate) -> str:
    return "inf" if rate == "inf" else f"{float(rate):g}"


def _tpot50(run: dict) -> float | None:
    return run["tpot_ms"]["p50"]


def comparisons(runs: list[dict], baseline: str = BASELINE) -> list[dict]:
    """One row per (other mode, rate present in both): throughput ratios and both p50 TPOTs."""
    by_mode: dict[str, dict] = {}
    for run in runs:
        by_mode.setdefault(run["mode"], {})[_rate_key(run["rate"])] = run
    base = by_mode.get(baseline)
    if not base:
        return []
    rows = []
    for mode, points in by_mode.items():
        if mode == baseline:
            continue
        for rate in sorted(set(points) & set(base)):
            b, m = base[rate], points[rate]
            b_thr, m_thr = b["output_token_throughput"], m["output_token_throughput"]
            b_lat, m_lat = _tpot50(b), _tpot50(m)
            at_equal = None
            if b_lat is not None and b_thr > 0:
                eligible = [p["output_token_throughput"] for p in points.values()
                            if _tpot50(p) is not None and _tpot50(p) <= b_lat and p["failed"] == 0]
                at_equal = max(eligible) / b_thr if eligible else 0.0
            rows.append({
                "mode": mode, "baseline": baseline, "rate": "inf" if math.isinf(rate) else rate,
                "baseline_output_token_throughput": b_thr, "output_token_throughput": m_thr,
                "throughput_ratio": m_thr / b_thr if b_thr > 0 else None,
                "baseline_tpot_p50_ms": b_lat, "tpot_p50_ms": m_lat,
                "latency_equal_or_better": (m_lat <= b_lat) if None not in (m_lat, b_lat) else None,
                "ratio_at_equal_latency": at_equal,
            })
    return rows


def _f(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def markdown_tables(results: dict) -> str:
    """The per-run table and, when gpu-only and another mode ran, the comparison table."""
    meta, cfg, model = results.get("meta", {}), results.get("config", {}), results.get("model", {})
    lines = [
        f"Model {model.get('model_id', '?')} on {model.get('device', '?')}; input {cfg.get('input_len')} / output "
        f"{cfg.get('output_len')} tokens (ignore_eos), {cfg.get('num_requests')} requests per rate, Poisson arrivals; "
        f"engine args `{' '.join(cfg.get('engine_args', [])) or '(defaults)'}`; {meta.get('date', '')}, commit "
        f"{(meta.get('commit') or '?')[:10]}{' (dirty)' if meta.get('dirty') else ''}.",
        "",
        "| mode | rate (req/s) | done | req/s | out tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p90 / p99 (ms) "
        "| GPU KV peak / mean | CPU KV peak / mean | CPU decodes | preempt. |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results.get("runs", []), key=lambda r: (_mode_key(r["mode"]), _rate_key(r["rate"]))):
        s = r["server"]
        done = f"{r['completed']}/{r['num_requests']}"
        lines.append(
            f"| {r['mode']} | {_fmt_rate(r['rate'])} | {done} | {_f(r['request_throughput'], 2)} "
            f"| {_f(r['output_token_throughput'])} | {_f(r['ttft_ms']['p50'])} / {_f(r['ttft_ms']['p99'])} "
            f"| {_f(r['tpot_ms']['p50'])} / {_f(r['tpot_ms']['p90'])} / {_f(r['tpot_ms']['p99'])} "
            f"| {_pct(s['gpu_kv_usage']['peak'])} / {_pct(s['gpu_kv_usage']['mean'])} "
            f"| {_pct(s['cpu_kv_usage']['peak'])} / {_pct(s['cpu_kv_usage']['mean'])} "
            f"| {_pct(s['cpu_decode_share'])}{'*' if s.get('cpu_decode_share_source') == 'sampled' else ''} "
            f"| {'-' if s['preemptions'] is None else s['preemptions']} |")
    rows = results.get("comparisons") or comparisons(results.get("runs", []))
    if rows:
        lines += [
            "",
            "| mode vs gpu-only | rate (req/s) | out tok/s gpu-only | out tok/s mode | ratio (same rate) "
            "| TPOT p50 gpu-only (ms) | TPOT p50 mode (ms) | ratio at <= gpu-only's p50 TPOT |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in rows:
            ok = {True: "", False: " (worse)", None: ""}[c["latency_equal_or_better"]]
            at_equal = c["ratio_at_equal_latency"]
            at_equal = "none as fast" if at_equal == 0.0 else f"{_f(at_equal, 2)}x"
            lines.append(
                f"| {c['mode']} | {_fmt_rate(c['rate'])} | {_f(c['baseline_output_token_throughput'])} "
                f"| {_f(c['output_token_throughput'])} | {_f(c['throughput_ratio'], 2)}x "
                f"| {_f(c['baseline_tpot_p50_ms'])} | {_f(c['tpot_p50_ms'])}{ok} "
                f"| {at_equal} |")
    if any(r["server"].get("cpu_decode_share_source") == "sampled" for r in results.get("runs", [])):
        lines += ["", "\\* sampled mean of sequences-on-CPU / running (the worker exports no decode counters)."]
    for mode, bound in results.get("latency_bounds_ms", {}).items():
        lines += ["", f"{mode}: auto with --latency-bound-ms {bound:.1f}."]
    for mode, err in results.get("mode_errors", {}).items():
        lines += ["", f"Mode {mode} failed: {err.splitlines()[0] if err else '?'}"]
    return "\n".join(lines)


def plot_curves(runs: list[dict], path: Path, title: str = "") -> str | None:
    """Output-token throughput vs p50 TPOT (left) and p50 TTFT (right), one curve per mode, points labelled with
    their rate. Returns the path written, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py: matplotlib is not installed; no plot", file=sys.stderr)
        return None
    if not any(r["completed"] for r in runs):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    modes = sorted({r["mode"] for r in runs}, key=_mode_key)
    for mode in modes:
        pts = sorted((r for r in runs if r["mode"] == mode and r["completed"]), key=lambda r: _rate_key(r["rate"]))
        xs = [r["output_token_throughput"] for r in pts]
        for ax, key in zip(axes, ("tpot_ms", "ttft_ms")):
            ys = [r[key]["p50"] if r[key]["p50"] is not None else math.nan for r in pts]
            ax.plot(xs, ys, marker="o", label=mode)
            for x, y, r in zip(xs, ys, pts):
                ax.annotate(_fmt_rate(r["rate"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for ax, ylabel in zip(axes, ("p50 per-token latency, TPOT (ms)", "p50 time to first token (ms)")):
        ax.set_xlabel("output-token throughput (tokens/s)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[1].set_yscale("log")
    if title:
        fig.suptitle(title + "  (point labels: offered rate, req/s)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python bench/plot.py RESULTS.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    results = json.loads(path.read_text())
    results["comparisons"] = comparisons(results["runs"])
    print(markdown_tables(results))
    out = plot_curves(results["runs"], path.with_suffix(".png"))
    if out:
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
