"""Our CPU decode against llama.cpp's, in one run: same GGUF, same threads, batch 1 and batch 32.

    python bench/bench_cpu_decode.py                                  # engine defaults, 2 threads
    python bench/bench_cpu_decode.py --engine-arg quantization=q8 --engine-arg compile=off
    python bench/bench_cpu_decode.py --quick --no-peer               # seconds-long smoke run of our side only

Ours (through `gpu_worker.engine.LLMEngine` directly, greedy, ignore_eos), the median of --repeats runs:
  batch 1   one short prompt (--short-prompt tokens), then --new-tokens decode steps; tok/s over the decode steps only
            (from the end of the prefill step to the last token).
  batch 32  32 sequences of --prompt-len random tokens, then --new-tokens tokens each; tok/s = tokens generated after
            every prefill has finished / the time from then to the end (llama-batched-bench's S_TG counts the same).
llama.cpp (built by bench/llamacpp.py from the llama-cpp-python 0.3.36 sdist): llama-bench tg<new-tokens>
(`-p 0 -n 128`, batch 1; median of --peer-repeats repetitions) and llama-batched-bench's decode rate S_TG for 1 and 32
sequences (`-npp 128 -ntg 128`; the median of --repeats runs).
Both sides run with --threads threads (torch threads and OMP_NUM_THREADS set here; llama.cpp's -t).

Also printed: this CPU (lscpu), the load average before and after, the machine's read bandwidth (bench/membw.py's
AVX-512 stream read over 2 GiB with the same threads, measured in this run), and the weight bytes each engine reads
per decode step with the GB/s that makes at the measured rates. `--engine-arg key=value` sets any EngineConfig field
(values parsed as the field's type; unknown keys are passed as given, so EngineConfig itself says if one is wrong).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import statistics
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _threads_from_argv(default: int = 2) -> int:
    # NOTE: OMP_NUM_THREADS is read once, when torch loads its OpenMP runtime, so it must be set before the first
    # `import torch` (below), i.e. before argparse runs in main().
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return default


if __name__ == "__main__":
    os.environ["OMP_NUM_THREADS"] = str(_threads_from_argv())

import torch  # noqa: E402

from bench.llamacpp import LlamaCpp, ensure, median_batched_bench, run_llama_bench  # noqa: E402
from bench.membw import measure_read_bandwidth  # noqa: E402
from gpu_worker.config import EngineConfig  # noqa: E402
from gpu_worker.engine import LLMEngine  # noqa: E402
from neoserve.model_files import embedded_model_path  # noqa: E402
from neoserve.sampling_params import SamplingParams  # noqa: E402


# --- engine configuration from the command line -----------------------------------------------------------------------
def _parse_value(text: str, annotation) -> object:
    base = typing.get_args(annotation) or (annotation,)
    if text.lower() in ("none", "null") and type(None) in base:
        return None
    for typ in base:
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
        elif typ in (int, float, str):
            try:
                return typ(text)
            except ValueError:
                continue
    raise ValueError(f"cannot read {text!r} as {annotation}")


def parse_engine_args(pairs: list[str]) -> dict[str, object]:
    """`key=value` strings -> EngineConfig keyword arguments (dashes in keys read as underscores)."""
    hints = typing.get_type_hints(EngineConfig)
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--engine-arg wants key=value, got {pair!r}")
        if key in hints:
            out[key] = _parse_value(text, hints[key])
        else:
            # NOTE: a field this checkout's EngineConfig lacks (the bench must not depend on fields that are still
            # being added): a Python literal where the text is one, else the string; EngineConfig rejects it if wrong.
            try:
                out[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                out[key] = text
    return out


def make_engine(base: dict[str, object], pairs: list[str]) -> tuple[LLMEngine, dict[str, object]]:
    """The engine, with its background compiles (if any) finished: the bench times compiled steps, not the eager
    fallback a server runs meanwhile."""
    kwargs = {**base, **parse_engine_args(pairs)}
    engine = LLMEngine(EngineConfig(**kwargs))
    compiled = getattr(engine.runner, "compiled", None)
    if compiled is not None:
        t0 = time.perf_counter()
        print("waiting for the decode step's compiles ...", flush=True)
        compiled.wait()
        print(f"compiled in {time.perf_counter() - t0:.0f} s: {compiled.compile_seconds}", flush=True)
    return engine, kwargs


# --- machine ----------------------------------------------------------------------------------------------------------
INTERESTING_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                     "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_summary() -> str:
    """lscpu's model name, CPU count and the SIMD flags that matter to matmul kernels."""
    info = {}
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    flags = set(info.get("Flags", "").split())
    have = [f for f in INTERESTING_FLAGS if f in flags]
    lacks = [f for f in INTERESTING_FLAGS if f not in flags]
    return (f"cpu: {info.get('Model name', '?')}, {info.get('CPU(s)', '?')} CPUs, L3 {info.get('L3 cache', '?')}\n"
            f"flags: {' '.join(have) or '-'}   (absent: {' '.join(lacks) or '-'})")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- weight bytes per decode step -------------------------------------------------------------------------------------
