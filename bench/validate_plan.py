"""Does `plan` predict what bench/serve.py measured? Replays each measured run's workload through the simulator.

    python -m gpu_worker.probe --out bench/results/host.json
    python bench/serve.py --modes gpu-only,cpu-all --rates 1,2,4 --num-requests 24 --input-len uniform:64:192 \\
        --output-len uniform:16:32 --engine-args "--gpu-kv-tokens 512 --max-num-seqs 16"
    python bench/validate_plan.py bench/results/serve.json --host bench/results/host.json

For every (mode, rate) run in serve.json, the requests it sent (planned send time, prompt tokens, output tokens) become
a trace that `python -m gpu_worker.sim` simulates in the same mode with the engine flags the server ran with (those
plan knows), on the host profile given. Prints measured against predicted output-token throughput and p50 per-token
latency, each prediction's error, and whether it is within --tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gpu_worker.sim import __main__ as plan  # noqa: E402

# Engine flags plan takes under the same names (everything else of --engine-args does not change a step's cost).
PASSED_FLAGS = ("--max-num-seqs", "--max-num-batched-tokens", "--max-model-len", "--block-size", "--gpu-kv-tokens",
                "--gpu-kv-gib", "--cpu-kv-gib", "--cpu-kv-dtype", "--latency-bound-ms", "--max-cpu-wait-steps",
                "--dtype")


def plan_flags(engine_args: list[str]) -> list[str]:
    out = []
    for i, arg in enumerate(engine_args):
        name, eq, value = arg.partition("=")
        if name in PASSED_FLAGS:
            out += [name, value] if eq else [name, engine_args[i + 1]]
    return out


def predict(serve: dict, host: str, mode: str, rate, tmp: Path) -> dict:
    records = next(r["records"] for r in serve["requests"] if r["mode"] == mode and r["rate"] == rate)
    trace = tmp / f"{mode}-{rate}.jsonl"
    trace.write_text("".join(json.dumps({"arrival_s": r["scheduled_s"], "input_len": r["prompt_tokens"],
                                         "output_len": r["requested_output_len"]}) + "\n" for r in records))
    out = tmp / f"{mode}-{rate}"
    argv = ["--host", host, "--modes", mode.partition("@")[0], "--trace", str(trace), "--out", str(out),
            *plan_flags(serve["config"]["engine_args"])]
    if "@" in mode:
        argv += ["--latency-bound-ms", mode.partition("@")[2]]
    if plan.main(argv) != 0:
        raise RuntimeError(f"plan failed for {mode} at {rate}")
    return json.loads((out / "plan.json").read_text())["runs"][0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("serve_json")
    p.add_argument("--host", required=True, help="the probe's host.json (or a preset)")
    p.add_argument("--tolerance", type=float, default=0.2)
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = p.parse_args(argv)
    serve = json.loads(Path(args.serve_json).read_text())
    rows = ["| mode | rate | measured out tok/s | predicted | error | measured TPOT p50 (ms) | predicted | error |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for run in serve["runs"]:
            mode, rate = run["mode"], run["rate"]
            pred = predict(serve, args.host, mode, rate, Path(tmp))
            m_tput, p_tput = run["output_token_throughput"], pred["output_token_throughput"]
            m_tpot, p_tpot = run["tpot_ms"]["p50"], pred["tpot_ms"]["p50"]
            e_tput = p_tput / m_tput - 1 if m_tput else float("nan")
            e_tpot = p_tpot / m_tpot - 1 if m_tpot and p_tpot else float("nan")
            worst = max(worst, abs(e_tput), abs(e_tpot))
            rows.append(f"| {mode} | {rate} | {m_tput:.1f} | {p_tput:.1f} | {e_tput:+.0%} | {m_tpot:.1f} | "
                        f"{p_tpot:.1f} | {e_tpot:+.0%} |")
    table = "\n".join(rows)
    print(table)
    verdict = "within" if worst <= args.tolerance else "NOT within"
    print(f"\nlargest error {worst:.0%}: {verdict} {args.tolerance:.0%}")
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
