"""Measure the machine's memory read bandwidth on the spot (the ceiling for memory-bound decode attention).

Why on the spot: the machine is shared and its bandwidth changes with load; a kernel's efficiency is only
meaningful as a fraction of what the same threads could read at the same moment. The probe streams a buffer
of at least 4x the L3 size (default 2 GiB) once per pass with AVX-512 loads (the attention kernel's native
`stream_read`), from a huge-page arena like the KV cache's, split evenly over the given threads.

Run alone: `python bench/membw.py [--gib 2] [--threads N] [--passes 5]`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

from cpu_attn.kernel import Arena, default_num_threads, stream_read

DEFAULT_BYTES = 2 << 30  # 4x the 480 MiB L3 of the development machine


@dataclass(frozen=True)
class Bandwidth:
    best_gbs: float
    median_gbs: float
    nbytes: int
    threads: int
    passes: int

    def __str__(self) -> str:
        return (f"read bandwidth: best {self.best_gbs:.1f} GB/s, median {self.median_gbs:.1f} GB/s "
                f"({self.nbytes / 2**30:.2f} GiB buffer, {self.threads} threads, {self.passes} passes)")


def measure_read_bandwidth(nbytes: int = DEFAULT_BYTES, threads: int | None = None, passes: int = 5) -> Bandwidth:
    """Best and median of `passes` full reads of an `nbytes` buffer (after one warm-up pass that faults it in)."""
    threads = threads or default_num_threads()
    arena = Arena(nbytes)
    arena.array.fill(1)  # fault every page in (as huge pages where possible) before timing
    stream_read(arena.ptr, nbytes, threads)
    rates = []
    for _ in range(passes):
        t0 = time.perf_counter()
        _, nread = stream_read(arena.ptr, nbytes, threads)
        rates.append(nread / (time.perf_counter() - t0) / 1e9)
    return Bandwidth(max(rates), statistics.median(rates), nbytes, threads, passes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=DEFAULT_BYTES / 2**30, help="buffer size in GiB (>= 4x L3)")
    ap.add_argument("--threads", type=int, default=None, help="threads (default: cores this process may use)")
    ap.add_argument("--passes", type=int, default=5)
    args = ap.parse_args()
    print(measure_read_bandwidth(int(args.gib * 2**30), args.threads, args.passes))


if __name__ == "__main__":
    main()