def _tensors_in(obj, seen: set[int], depth: int = 0):
    """Tensors reachable from `obj` through attributes, lists, tuples, dicts and modules (each object once)."""
    if depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v, seen, depth + 1)
    elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__") and type(obj).__module__.startswith(
            ("gpu_worker", "neoserve")):
        for v in vars(obj).values():
            yield from _tensors_in(v, seen, depth + 1)


def our_weight_bytes(engine: LLMEngine, batch: int) -> int:
    """Bytes of the model's tensors a decode step of `batch` sequences reads in full: every tensor the model variant
    serving that batch holds (in whatever format it keeps its weights), counted once per storage, less those a step
    reads one row of: the rotary tables and the embedding table (unless it is also the LM head)."""
    runner = engine.runner
    model = runner.decode_model(batch) if hasattr(runner, "decode_model") else runner.model
    skip = {id(getattr(model, name, None)) for name in ("cos", "sin")}
    if getattr(model, "embed_tokens", None) is not getattr(model, "lm_head", None):
        skip.add(id(getattr(model, "embed_tokens", None)))
    storages: dict[int, int] = {}
    for t in _tensors_in(model, set()):
        if id(t) in skip or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of the GGUF's tensors llama.cpp reads per decode step (all but token_embd when output.weight exists)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)  # NOTE: untied: the embedding is only looked up, one row a token
    return sum(tensors.values())


# --- our decode -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeRun:
    tokens: int  # generated after every prefill had finished
    seconds: float

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


def decode_run(engine: LLMEngine, prompts: list[list[int]], new_tokens: int, tag: str) -> DecodeRun:
    """Generates `new_tokens` decode tokens per prompt beyond the one each prefill yields; times the decode part."""
    params = SamplingParams(max_tokens=new_tokens + 1, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    prefilled: set[str] = set()
    t_decode, tokens = None, 0
    while engine.has_unfinished():
        outs = engine.step()
        if t_decode is None:
            prefilled.update(o.request_id for o in outs if o.num_output_tokens >= 1)
            if len(prefilled) == len(prompts):
                t_decode = time.perf_counter()
        else:
            tokens += sum(len(o.new_token_ids) for o in outs)
    return DecodeRun(tokens, time.perf_counter() - t_decode)


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    # NOTE: unique random prompts, as llama-batched-bench uses (no shared prefix for any cache to exploit).
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, length), generator=g).tolist()


