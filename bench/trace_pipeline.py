"""Trace of one pipelined engine step: device and sidecar busy intervals on one clock, and how much they overlap.

    python bench/trace_pipeline.py [--model embedded] [--device auto] [--out DIR]
    python bench/trace_pipeline.py --model random:llama-3-8b --device cuda --dtype bfloat16 --cpu-attn-threads 12

Starts an engine in cpu-all mode (every sequence decodes on the CPU after its prefill) and staggers arrivals, so a
step mixes a device prefill with CPU decodes; runs until a step uses the two-sub-batch pipeline, records that step with
gpu_worker.trace.StepTracer and writes `pipeline_trace.json` (Chrome/Perfetto trace events) and
`pipeline_trace.png` (a two-row timeline). Prints the step time, each track's busy time and their overlap, and where
the worker's launch thread spent its time inside the hand-offs (staging rows into the ring, waiting for the copy's
event, committing, waiting for the sidecar, copying results back). `--profile` also runs that step under
torch.profiler and writes the ops by self CPU time to `pipeline_profile.txt` (launch overhead, synchronisations).
On a 2-core CPU-only host the "device" is the CPU too, so the overlap shown is real concurrency between two
processes, not a speed claim.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import torch

from gpu_worker.config import EngineConfig
from gpu_worker.engine import LLMEngine
from gpu_worker.trace import StepTracer, chrome_trace, overlap_ns
from neoserve.sampling_params import SamplingParams


def _profiler(enabled: bool, device: torch.device):
    if not enabled:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the worker")
    parser.add_argument("--cpu-attn-threads", type=int, default=1, help="threads of the sidecar it spawns")
    parser.add_argument("--cpu-kv-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--ring-spin-us", type=float, default=50.0,
                        help="ring busy-wait before sleeping (3000 where worker and sidecar have cores of their own)")
    parser.add_argument("--num-seqs", type=int, default=12)
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="decode-only sub-batches replay each layer's dense halves from CUDA graphs")
    parser.add_argument("--profile", action="store_true", help="also profile the traced step with torch.profiler")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype, mode="cpu-all",
                                    threads=args.threads, cpu_kv_gib=1.0, cpu_attn_threads=args.cpu_attn_threads,
                                    cpu_kv_dtype=args.cpu_kv_dtype, ring_spin_us=args.ring_spin_us,
                                    cuda_graphs=args.cuda_graphs))
    try:
        vocab = engine.model_config.vocab_size
        g = torch.Generator().manual_seed(0)
        params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        # Half the sequences start now and move to the CPU after their prefill; the other half arrive later, so
        # the traced step mixes a device prefill (sub-batch A) with CPU decodes (A and B).
        for i in range(args.num_seqs):
            prompt = torch.randint(10, vocab - 10, (args.prompt_len,), generator=g).tolist()
            engine.add_request(f"r{i}", prompt, params)
            if i < args.num_seqs // 2:
                continue
            for _ in range(3):
                engine.step()
        spans = profile = None
        for _ in range(200):
            tracer = StepTracer(engine.runner.device)
            engine.runner.tracer = tracer
            engine.sidecar.trace = {}
            before = engine.num_pipelined_steps
            with _profiler(args.profile, engine.runner.device) as prof:
                engine.step()
            engine.runner.tracer = None
            if engine.num_pipelined_steps > before:
                spans = tracer.finish(engine.sidecar.trace)
                profile = prof
                break
        if spans is None:
            raise SystemExit("no pipelined step happened")
    finally:
        engine.close()

    t0 = min(s.start_ns for s in spans)
    t1 = max(s.end_ns for s in spans)
    busy = {t: sum(s.end_ns - s.start_ns for s in spans if s.track == t) for t in ("device", "sidecar")}
    both = overlap_ns(spans)
    print(f"pipelined step: {(t1 - t0) / 1e6:.2f} ms; device busy {busy['device'] / 1e6:.2f} ms, sidecar busy "
          f"{busy['sidecar'] / 1e6:.2f} ms, both busy at once {both / 1e6:.2f} ms "
          f"({100 * both / max(busy['sidecar'], 1):.0f}% of the sidecar's time hidden under device work)")
    step_ms = (t1 - t0) / 1e6
    handoff: dict[str, list[int]] = {}
    for sp in spans:
        if sp.track == "launch":
            handoff.setdefault(sp.name, []).append(sp.end_ns - sp.start_ns)
    total = sum(sum(v) for v in handoff.values()) / 1e6
    parts = ", ".join(f"{name} {sum(v) / 1e6:.2f} ms ({len(v)} x {sum(v) / len(v) / 1e3:.0f} us)"
                      for name, v in handoff.items())
    print(f"launch thread inside hand-offs: {total:.2f} ms ({100 * total / step_ms:.0f}% of the step): {parts}")
    if profile is not None:
        table = profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        (out_dir / "pipeline_profile.txt").write_text(table)
        print("\n".join(table.splitlines()[:25]))
        print(f"(full table: {out_dir / 'pipeline_profile.txt'})")
    (out_dir / "pipeline_trace.json").write_text(json.dumps(chrome_trace(spans)))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(14, 2.6))
        for row, track in enumerate(("sidecar", "device")):
            bars = [((s.start_ns - t0) / 1e6, (s.end_ns - s.start_ns) / 1e6) for s in spans if s.track == track]
            colors = ["tab:orange" if " A" in s.name or s.name.startswith("A") else "tab:blue"
                      for s in spans if s.track == track]
            ax.broken_barh(bars, (row * 10, 8), facecolors=colors, edgecolor="black", linewidth=0.3)
        ax.set_yticks([4, 14], ["sidecar (CPU attention)", "worker device"])
        ax.set_xlabel("ms since step start   (orange: sub-batch A, blue: sub-batch B)")
        ax.set_title("One pipelined step: CPU attention of one sub-batch overlaps device work of the other")
        fig.tight_layout()
        fig.savefig(out_dir / "pipeline_trace.png", dpi=120)
    except ImportError:
        pass
    print(f"wrote {out_dir / 'pipeline_trace.json'} and pipeline_trace.png")


if __name__ == "__main__":
    main()
