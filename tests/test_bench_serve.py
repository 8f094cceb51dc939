"""bench/serve.py: its arithmetic against hand-computed figures, and a tiny real run of the whole harness.

The smoke run starts the real server (embedded SmolLM2 on the CPU) through the launcher, drives it with Poisson
arrivals and checks what a benchmark must get right whatever the speed: every request completed, each reply has
exactly the requested number of tokens (ignore_eos), the JSON carries every figure, the plot is a PNG, and the
shutdown left no process and no /dev/shm segment behind. Nothing here is timed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import plot as bench_plot
from bench import serve as bench_serve
from neoserve.errors import ValidationError

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------- workload and math

def test_length_distributions_parse_and_sample_within_bounds():
    rng = np.random.default_rng(1)
    fixed = bench_serve.LengthDist.parse("7", "input_len")
    assert fixed.sample(rng, 5).tolist() == [7] * 5
    uni = bench_serve.LengthDist.parse("uniform:3:6", "input_len").sample(rng, 2000)
    assert set(uni.tolist()) == {3, 4, 5, 6}  # inclusive at both ends
    normal = bench_serve.LengthDist.parse("normal:100:10", "output_len").sample(rng, 20000)
    assert normal.min() >= 1 and normal.max() <= 140
    assert abs(normal.mean() - 100) < 0.5 and abs(normal.std() - 10) < 0.5
    for bad in ("0", "uniform:5:3", "normal:10:-1", "poisson:3", "x", "uniform:1"):
        with pytest.raises(ValidationError):
            bench_serve.LengthDist.parse(bad, "input_len")


def test_poisson_offsets_have_the_requested_rate():
    rng = np.random.default_rng(2)
    offsets = bench_serve.poisson_offsets(20000, 4.0, rng)
    gaps = np.diff(np.concatenate([[0.0], offsets]))
    assert np.all(gaps >= 0)
    assert abs(gaps.mean() - 0.25) < 0.01  # exponential gaps of mean 1/rate
    assert abs(gaps.std() - 0.25) < 0.01  # ... whose std equals the mean
    assert bench_serve.poisson_offsets(5, math.inf, rng).tolist() == [0.0] * 5


def test_synthetic_requests_fit_the_context_and_the_vocabulary():
    cfg = bench_serve.BenchConfig(modes=["gpu-only"], rates=[1.0],
                                  input_len=bench_serve.LengthDist.parse("uniform:50:90", "input_len"),
                                  output_len=bench_serve.LengthDist.parse("40", "output_len"))
    specs = bench_serve.synthetic_requests(50, cfg, np.random.default_rng(3), vocab_size=1000, max_model_len=100)
    for s in specs:
        assert s.output_len == 40
        assert len(s.prompt_token_ids) + s.output_len <= 100
        assert all(256 <= t < 1000 for t in s.prompt_token_ids)
        req = s.to_proto(temperature=0.0, request_id="x")
        assert req.sampling.ignore_eos and req.sampling.max_tokens == 40
        assert list(req.prompt_token_ids.ids) == s.prompt_token_ids


def test_config_rejects_what_it_cannot_run():
    with pytest.raises(ValidationError):
        bench_serve.BenchConfig(modes=["gpu-only", "gpu-only"], rates=[1.0])
    with pytest.raises(ValidationError):
        bench_serve.BenchConfig(modes=["fast"], rates=[1.0])
    with pytest.raises(ValidationError):
        bench_serve.BenchConfig(modes=["auto"], rates=[1.0], engine_args=["--mode", "cpu-all"])
    with pytest.raises(ValidationError):
        bench_serve.BenchConfig(modes=["auto"], rates=[1.0], address="10.0.0.1:50051")  # loopback only
    with pytest.raises(ValidationError):
        bench_serve.parse_rate("0")
    for modes in (["auto@baseline"], ["auto@baseline", "gpu-only"], ["gpu-only@5"], ["gpu-only", "auto@-1"],
                  ["gpu-only", "auto@fast"]):
        with pytest.raises(ValidationError):
            bench_serve.BenchConfig(modes=modes, rates=[1.0])
    bench_serve.BenchConfig(modes=["gpu-only", "auto", "auto@baseline", "auto@25"], rates=[1.0])


def test_latency_bound_of_a_mode_spec():
    runs = [_run("gpu-only", 1.0, 100.0, 20.0), _run("gpu-only", 2.0, 150.0, 31.5), _run("auto", 2.0, 200.0, 50.0)]
    assert bench_serve.latency_bound_ms("auto", runs) is None
    assert bench_serve.latency_bound_ms("auto@12.5", runs) == 12.5
    assert bench_serve.latency_bound_ms("auto@baseline", runs) == 31.5
    with pytest.raises(ValueError, match="no per-token latency"):
        bench_serve.latency_bound_ms("auto@baseline", runs[2:])
    server = bench_serve.ServerProcess("auto@baseline", bench_serve.BenchConfig(modes=["auto"], rates=[1.0]),
                                       Path("/dev/null"), ready_timeout_s=10, latency_bound_ms=31.5)
    argv = server.argv()
    assert argv[argv.index("--mode") + 1] == "auto"
    assert argv[argv.index("--latency-bound-ms") + 1] == "31.500"


def _record(i, send, token_times, *, n_req, prompt=10, error=None):
    r = bench_serve.RequestRecord(i, n_req, scheduled_s=send, send_s=send, token_times_s=list(token_times),
                                  num_tokens_received=len(token_times), prompt_tokens=prompt)
    if error is None:
        r.finish_reason, r.completion_tokens, r.done_s = "length", len(token_times), token_times[-1]
    else:
        r.error, r.done_s = error, token_times[-1] if token_times else send
    return r


def test_summarize_rate_matches_hand_computed_figures():
    records = [
        _record(0, 0.0, [0.5, 0.6, 0.7, 0.8], n_req=4),  # TTFT 0.5, TPOT 0.1
        _record(1, 1.0, [1.2, 1.5, 1.8], n_req=3),  # TTFT 0.2, TPOT 0.3
        _record(2, 2.0, [2.1, 2.3], n_req=8, error="DEADLINE_EXCEEDED"),  # cut by the time limit: 2 tokens count
    ]
    s = bench_serve.summarize_rate("gpu-only", 2.0, records, bench_serve.summarize_stats([]))
    assert (s["completed"], s["cut_by_time_limit"], s["failed"], s["length_mismatches"]) == (2, 1, 0, 0)
    assert s["duration_s"] == pytest.approx(2.3)  # first send 0.0 -> last token 2.3
    assert s["request_throughput"] == pytest.approx(2 / 2.3)
    assert s["output_token_throughput"] == pytest.approx(9 / 2.3)
    assert s["total_token_throughput"] == pytest.approx((9 + 30) / 2.3)
    assert s["ttft_ms"]["p50"] == pytest.approx(350.0) and s["ttft_ms"]["n"] == 2
    assert s["tpot_ms"]["mean"] == pytest.approx(200.0)
    assert s["itl_ms"]["n"] == 5 and s["itl_ms"]["p50"] == pytest.approx(100.0)
    bad = bench_serve.summarize_rate("gpu-only", 1.0, [_record(0, 0.0, [0.1], n_req=1, error="INTERNAL")],
                                     bench_serve.summarize_stats([]))
    assert bad["failed"] == 1 and bad["errors"] == {"INTERNAL": 1}


def test_summarize_stats_peaks_means_and_cpu_share():
    samples = [
        {"num_running": 4, "num_waiting": 0, "num_cpu_sequences": 1, "gpu_kv_blocks_used": 5,
         "gpu_kv_blocks_total": 10, "cpu_kv_bytes_used": 0, "cpu_kv_bytes_total": 100, "num_preemptions": 2},
        {"num_running": 4, "num_waiting": 2, "num_cpu_sequences": 3, "gpu_kv_blocks_used": 10,
         "gpu_kv_blocks_total": 10, "cpu_kv_bytes_used": 50, "cpu_kv_bytes_total": 100, "num_preemptions": 5},
        {"num_running": 0, "num_waiting": 0, "num_cpu_sequences": 0, "gpu_kv_blocks_used": 0,
         "gpu_kv_blocks_total": 10, "cpu_kv_bytes_used": 0, "cpu_kv_bytes_total": 100, "num_preemptions": 5},
    ]
    s = bench_serve.summarize_stats(samples)
    assert s["gpu_kv_usage"] == {"peak": 1.0, "mean": pytest.approx(0.5)}
    assert s["cpu_kv_usage"] == {"peak": 0.5, "mean": pytest.approx(1 / 6)}
    assert s["preemptions"] == 3
    assert s["cpu_decode_share"] == pytest.approx(4 / 8) and s["cpu_decode_share_source"] == "sampled"
    counted = [dict(x, num_cpu_decodes=c, num_gpu_decodes=g) for x, c, g in zip(samples, (0, 30, 30), (0, 10, 90))]
    s = bench_serve.summarize_stats(counted)
    assert s["cpu_decode_share"] == pytest.approx(30 / 120) and s["cpu_decode_share_source"] == "counters"
    counted = [dict(x, num_cpu_decodes=c, num_decodes=a) for x, c, a in zip(samples, (5, 30, 45), (10, 60, 110))]
    s = bench_serve.summarize_stats(counted)
    assert s["cpu_decode_share"] == pytest.approx(40 / 100) and s["counters"]["num_decodes"] == 100
    prom = "# HELP x\nneoserve_requests_running 3.0\nneoserve_cpu_decodes_total 7.0\nneoserve_decodes_total 9.0\n"
    assert bench_serve._parse_prometheus(prom, bench_serve.StatsSampler._PROM_NAMES) == {
        "num_running": 3.0, "num_cpu_decodes": 7.0, "num_decodes": 9.0}


def _run(mode, rate, thr, tpot50, failed=0):
    return {"mode": mode, "rate": rate, "output_token_throughput": thr, "tpot_ms": {"p50": tpot50},
            "failed": failed}


def test_comparison_at_equal_latency():
    runs = [_run("gpu-only", 1.0, 100.0, 20.0), _run("gpu-only", 2.0, 150.0, 30.0),
            _run("auto", 1.0, 100.0, 18.0), _run("auto", 2.0, 200.0, 25.0), _run("auto", 4.0, 300.0, 40.0)]
    rows = {r["rate"]: r for r in bench_plot.comparisons(runs)}
    assert set(rows) == {1.0, 2.0}
    assert rows[1.0]["throughput_ratio"] == pytest.approx(1.0)
    assert rows[1.0]["ratio_at_equal_latency"] == pytest.approx(1.0)  # only auto@1 is as fast as 20 ms
    assert rows[2.0]["throughput_ratio"] == pytest.approx(200 / 150)
    assert rows[2.0]["ratio_at_equal_latency"] == pytest.approx(200 / 150)  # auto@4 (40 ms) is too slow
    assert rows[2.0]["latency_equal_or_better"] is True
    table = bench_plot.markdown_tables({"runs": [], "comparisons": list(rows.values())})
    assert "| auto | 2 | 150.0 | 200.0 | 1.33x | 30.0 | 25.0 | 1.33x |" in table


# ------------------------------------------------------------------------------------------------ a real run

def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
def test_smoke_run_on_the_embedded_model(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "bench" / "serve.py"), "--modes", "gpu-only", "--rates", "3",
           "--num-requests", "6", "--input-len", "uniform:8:24", "--output-len", "uniform:4:8", "--warmup", "1",
           "--engine-args", "--max-num-seqs 8 --gpu-kv-tokens 2048", "--budget-s", "240", "--no-progress",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((out / "serve.json").read_text())
    for key in ("meta", "config", "model", "runs", "requests", "shutdown", "comparisons", "timing"):
        assert key in results
    assert results["mode_errors"] == {} and results["skipped"] == []
    assert results["model"]["device"] == "cpu"
    (run,) = results["runs"]
    assert (run["mode"], run["rate"], run["num_requests"]) == ("gpu-only", 3.0, 6)
    assert (run["completed"], run["failed"], run["cut_by_time_limit"], run["length_mismatches"]) == (6, 0, 0, 0)
    for key in ("request_throughput", "output_token_throughput", "total_token_throughput"):
        assert run[key] > 0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        stats = run[key]
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
    assert run["ttft_ms"]["n"] == 6 and run["tpot_ms"]["n"] == 6
    server = run["server"]
    assert server["source"] == "worker-stats" and server["num_samples"] > 0
    assert 0 < server["gpu_kv_usage"]["peak"] <= 1 and server["running"]["peak"] >= 1
    assert server["preemptions"] == 0 and server["cpu_decode_share"] == 0.0  # gpu-only: nothing on the CPU

    (reqs,) = results["requests"]
    records = reqs["records"]
    assert len(records) == 6
    for r in records:
        assert r["error"] is None and r["finish_reason"] == "length"
        assert 4 <= r["requested_output_len"] <= 8 and 8 <= r["prompt_tokens"] <= 24
        assert r["completion_tokens"] == r["num_tokens_received"] == r["requested_output_len"]
        assert r["ttft_s"] > 0 and r["tpot_s"] > 0
    # The same figures, recomputed from the per-request records.
    assert run["output_tokens"] == sum(r["completion_tokens"] for r in records)
    assert run["prompt_tokens"] == sum(r["prompt_tokens"] for r in records)
    assert run["ttft_ms"]["p50"] == pytest.approx(1e3 * float(np.median([r["ttft_s"] for r in records])))

    png = (out / "serve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (out / "serve.md").read_text()
    assert "| gpu-only | 3 | 6/6 |" in table
    assert "| gpu-only | 3 | 6/6 |" in proc.stdout  # the table is printed for pasting too

    report = results["shutdown"]["gpu-only"]
    assert report["exit_code"] == 0
    assert report["escalated"] == [] and report["orphans_killed"] == [] and report["shm_removed"] == []
    pids = report["pids"]
    assert set(pids) == {"launcher", "sidecar", "worker", "gateway"}
    assert not any(_alive(p) for p in pids.values())
    shm = [e.name for e in Path("/dev/shm").iterdir() if e.name.startswith("neoserve-")]
    assert not [n for n in shm if n.split("-")[1] in {str(p) for p in pids.values()}]
