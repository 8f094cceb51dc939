"""Engine decode throughput on SmolLM2 vs transformers' `generate` on the same weights, in one run.

    python bench/bench_engine.py [--threads 2] [--quick]

Prints decode tokens/s at batch 1 and batch 32 for our engine and for transformers, and the ratios the foundation
issue sets as goals: ours/transformers at batch 1 (goal >= 3x) and our batch 32 / our batch 1 (goal >= 10x).
Decode time excludes prefill: each side's time for a 1-token generation of the same batch is subtracted.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from gpu_worker.config import EngineConfig
from gpu_worker.engine import LLMEngine
from neoserve.model_files import embedded_model_path
from neoserve.sampling_params import SamplingParams


def _prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, length), generator=g).tolist()


def ours(engine: LLMEngine, prompts, new_tokens: int) -> float:
    """Seconds to generate `new_tokens` greedy tokens for every prompt at once."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}-{new_tokens}-{start}", p, params)
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


@torch.inference_mode()
def theirs(model, prompts, new_tokens: int) -> float:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def decode_rate(fn, target, prompts, new_tokens: int, repeats: int) -> float:
    """Decode tokens/s: (n - 1) decode steps per sequence over the time beyond a 1-token (prefill-only) run.
    The median of `repeats` measurements, so one disturbed run (a shared machine) does not decide the figure."""
    fn(target, prompts, 2)  # warm-up
    rates = []
    for _ in range(repeats):
        t_prefill = fn(target, prompts, 1)
        t_full = fn(target, prompts, new_tokens)
        rates.append(len(prompts) * (new_tokens - 1) / max(t_full - t_prefill, 1e-9))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (figures not meaningful)")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.prompt_len, args.repeats = 6, 16, 1
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    path = embedded_model_path()
    # NOTE: no prefix cache: the decode rate subtracts a prefill-only run of the same prompts, which would hit it.
    engine = LLMEngine(EngineConfig(threads=args.threads, max_num_batched_tokens=4096, enable_prefix_caching=False))
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    vocab = engine.model_config.vocab_size

    rows = []
    for batch in (1, 32):
        prompts = _prompts(batch, args.prompt_len, vocab)
        r_ours = decode_rate(ours, engine, prompts, args.new_tokens, args.repeats)
        r_hf = decode_rate(theirs, hf, prompts, args.new_tokens, args.repeats)
        rows.append((batch, r_ours, r_hf))

    print(f"\nmachine: {platform.processor() or platform.machine()}, torch threads {args.threads}, "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, fp32")
    print(f"{'batch':>5} {'ours tok/s':>11} {'transformers tok/s':>19} {'ours/transformers':>18}")
    for batch, r_ours, r_hf in rows:
        print(f"{batch:>5} {r_ours:>11.1f} {r_hf:>19.1f} {r_ours / r_hf:>17.2f}x")
    b1, b32 = rows[0][1], rows[1][1]
    print(f"batch-32 aggregate / batch-1 (ours): {b32 / b1:.1f}x   (goals: batch-1 >= 3x transformers, "
          f"batch-32 >= 10x our batch-1)")


if __name__ == "__main__":
    main()
