"""The requests a simulation serves: Poisson arrivals with input/output length distributions, or a JSONL trace.

Length specs are bench/serve.py's: "N" (fixed), "uniform:LO:HI" (inclusive) or "normal:MEAN:STD" (rounded, clipped
to [1, MEAN + 4 STD]). A trace line is {"arrival_s": float, "input_len": int, "output_len": int} (also accepted:
"timestamp" for arrival_s, "prompt_len"/"prompt_tokens" for input_len, "max_tokens"/"requested_output_len" for
output_len), so bench/serve.py's per-request records replay as they were sent.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    arrival_s: float
    input_len: int
    output_len: int


def _first(row: dict, *names: str):
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise ValueError(f"trace line {row!r} lacks {names[0]}")


def sample_length(spec: str, rng: random.Random) -> int:
    parts = str(spec).split(":")
    if len(parts) == 1:
        return int(parts[0])
    kind, a, b = parts[0], float(parts[1]), float(parts[2])
    if kind == "uniform":
        return rng.randint(int(a), int(b))
    if kind == "normal":
        return int(min(max(1, round(rng.gauss(a, b))), max(1, a + 4 * b)))
    raise ValueError(f"{spec!r} is not N, uniform:LO:HI or normal:MEAN:STD")


def check_length_spec(spec: str) -> str:
    """Raises ValueError for a spec sample_length cannot read (so a bad flag fails before any simulation)."""
    sample_length(spec, random.Random(0))
    return spec


def poisson(rate: float, num_requests: int, input_len: str, output_len: str, seed: int = 0,
            max_model_len: int | None = None) -> list[Request]:
    """num_requests requests with exponential gaps at `rate` req/s (all at t=0 for an infinite rate)."""
    rng = random.Random(seed)
    t = 0.0
    out = []
    for _ in range(num_requests):
        if not math.isinf(rate):
            t += rng.expovariate(rate)
        n_in, n_out = max(1, sample_length(input_len, rng)), max(1, sample_length(output_len, rng))
        if max_model_len is not None:  # NOTE: as bench/serve.py: prompt + output must fit the context
            n_out = min(n_out, max_model_len - 1)
            n_in = max(1, min(n_in, max_model_len - n_out))
        out.append(Request(t, n_in, n_out))
    return out


def load_trace(path: str) -> list[Request]:
    """A JSONL trace, sorted by arrival."""
    reqs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            reqs.append(Request(float(_first(row, "arrival_s", "timestamp", "scheduled_s")),
                                int(_first(row, "input_len", "prompt_len", "prompt_tokens")),
                                int(_first(row, "output_len", "max_tokens", "requested_output_len"))))
    reqs.sort(key=lambda r: r.arrival_s)
    return reqs
