"""The benchmarks bench/gpu_check.sh runs on a GPU host, run small here: a broken script would cost that host's few
minutes, which no session can get back."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], timeout: float = 240) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], check=True, timeout=30)
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_prepare.sh")], check=True, timeout=30)


@pytest.mark.slow
def test_bench_handoff_splits_calls_for_every_spin_and_batch():
    out = _run(["bench/bench_handoff.py", "--shape", "smollm2", "--threads", "1", "--iters", "5", "--gap-us", "0",
                "--spin-us", "50,3000"])
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s+\d+\s+\d+ x", line)]
    assert [(r[0], r[1], r[3]) for r in rows] == [(s, b, n) for s in ("50", "3000")
                                                  for b, n in (("1", "16"), ("6", "200"), ("16", "1000"))]
    first_spin = {(r[1], r[3]): float(r[6]) for r in rows if r[0] == "50"}
    for r in rows:
        kernel, handler, round_trip, overhead, transport = (float(x) for x in r[4:9])
        assert 0 < kernel and 0 < handler < round_trip  # the sidecar's own span lies inside the client's
        # NOTE: the columns are printed to 0.1 us (ratios to 0.01), so derived ones agree to that rounding.
        assert overhead == pytest.approx(handler - kernel, abs=0.16), r
        assert transport == pytest.approx(round_trip - handler, abs=0.16), r
        # "vs first spin": the first spin's round trip of the same batch over this row's
        ratio = first_spin[r[1], r[3]] / round_trip
        assert float(r[9].removesuffix("x")) == pytest.approx(ratio, rel=0.03, abs=0.01), r


@pytest.mark.slow
def test_trace_pipeline_records_a_pipelined_step(tmp_path):
    out = _run(["bench/trace_pipeline.py", "--model", "random:smollm2-135m", "--num-seqs", "4", "--prompt-len", "32",
                "--cuda-graphs", "--profile", "--out", str(tmp_path)])
    m = re.search(r"pipelined step: ([\d.]+) ms; device busy ([\d.]+) ms, sidecar busy ([\d.]+) ms, both busy at "
                  r"once ([\d.]+) ms", out)
    assert m, out
    step, device, sidecar, both = (float(x) for x in m.groups())
    assert 0 < sidecar and 0 < device <= step and both <= min(device, sidecar)
    m = re.search(r"launch thread inside hand-offs: ([\d.]+) ms .*stage [\d.]+ ms \((\d+) x", out)
    assert m and 0 < float(m.group(1)) < step and int(m.group(2)) > 0, out
    assert "aten::" in (tmp_path / "pipeline_profile.txt").read_text()
    events = json.loads((tmp_path / "pipeline_trace.json").read_text())["traceEvents"]
    names = {e["name"] for e in events if e["ph"] == "X"}
    assert any(n.startswith("attn A") for n in names) and any(n.startswith("attn B") for n in names)


@pytest.mark.slow
def test_decode_step_benchmark_compares_graphs_with_eager():
    out = _run(["bench/bench_decode_step.py", "--model", "random:smollm2-135m", "--batches", "1,3", "--steps", "2",
                "--prompt-len", "16", "--threads", "1"])
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s+\d+\s+[\d.]+", line)]
    assert [r[0] for r in rows] == ["1", "3"], out
    for r in rows:
        eager, graphs = float(r[1]), float(r[2])
        assert eager > 0 and graphs > 0 and r[3] == f"{eager / graphs:.2f}x"
