"""Top-1 agreement with fp32 transformers over teacher-forced natural text: each of our engine paths, and llama.cpp.

    python bench/bench_accuracy.py                                      # paths "default" and "fp32", plus llama.cpp
    python bench/bench_accuracy.py --path q8:quantization=q8 --path bf16:dtype=bfloat16
    python bench/bench_accuracy.py --no-peer --max-positions 32         # our side only, seconds

The text (bench/data/, see its README) is tokenized once with the model's tokenizer and cut into windows of --window
tokens; every window is scored from an empty context by each engine, all positions at once (teacher forcing). At
each position but a window's last, the argmax of an engine's logits is compared with the argmax of the reference's:
  top-1 agree     share of positions where the engine's argmax equals the reference's;
  next-token acc  share where the engine's argmax is the text's actual next token (the reference's own is printed);
  mean KL         KL(reference || engine) in nats, averaged over the positions.
Reference: transformers' own loading of the same GGUF in fp32 (dequantized), as tests/conftest.py's `hf_model`.
Ours: `ModelRunner.prompt_logits(window, decode_from=1)` (each position a batch-1 decode step, as served) of an
`LLMEngine(EngineConfig(...))` per --path NAME:key=value,key=value (the
pairs are EngineConfig fields, as bench_cpu_decode.py's --engine-arg; `--engine-arg` applies to every path).
llama.cpp: the same token ids through its C API (the sdist's ctypes bindings on the built libllama.so), logits for
every position, same threads.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.bench_cpu_decode import make_engine  # noqa: E402
from neoserve.model_files import embedded_model_path  # noqa: E402

DEFAULT_TEXT = ROOT / "bench" / "data" / "declaration_of_independence.txt"
DEFAULT_PATHS = ("default:", "fp32:dtype=float32")


@dataclass(frozen=True)
class Score:
    positions: int
    agree: int  # argmax equal to the reference's
    correct: int  # argmax equal to the text's next token
    kl_sum: float

    @property
    def agreement(self) -> float:
        return self.agree / self.positions

    @property
    def accuracy(self) -> float:
        return self.correct / self.positions

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / self.positions

    def __add__(self, other: "Score") -> "Score":
        return Score(self.positions + other.positions, self.agree + other.agree, self.correct + other.correct,
                     self.kl_sum + other.kl_sum)


ZERO = Score(0, 0, 0, 0.0)


def windows_of(token_ids: list[int], window: int, max_positions: int | None = None) -> list[list[int]]:
    """Consecutive windows of `window` tokens (the last may be shorter), cut to `max_positions` scored positions.
    A window of n tokens scores n - 1 positions (its last token has no next token in the window)."""
    out, left = [], max_positions if max_positions is not None else len(token_ids)
    for start in range(0, len(token_ids) - 1, window):
        w = token_ids[start:start + min(window, left + 1)]
        if len(w) < 2 or left <= 0:
            break
        out.append(w)
        left -= len(w) - 1
    return out


def score(ref_logits: torch.Tensor, logits: torch.Tensor, window: list[int]) -> Score:
    """Both [T, V] over one window; scores positions 0 .. T-2 (those with a next token)."""
    ref, got = ref_logits[:-1].float(), logits[:-1].float()
    target = torch.tensor(window[1:])
    ref_top, got_top = ref.argmax(-1), got.argmax(-1)
    ref_logp, got_logp = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (ref_logp.exp() * (ref_logp - got_logp)).sum(-1)
    return Score(len(target), int((got_top == ref_top).sum()), int((got_top == target).sum()), float(kl.sum()))


@torch.inference_mode()
def reference_logits(hf_model, windows: list[list[int]]) -> list[torch.Tensor]:
    return [hf_model(torch.tensor([w])).logits[0].float() for w in windows]


def score_all(ref: list[torch.Tensor], windows: list[list[int]], logits_of) -> Score:
    total = ZERO
    for r, w in zip(ref, windows):
        total = total + score(r, torch.as_tensor(logits_of(w)), w)
    return total


def parse_path(spec: str) -> tuple[str, list[str]]:
    """`name:key=value,key=value` -> (name, ["key=value", ...]); `name:` or `name` alone = engine defaults."""
    name, _, rest = spec.partition(":")
    return name, [p for p in rest.split(",") if p.strip()]


def score_our_path(ref: list[torch.Tensor], windows: list[list[int]], base: dict, pairs: list[str]) -> Score:
    engine, _ = make_engine(base, pairs)
    try:
        # NOTE: decode_from=1: every position after a window's first is one batch-1 decode step, through the model
        # variant and compiled graph that serve batch 1 (the quantized one on the default CPU path): the logits the
        # served tokens come from, not the dense prefill's.
        return score_all(ref, windows, lambda w: engine.runner.prompt_logits(w, decode_from=1).cpu())
    finally:
        engine.close()


def load_hf_reference(path: Path):
    from transformers import AutoModelForCausalLM

    # NOTE: the same loading as tests/conftest.py's hf_model: transformers dequantizes the GGUF to fp32 itself.
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", action="append", default=[], metavar="NAME:K=V,K=V",
                    help=f"one of our engine paths (repeatable; default: {' '.join(DEFAULT_PATHS)})")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="EngineConfig field for every path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--window", type=int, default=512, help="tokens per teacher-forced window")
    ap.add_argument("--max-positions", type=int, default=None, help="score at most this many positions")
    ap.add_argument("--min-positions", type=int, default=500, help="refuse to report fewer (issue 14 asks 500)")
    ap.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)

    from neoserve.tokenizer import Tokenizer

    gguf = embedded_model_path()
    token_ids = Tokenizer.load(None).encode(args.text.read_text())
    windows = windows_of(token_ids, args.window, args.max_positions)
    positions = sum(len(w) - 1 for w in windows)
    if args.max_positions is None and positions < args.min_positions:
        sys.exit(f"{args.text} gives {positions} positions, fewer than --min-positions {args.min_positions}")
    print(f"text: {args.text.name}, {len(token_ids)} tokens -> {positions} positions in {len(windows)} windows of "
          f"<= {args.window}; {args.threads} threads; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
          flush=True)

    t0 = time.perf_counter()
    hf = load_hf_reference(gguf)
    ref = reference_logits(hf, windows)
    del hf
    gc.collect()
    ref_acc = sum(int((r[:-1].argmax(-1) == torch.tensor(w[1:])).sum()) for r, w in zip(ref, windows)) / positions
    print(f"reference: transformers fp32 from {gguf.name}, next-token acc {ref_acc:.1%} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    rows: list[tuple[str, str, Score]] = []
    # NOTE: a small device KV budget: one window at a time needs a few blocks, and several engines load in turn.
    base = {"threads": args.threads, "gpu_kv_gib": 0.125}
    for spec in args.path or DEFAULT_PATHS:
        name, pairs = parse_path(spec)
        pairs = args.engine_arg + pairs
        rows.append((name, ",".join(pairs) or "(engine defaults)", score_our_path(ref, windows, base, pairs)))
        print(f"  {name}: top-1 agree {rows[-1][2].agreement:.2%}", flush=True)
        gc.collect()
    if not args.no_peer:
        from bench.llamacpp import LlamaLogits, ensure

        with LlamaLogits(ensure(False, tools=()), gguf, threads=args.threads,
                         n_ctx=max(len(w) for w in windows)) as ll:
            rows.append(("llama.cpp", f"{gguf.name}, C API logits", score_all(ref, windows, ll.logits)))

    print(f"\n{'path':<12} {'config':<40} {'positions':>9} {'top-1 agree':>11} {'next-token acc':>14} "
          f"{'mean KL':>9}")
    for name, config, s in rows:
        print(f"{name:<12} {config:<40} {s.positions:>9} {s.agreement:>11.2%} {s.accuracy:>14.2%} {s.mean_kl:>9.5f}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
