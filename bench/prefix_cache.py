"""Prefix caching, cache on vs off in one run, on the engine in this process (no gateway, no network).

    python bench/prefix_cache.py [--threads 2] [--out prefix_cache.json] [--quick]

Two workloads, each run twice on a fresh engine (--no-enable-prefix-caching, then the cache on):
  shared-prompt  --requests (64) requests whose chat prompts share a system prompt of about --system-tokens (1,000)
                 tokens (the Declaration of Independence, bench/data) and differ in their user question; Poisson
                 arrivals at --rate requests/s (0: all at once).
  multi-turn     --conversations (16) conversations of --turns (6) turns: each turn resends the whole history (the
                 model's own earlier replies, re-tokenized from their text) plus a new question, and arrives when the
                 conversation's previous reply has finished; conversations start --conversation-gap-s apart.

Reports per workload and setting: TTFT p50/p99 (arrival -> the step that emits the first token), requests/s and
output tokens/s over the run, the device tier's hit rate (cached / looked-up prompt tokens, from the engine's
counters), and the on/off ratios. The host tier (device-evicted blocks kept in the sidecar) is not built: its hit
rate is reported as null. Figures taken on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpu_worker.config import EngineConfig
from gpu_worker.engine import LLMEngine
from neoserve.sampling_params import SamplingParams
from neoserve.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parent / "data" / "declaration_of_independence.txt"
QUESTIONS = ["Summarize the text above in one sentence.", "Who wrote this?", "What grievance is listed first?",
             "Name one right the text calls unalienable.", "When was it written?", "What does it declare?",
             "Which king is meant?", "What is said about taxes?", "Is the tone angry?", "What is a tyrant here?",
             "List two complaints.", "What happens to allegiance?", "Who is addressed?", "What is the last pledge?"]


@dataclass
class Request:
    """One turn: its prompt, when it arrives (seconds after the run starts) and what happened to it."""

    prompt: list[int]
    arrival: float
    conversation: int | None = None
    first_token_at: float | None = None
    done_at: float | None = None
    output: list[int] = field(default_factory=list)
    cached_tokens: int = 0


def system_prompt(tokenizer: Tokenizer, tokens: int) -> str:
    """The leading part of the Declaration that tokenizes to about `tokens` tokens."""
    words = DATA.read_text().split()
    lo, hi = 1, len(words)
    while lo < hi:  # NOTE: the fewest words reaching the target, by bisection over the word count
        mid = (lo + hi) // 2
        if len(tokenizer.encode(" ".join(words[:mid]))) >= tokens:
            hi = mid
        else:
            lo = mid + 1
    return "Answer questions about this document.\n\n" + " ".join(words[:lo])


def chat(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


class Run:
    """Drives one engine through a workload on the wall clock: requests are added when due, turns of a conversation
    when the previous one finished."""

    def __init__(self, engine: LLMEngine, tokenizer: Tokenizer, max_tokens: int):
        self.engine = engine
        self.tokenizer = tokenizer
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.t0 = 0.0
        self.live: dict[str, Request] = {}
        self.done: list[Request] = []

    def _add(self, req: Request) -> None:
        rid = f"r{len(self.done) + len(self.live)}"
        self.live[rid] = req
        self.engine.add_request(rid, req.prompt, self.params)

    def step(self) -> list[Request]:
        """One engine step; returns the requests it finished."""
        finished = []
        for out in self.engine.step():
            now = time.perf_counter() - self.t0
            req = self.live[out.request_id]
            if out.new_token_ids and req.first_token_at is None:
                req.first_token_at = now
            req.output += out.new_token_ids
            if out.finished:
                req.done_at, req.cached_tokens = now, out.num_cached_tokens
                self.done.append(self.live.pop(out.request_id))
                finished.append(req)
        return finished

    def shared_prompt(self, requests: list[Request]) -> None:
        pending = sorted(requests, key=lambda r: r.arrival)
        self.t0 = time.perf_counter()
        while pending or self.live:
            now = time.perf_counter() - self.t0
            while pending and pending[0].arrival <= now:
                self._add(pending.pop(0))
            if not self.live:
                time.sleep(max(0.0, pending[0].arrival - now))
                continue
            self.step()

    def multi_turn(self, system: str, conversations: int, turns: int, gap_s: float) -> None:
        history = [[{"role": "system", "content": system}] for _ in range(conversations)]
        turn = [0] * conversations
        due = [(c * gap_s, c) for c in range(conversations)]  # (arrival, conversation) of each next turn
        self.t0 = time.perf_counter()
        while due or self.live:
            now = time.perf_counter() - self.t0
            for at, c in [d for d in due if d[0] <= now]:
                due.remove((at, c))
                history[c].append({"role": "user", "content": QUESTIONS[(c + turn[c]) % len(QUESTIONS)]})
                self._add(Request(chat(self.tokenizer, history[c]), at, conversation=c))
            if not self.live:
                time.sleep(max(0.0, min(d[0] for d in due) - now))
                continue
            for req in self.step():
                c = req.conversation
                history[c].append({"role": "assistant", "content": self.tokenizer.decode(req.output,
                                                                                           skip_special_tokens=True)})
                turn[c] += 1
                if turn[c] < turns:
                    due.append((req.done_at, c))


def summarize(run: Run, hits_before: tuple[int, int]) -> dict:
    reqs = run.done
    ttft = [r.first_token_at - r.arrival for r in reqs]
    span = max(r.done_at for r in reqs) - min(r.arrival for r in reqs)
    stats = run.engine.stats()
    queried = stats.prefix_cache_queried_tokens - hits_before[0]
    hit = stats.prefix_cache_hit_tokens - hits_before[1]
    return {
        "requests": len(reqs),
        "prompt_tokens_mean": statistics.mean(len(r.prompt) for r in reqs),
        "ttft_p50_s": _percentile(ttft, 50), "ttft_p99_s": _percentile(ttft, 99),
        "requests_per_s": len(reqs) / span, "output_tokens_per_s": sum(len(r.output) for r in reqs) / span,
        "device_hit_rate": hit / queried if queried else None,
        "cached_tokens_per_request": statistics.mean(r.cached_tokens for r in reqs),
        "host_hit_rate": None,  # NOTE: the host tier is not built (issue 18, item 3)
        "evictions": stats.prefix_cache_evictions,
    }


def run_workload(name: str, args, cache: bool, tokenizer: Tokenizer, system: str) -> dict:
    engine = LLMEngine(EngineConfig(model=args.model, threads=args.threads, mode=args.mode, dtype=args.dtype,
                                    compile="off", enable_prefix_caching=cache,
                                    max_num_batched_tokens=args.max_num_batched_tokens,
                                    gpu_kv_tokens=args.gpu_kv_tokens))
    try:
        run = Run(engine, tokenizer, args.max_tokens)
        # NOTE: a warm-up request of its own text, so that first-call costs land in neither run's figures.
        run.shared_prompt([Request(chat(tokenizer, [{"role": "user", "content": "Warm up."}]), 0.0)])
        run.done.clear()
        s = engine.stats()
        before = (s.prefix_cache_queried_tokens, s.prefix_cache_hit_tokens)
        if name == "shared-prompt":
            rng = random.Random(args.seed)
            t, requests = 0.0, []
            for i in range(args.requests):
                question = f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})"
                msgs = [{"role": "system", "content": system}, {"role": "user", "content": question}]
                requests.append(Request(chat(tokenizer, msgs), t))
                t += rng.expovariate(args.rate) if args.rate > 0 else 0.0
            run.shared_prompt(requests)
        else:
            run.multi_turn(system, args.conversations, args.turns, args.conversation_gap_s)
        return summarize(run, before)
    finally:
        engine.close()


def _ratio(a, b):
    return a / b if a is not None and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="as neoserve serve --model (default: the embedded SmolLM2)")
    parser.add_argument("--mode", default="gpu-only", choices=("gpu-only", "auto", "cpu-all"))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--gpu-kv-tokens", type=int, default=None)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rate", type=float, default=1.0, help="shared-prompt arrivals per second (0: all at once)")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--conversation-gap-s", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workloads", default="shared-prompt,multi-turn")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="a small setting that runs in a minute or two "
                                                             "(figures not meaningful)")
    args = parser.parse_args()
    if args.quick:
        args.system_tokens, args.requests, args.rate = 200, 6, 0.0
        args.conversations, args.turns, args.max_tokens, args.conversation_gap_s = 2, 3, 4, 0.0
    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.load(args.model)
    system = system_prompt(tokenizer, args.system_tokens)
    results = {"host": platform.node(), "args": {k: str(v) for k, v in vars(args).items()}, "workloads": {}}
    for name in args.workloads.split(","):
        off = run_workload(name, args, False, tokenizer, system)
        on = run_workload(name, args, True, tokenizer, system)
        results["workloads"][name] = {
            "off": off, "on": on,
            "ttft_p50_speedup": _ratio(off["ttft_p50_s"], on["ttft_p50_s"]),
            "ttft_p99_speedup": _ratio(off["ttft_p99_s"], on["ttft_p99_s"]),
            "throughput_ratio": _ratio(on["output_tokens_per_s"], off["output_tokens_per_s"]),
        }
        w = results["workloads"][name]
        print(f"{name}: {on['requests']} requests, {on['prompt_tokens_mean']:.0f} prompt tokens on average")
        for label, r in (("off", off), ("on", on)):
            hit = "-" if r["device_hit_rate"] is None else f"{r['device_hit_rate']:.1%}"
            print(f"  cache {label:3}: TTFT p50 {r['ttft_p50_s'] * 1e3:8.1f} ms  p99 {r['ttft_p99_s'] * 1e3:8.1f} ms  "
                  f"{r['requests_per_s']:6.2f} req/s  {r['output_tokens_per_s']:7.1f} tok/s  device hit rate {hit}  "
                  "host hit rate n/a (not built)")
        print(f"  on/off: TTFT p50 {w['ttft_p50_speedup']:.2f}x faster, p99 {w['ttft_p99_speedup']:.2f}x, "
              f"throughput {w['throughput_ratio']:.2f}x")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