def our_decode_rate(engine: LLMEngine, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                    warmup_tokens: int) -> tuple[float, list[float]]:
    """Median decode tok/s over `repeats` runs (fresh prompts each), after a warm-up run of the same batch size."""
    vocab = engine.model_config.vocab_size
    decode_run(engine, random_prompts(batch, prompt_len, vocab, seed=999), warmup_tokens, f"warm{batch}")
    rates = [decode_run(engine, random_prompts(batch, prompt_len, vocab, seed=r), new_tokens, f"b{batch}r{r}").tok_s
             for r in range(repeats)]
    return statistics.median(rates), rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads of both engines")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="EngineConfig field for our engine (repeatable)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence at batch 32")
    ap.add_argument("--short-prompt", type=int, default=8, help="prompt tokens at batch 1")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="our runs per batch size (median)")
    ap.add_argument("--peer-repeats", type=int, default=7, help="llama-bench repetitions (median)")
    ap.add_argument("--warmup-tokens", type=int, default=8)
    ap.add_argument("--no-peer", action="store_true", help="skip llama.cpp (our figures only)")
    ap.add_argument("--build", action="store_true", help="build llama.cpp first if it is not built")
    ap.add_argument("--membw-gib", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (figures not meaningful)")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.prompt_len, args.batch, args.repeats, args.warmup_tokens = 4, 16, 4, 1, 2
        args.peer_repeats = 1
        args.membw_gib = 0.25
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for llama.cpp's OpenMP runtime too
    torch.set_num_threads(args.threads)

    print(cpu_summary())
    print(f"load average before: {load_average()}   torch {torch.__version__}, {args.threads} threads "
          f"(torch {torch.get_num_threads()}, OMP_NUM_THREADS {os.environ['OMP_NUM_THREADS']})", flush=True)
    lc: LlamaCpp | None = None
    if not args.no_peer:
        lc = ensure(args.build, tools=("llama-bench", "llama-batched-bench"))

    bw = measure_read_bandwidth(int(args.membw_gib * 2**30), threads=args.threads)
    print(bw, flush=True)

    # NOTE: no prefix cache: the repeats re-send the same prompts, and llama-batched-bench caches nothing either.
    base = {"threads": args.threads, "max_num_batched_tokens": max(2048, args.batch * args.prompt_len),
            "enable_prefix_caching": False}
    engine, kwargs = make_engine(base, args.engine_arg)
    model = str(kwargs.get("model") or "embedded")
    model_path = embedded_model_path() if model == "embedded" else Path(model)
    if model_path.suffix != ".gguf":
        lc = None  # NOTE: llama.cpp reads GGUF only: a checkpoint folder or random weights has no peer figure
    print(f"ours: EngineConfig({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}); "
          f"{engine.runner.device} {engine.runner.dtype}; model {model_path.name}", flush=True)
    ours_bytes = {b: our_weight_bytes(engine, b) for b in (1, args.batch)}
    b1, b1_all = our_decode_rate(engine, 1, args.short_prompt, args.new_tokens, args.repeats, args.warmup_tokens)
    print(f"ours batch 1: {b1:.1f} tok/s (runs: {', '.join(f'{r:.1f}' for r in b1_all)})", flush=True)
    bn, bn_all = our_decode_rate(engine, args.batch, args.prompt_len, args.new_tokens, args.repeats,
                                 args.warmup_tokens)
    print(f"ours batch {args.batch}: {bn:.1f} tok/s (runs: {', '.join(f'{r:.1f}' for r in bn_all)})", flush=True)
    engine.close()

    peer_b1 = peer_bn = peer_b1_batched = None
    if lc is not None:
        tg = run_llama_bench(lc, model_path, args.threads, args.new_tokens, repetitions=args.peer_repeats)
        peer_b1 = tg.median_ts
        print(f"llama-bench tg{tg.n_gen}: median {tg.median_ts:.1f} tok/s (runs: "
              f"{', '.join(f'{x:.1f}' for x in tg.samples_ts)})", flush=True)
        rows = median_batched_bench(lc, model_path, args.threads, args.prompt_len, args.new_tokens, (1, args.batch),
                                    repeats=args.repeats)
        peer_b1_batched, peer_bn = rows[1].s_tg, rows[args.batch].s_tg
        print(f"llama-batched-bench S_TG (median of {args.repeats}): {peer_b1_batched:.1f} tok/s x 1, "
              f"{peer_bn:.1f} tok/s x {args.batch}", flush=True)
    peer_bytes = gguf_weight_bytes(model_path) if model_path.suffix == ".gguf" else 0

    print(f"\nload average after: {load_average()}")
    print(f"read bandwidth (median, {args.threads} threads): {bw.median_gbs:.1f} GB/s; weights read per step: ours "
          f"{ours_bytes[1] / 1e6:.1f} MB at batch 1, {ours_bytes[args.batch] / 1e6:.1f} MB at batch {args.batch}; "
          f"llama.cpp {peer_bytes / 1e6:.1f} MB")
    header = (f"{'batch':>5} {'engine':<28} {'tok/s':>8} {'ours/peer':>9} {'weight GB/s':>11} {'of read bw':>10}")
    print(header)

    def row(batch: int, name: str, tok_s: float | None, nbytes: int, ratio: str = "") -> None:
        if tok_s is None:
            print(f"{batch:>5} {name:<28} {'-':>8}")
            return
        gbs = nbytes * tok_s / batch / 1e9  # NOTE: one pass over the weights per step, `batch` tokens a step
        print(f"{batch:>5} {name:<28} {tok_s:>8.1f} {ratio:>9} {gbs:>11.1f} {gbs / bw.median_gbs:>9.2f}x")

    def ratio(ours: float, peer: float | None) -> str:
        return f"{ours / peer:.2f}x" if peer else "-"

    row(1, "ours", b1, ours_bytes[1], ratio(b1, peer_b1))
    row(1, f"llama-bench tg{args.new_tokens}", peer_b1, peer_bytes)
    row(1, "llama-batched-bench S_TG", peer_b1_batched, peer_bytes)
    row(args.batch, "ours", bn, ours_bytes[args.batch], ratio(bn, peer_bn))
    row(args.batch, "llama-batched-bench S_TG", peer_bn, peer_bytes)
    if peer_b1 and peer_bn:
        print(f"goals (issue 14): batch 1 >= 1.2x llama-bench: {b1 / peer_b1:.2f}x; batch {args.batch} >= 2x "
              f"llama-batched-bench: {bn / peer_bn:.2f}x")


if __name__ == "__main__":
    main()
