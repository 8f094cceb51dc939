"""Timestamps of one engine step: the worker device's busy intervals and the sidecar's, on one clock.

Used by bench/trace_pipeline.py to show that the sidecar's attention for one sub-batch runs while the device works
on the other. All times are CLOCK_MONOTONIC nanoseconds (time.monotonic_ns), which every process on the host
shares; device intervals on CUDA come from CUDA events placed on that clock through one synchronised reference.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch


@dataclass
class Span:
    name: str
    track: str  # "device", "sidecar", or "launch" (the worker's launch thread inside a hand-off call)
    start_ns: int
    end_ns: int


class StepTracer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[Span] = []
        self._cuda_spans: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.tickets: dict[int, str] = {}  # sidecar ticket -> span name
        if self.cuda:
            torch.cuda.synchronize(device)
            self._ref = torch.cuda.Event(enable_timing=True)
            self._ref.record()
            torch.cuda.synchronize(device)
            self._ref_ns = time.monotonic_ns()

    @contextlib.contextmanager
    def span(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._cuda_spans.append((name, start, end))
        else:
            t0 = time.monotonic_ns()
            yield
            self.spans.append(Span(name, "device", t0, time.monotonic_ns()))

    def mark(self, name: str, start_ns: int) -> None:
        """The launch thread spent [start_ns, now] in hand-off step `name` (stage, event wait, commit, sidecar
        wait, result copy): host wall time, which is what a blocked launch thread costs the device."""
        self.spans.append(Span(name, "launch", start_ns, time.monotonic_ns()))

    def finish(self, sidecar_times: dict[int, tuple[int, int]]) -> list[Span]:
        """All spans, the sidecar's included (from SidecarClient.trace), sorted by start."""
        if self.cuda:
            torch.cuda.synchronize()
            for name, start, end in self._cuda_spans:
                s = self._ref_ns + int(self._ref.elapsed_time(start) * 1e6)
                e = self._ref_ns + int(self._ref.elapsed_time(end) * 1e6)
                self.spans.append(Span(name, "device", s, e))
        for ticket, name in self.tickets.items():
            if ticket in sidecar_times:
                s, e = sidecar_times[ticket]
                self.spans.append(Span(name, "sidecar", s, e))
        return sorted(self.spans, key=lambda sp: sp.start_ns)


def overlap_ns(spans: list[Span], a: str = "device", b: str = "sidecar") -> int:
    """Total time during which both tracks are busy."""
    def merged(track):
        out = []
        for sp in sorted((s for s in spans if s.track == track), key=lambda s: s.start_ns):
            if out and sp.start_ns <= out[-1][1]:
                out[-1][1] = max(out[-1][1], sp.end_ns)
            else:
                out.append([sp.start_ns, sp.end_ns])
        return out
    total, xs, ys = 0, merged(a), merged(b)
    i = j = 0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0, hi - lo)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def chrome_trace(spans: list[Span]) -> dict:
    """Chrome/Perfetto trace-event JSON (open in ui.perfetto.dev)."""
    t0 = min((s.start_ns for s in spans), default=0)
    tid = {"device": 1, "sidecar": 2, "launch": 3}
    events = [{"name": s.name, "ph": "X", "pid": 1, "tid": tid[s.track], "ts": (s.start_ns - t0) / 1e3,
               "dur": (s.end_ns - s.start_ns) / 1e3} for s in spans]
    events += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": t, "args": {"name": n}} for n, t in tid.items()]
    return {"traceEvents": events, "displayTimeUnit": "ms"}
