"""Decode step time with the layers' CUDA graphs against the same step run eagerly, in one run.

    python bench/bench_decode_step.py                       # embedded SmolLM2 on this machine's device
    python bench/bench_decode_step.py --model random:llama-3-8b --device cuda --dtype bfloat16 --batches 1,8,32

For each batch size B: an engine (gpu-only) gets B requests of --prompt-len random tokens, runs until every one is
decoding, then times --steps decode steps (median), and aborts them. Once with `--no-cuda-graphs` (the baseline) and
once with `--cuda-graphs` (each layer's projections and MLP replayed from a graph; attention eager), same weights
(seeded), same prompts. Prints ms per step, the ratio, and the weight bytes a step reads per second against the device's
measured copy bandwidth (a decode step of a small batch must read every weight once: that is its hardware limit).
On the CPU the graphs are not captured (the same buffers run eagerly), so the ratio there is ~1 by construction.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gpu_worker.config import EngineConfig  # noqa: E402
from gpu_worker.engine import LLMEngine  # noqa: E402
from neoserve.sampling_params import SamplingParams  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted once each, as `weights read` is)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / min(times)


def step_ms(args, graphs: bool) -> tuple[dict[int, float], int]:
    """Median ms of a decode-only step per batch size (one engine, batches one after another), and the weight bytes
    the model holds."""
    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype, mode="gpu-only",
                                    threads=args.threads, gpu_kv_gib=args.kv_gib, cuda_graphs=graphs,
                                    cuda_graph_max_batch=max(args.batch_list), max_num_seqs=max(args.batch_list)))
    try:
        model = engine.runner.model
        weight_bytes = sum(t.numel() * t.element_size() for layer in model.layers for t in vars(layer).values()
                           if isinstance(t, torch.Tensor)) + model.lm_head.numel() * model.lm_head.element_size()
        vocab = engine.model_config.vocab_size
        params = SamplingParams(max_tokens=args.steps + 1000, temperature=0.0, ignore_eos=True)
        result = {}
        for batch in args.batch_list:
            g = torch.Generator().manual_seed(batch)  # the same prompts for both configurations
            ids = [f"b{batch}-{i}" for i in range(batch)]
            for rid in ids:
                engine.add_request(rid, torch.randint(10, vocab - 10, (args.prompt_len,), generator=g).tolist(), params)
            while any(s.is_prefill for s in engine.scheduler.running) or engine.scheduler.waiting:
                engine.step()
            for _ in range(3):  # warm-up decodes
                engine.step()
            times = []
            for _ in range(args.steps):
                _sync(engine.runner.device)
                t0 = time.perf_counter()
                engine.step()
                _sync(engine.runner.device)
                times.append(time.perf_counter() - t0)
            result[batch] = 1e3 * statistics.median(times)
            for rid in ids:
                engine.abort_request(rid)
            while engine.has_unfinished():
                engine.step()
        return result, weight_bytes
    finally:
        engine.close()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--batches", default="1,8,32", help="decode batch sizes (default: 1,8,32)")
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per configuration")
    parser.add_argument("--kv-gib", type=float, default=1.0, help="device KV cache per engine, GiB")
    args = parser.parse_args()
    args.batch_list = [int(b) for b in args.batches.split(",") if b.strip()]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    bandwidth = copy_bandwidth(device)
    print(f"# decode step, {args.model or 'embedded'} on {device} ({args.dtype}); device copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s")
    print("batch  eager ms  graphs ms  eager/graphs  weights GB/s eager  graphs  of copy bw (graphs)")
    eager_ms, weight_bytes = step_ms(args, False)
    graphs_ms, _ = step_ms(args, True)
    for batch in args.batch_list:
        eager, graphed = eager_ms[batch], graphs_ms[batch]
        gbs = [weight_bytes / (ms / 1e3) / 1e9 for ms in (eager, graphed)]
        print(f"{batch:5d}  {eager:8.2f}  {graphed:9.2f}  {eager / graphed:11.2f}x  {gbs[0]:18.1f}  {gbs[1]:6.1f}  "
              f"{gbs[1] * 1e9 / bandwidth:18.2f}")


if __name__ == "__main__":
    main()
