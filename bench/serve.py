"""Serving benchmark: throughput and latency of `neoserve serve` per scheduling mode under Poisson load.

    python bench/serve.py --quick                         # seconds-long smoke run: embedded SmolLM2, 1 mode, 1 rate
    python bench/serve.py --modes gpu-only,auto --rates 1,2,4,inf --num-requests 100 \\
        --input-len normal:1000:100 --output-len uniform:50:400 \\
        --engine-args "--model random:llama-3-8b --dtype bfloat16 --gpu-kv-tokens 4000"
    python bench/serve.py --address 127.0.0.1:50051 --rates 2   # drive a server that is already running

A mode may carry a latency bound for the auto scheduler: `auto@30` runs auto with `--latency-bound-ms 30`, and
`auto@baseline` with the largest p50 per-token latency gpu-only had in this run (so list gpu-only first): auto then
admits sequences to the CPU only while a decode step is predicted to stay within what gpu-only achieved.

For each mode it starts the server through the launcher (`python -m cli serve`, loopback, free ports, the
engine flags passed through and `--mode` set), waits until it is SERVING, sends warm-up requests (excluded), then
for each rate sends requests with Poisson arrivals through the public gRPC API (neoserve.v1.InferenceService),
`ignore_eos` so every reply has exactly the requested length, and records when every token arrived. Meanwhile it
samples the worker's Stats RPC (GPU/CPU KV usage, running/waiting, sequences on CPU, preemptions); with --address
it scrapes the gateway's Prometheus /metrics instead when --metrics-port is given. Between modes the server is
shut down (SIGINT: the gateway drains, then worker and sidecar stop) and checked for orphans and /dev/shm leftovers.

Definitions (per mode and rate):
  request / token throughput  completed requests (output tokens, prompt+output tokens) / span from first send to last
                              completion.
  TTFT                        send -> first token received.
  TPOT (per-token latency)    (last token - first token) / (tokens - 1), one value per request (>= 2 tokens).
  ITL                         gaps between token-bearing messages, spread evenly over the tokens of each message.
  KV usage                    GPU blocks used / total, CPU bytes used / total, sampled every --sample-interval-s.
  CPU decode share            cpu decodes / all decodes from worker counters when it exports them (num_cpu_decodes,
                              num_gpu_decodes); otherwise the sampled mean of sequences-on-CPU / running.
Outputs (--out, default $OUT when set, else bench/results/): serve.json (everything, per-request records included),
serve.png (throughput vs p50 per-token latency, one curve per mode), serve.md (the tables printed at the end) and
server-<mode>.log (the launcher's and its children's logs).

Bounded by construction: each rate sends at most --num-requests requests, stops sending after --duration-s, and
cancels whatever is still open --rate-timeout-s after it began. Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

# NOTE: the load generator shares the host with the server: one numpy/OpenMP thread is plenty for it.
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from gpu_worker.config import MODES  # noqa: E402
from neoserve.errors import ValidationError  # noqa: E402
from neoserve.v1 import inference_service_pb2 as pb  # noqa: E402
from neoserve.v1 import inference_service_pb2_grpc as pb_grpc  # noqa: E402

BASELINE_MODE = "gpu-only"
FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
# Cumulative worker counters (StatsResponse field names) reported as deltas over each run, when the worker exports
# them: the share of decodes on the CPU comes from num_cpu_decodes / num_decodes (or num_gpu_decodes).
COUNTERS = ("num_preemptions", "num_swap_outs", "num_swap_ins", "num_steps", "num_pipelined_steps",
            "num_cpu_decodes", "num_gpu_decodes", "num_decodes")
# NOTE: synthetic prompt ids avoid the low ids where byte-level vocabularies keep their special tokens, and stay
# below 32000 so they are ordinary tokens in every vocabulary we serve (random-weight shapes borrow SmolLM2's).
PROMPT_ID_RANGE = (256, 32000)


# ----------------------------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: "N" (fixed), "uniform:LO:HI" (inclusive) or "normal:MEAN:STD" (rounded,
    clipped to [1, MEAN + 4 STD])."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str, field_name: str) -> "LengthDist":
        parts = str(spec).split(":")
        try:
            if len(parts) == 1:
                dist = cls("fixed", float(int(parts[0])))
            elif len(parts) == 3 and parts[0] in ("uniform", "normal"):
                dist = cls(parts[0], float(parts[1]), float(parts[2]))
            else:
                raise ValueError
        except ValueError:
            raise ValidationError(field_name, f"{spec!r} is not N, uniform:LO:HI or normal:MEAN:STD") from None
        if dist.a < 1 or (dist.kind == "uniform" and dist.b < dist.a) or (dist.kind == "normal" and dist.b < 0):
            raise ValidationError(field_name, f"{spec!r}: lengths must be >= 1 (and LO <= HI, STD >= 0)")
        return dist

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, int(self.a), dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(int(self.a), int(self.b) + 1, size=n)
        x = np.rint(rng.normal(self.a, self.b, size=n))
        return np.clip(x, 1, max(1, self.a + 4 * self.b)).astype(np.int64)

    def __str__(self) -> str:
        return str(int(self.a)) if self.kind == "fixed" else f"{self.kind}:{self.a:g}:{self.b:g}"


def parse_rate(text: str) -> float:
    """Requests per second; "inf" sends every request at once (the saturation point)."""
    rate = float(text)
    if not rate > 0:
        raise ValidationError("rates", f"{text!r}: rates must be > 0 (or inf)")
    return rate


@dataclass
class BenchConfig:
    modes: list[str]
    rates: list[float]
    num_requests: int = 64
    duration_s: float | None = None
    rate_timeout_s: float = 600.0
    budget_s: float | None = None
    input_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", 128))
    output_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", 64))
    prompt_file: str | None = None
    warmup: int = 2
    temperature: float = 0.0
    seed: int = 0
    engine_args: list[str] = field(default_factory=list)
    serve_args: list[str] = field(default_factory=list)
    address: str | None = None
    metrics_port: int | None = None
    ready_timeout_s: float = 600.0
    sample_interval_s: float = 0.1
    channels: int = 4
    client_cpu: int | None = None
    out: str = "bench/results"
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.modes:
            raise ValidationError("modes", "give at least one mode")
        for mode in self.modes:
            base, _, bound = mode.partition("@")
            if base not in MODES:
                raise ValidationError("modes", f"{mode!r}: {base!r} is not one of {', '.join(MODES)}")
            if "@" in mode:
                if base != "auto":
                    raise ValidationError("modes", f"{mode!r}: only auto takes a latency bound (auto@MS)")
                if bound == "baseline":
                    if BASELINE_MODE not in self.modes[:self.modes.index(mode)]:
                        raise ValidationError("modes", f"{mode!r} needs {BASELINE_MODE} listed before it")
                else:
                    try:
                        ok = float(bound) > 0
                    except ValueError:
                        ok = False
                    if not ok:
                        raise ValidationError("modes", f"{mode!r}: the bound must be ms > 0 or 'baseline'")
        if len(set(self.modes)) != len(self.modes):
            raise ValidationError("modes", "a mode is listed twice")
        if not self.rates:
            raise ValidationError("rates", "give at least one rate")
        if self.num_requests < 1:
            raise ValidationError("num_requests", "must be >= 1")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValidationError("duration_s", "must be > 0")
        if self.rate_timeout_s <= 0 or self.ready_timeout_s <= 0:
            raise ValidationError("rate_timeout_s", "timeouts must be > 0")
        if self.budget_s is not None and self.budget_s < 30:
            raise ValidationError("budget_s", "must be >= 30 s (start-up alone takes seconds)")
        if self.warmup < 0:
            raise ValidationError("warmup", "must be >= 0")
        if self.temperature < 0:
            raise ValidationError("temperature", "must be >= 0")
        if not 0 < self.sample_interval_s <= 10:
            raise ValidationError("sample_interval_s", "must be in (0, 10]")
        if self.channels < 1:
            raise ValidationError("channels", "must be >= 1")
        if self.prompt_file is not None and not Path(self.prompt_file).is_file():
            raise ValidationError("prompt_file", f"{self.prompt_file}: no such file")
        if self.address is not None:
            host = self.address.rsplit(":", 1)[0].strip("[]")
            if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
                raise ValidationError("address", "the benchmark only drives loopback servers")
        if "--mode" in self.engine_args:
            raise ValidationError("engine_args", "--mode is set per run by --modes; leave it out of --engine-args")


# -------------------------------------------------------------------------------------------------- workload

@dataclass
class RequestSpec:
    """One request of the workload: exactly one of prompt_token_ids / prompt / messages, and its output length."""

    output_len: int
    prompt_token_ids: list[int] | None = None
    prompt: str | None = None
    messages: list[dict] | None = None

    def to_proto(self, *, temperature: float, request_id: str) -> pb.GenerateRequest:
        req = pb.GenerateRequest(request_id=request_id, sampling=pb.SamplingParameters(
            max_tokens=self.output_len, temperature=temperature, ignore_eos=True))
        if self.prompt_token_ids is not None:
            req.prompt_token_ids.ids.extend(self.prompt_token_ids)
        elif self.messages is not None:
            req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in self.messages)
        else:
            req.prompt = self.prompt or ""
        return req


def synthetic_requests(n: int, cfg: BenchConfig, rng: np.random.Generator, *, vocab_size: int,
                       max_model_len: int) -> list[RequestSpec]:
    """Random token-id prompts: exact input lengths whatever the tokenizer (prefix caching would not help them)."""
    inputs = cfg.input_len.sample(rng, n)
    outputs = cfg.output_len.sample(rng, n)
    lo, hi = PROMPT_ID_RANGE[0], min(PROMPT_ID_RANGE[1], vocab_size)
    specs = []
    for n_in, n_out in zip(inputs, outputs):
        n_out = int(min(n_out, max_model_len - 1))
        n_in = int(max(1, min(n_in, max_model_len - n_out)))  # NOTE: prompt + output must fit the context
        specs.append(RequestSpec(n_out, prompt_token_ids=rng.integers(lo, hi, size=n_in).tolist()))
    return specs


def file_requests(n: int, cfg: BenchConfig, rng: np.random.Generator) -> list[RequestSpec]:
    """Requests from a JSONL file, cycled to n. Each line has one of "prompt", "prompt_token_ids" or "messages",
    and optionally "output_len" (or "max_tokens"); without it the output length comes from --output-len."""
    rows = []
    with open(cfg.prompt_file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if sum(k in row for k in ("prompt", "prompt_token_ids", "messages")) != 1:
                raise ValidationError("prompt_file", f"line {line_no}: needs exactly one of prompt, "
                                                     "prompt_token_ids, messages")
            rows.append(row)
    if not rows:
        raise ValidationError("prompt_file", "no prompts in the file")
    order = rng.permutation(len(rows))
    outputs = cfg.output_len.sample(rng, n)
    specs = []
    for i in range(n):
        row = rows[order[i % len(rows)]]
        n_out = int(row.get("output_len", row.get("max_tokens", outputs[i])))
        specs.append(RequestSpec(n_out, prompt_token_ids=row.get("prompt_token_ids"), prompt=row.get("prompt"),
                                 messages=row.get("messages")))
    return specs


def poisson_offsets(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Send times (s from the start) of n requests with exponential gaps; all zero for an infinite rate."""
    if math.isinf(rate):
        return np.zeros(n)
    return np.cumsum(rng.exponential(1.0 / rate, size=n))


# ------------------------------------------------------------------------------------------------ measurement

@dataclass
class RequestRecord:
    index: int
    requested_output_len: int
    scheduled_s: float = 0.0  # planned send time, relative to the start of the rate
    send_s: float = math.nan  # actual send time, same clock
    token_times_s: list[float] = field(default_factory=list)  # one per received token
    num_tokens_received: int = 0
    prompt_tokens: int = 0  # known up front for token-id prompts; the server's usage count once complete
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    done_s: float = math.nan

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason is not None


async def drive_one(stub: pb_grpc.InferenceServiceStub, spec: RequestSpec, rec: RequestRecord, t0: float,
                    temperature: float, timeout_s: float) -> None:
    """Sends one request and records when each token arrives. Never raises (errors are recorded)."""
    loop = asyncio.get_running_loop()
    rec.send_s = loop.time() - t0
    call = stub.Generate(spec.to_proto(temperature=temperature, request_id=f"bench-{rec.index}"),
                         timeout=max(0.1, timeout_s))
    try:
        async for resp in call:
            now_s = loop.time() - t0
            if resp.HasField("delta"):
                k = len(resp.delta.token_ids)
                if k:
                    # NOTE: a message carrying k tokens spreads the gap since the previous one evenly over them
                    # (the first message's tokens all count as first tokens: TTFT is when the first one arrived).
                    step = (now_s - rec.token_times_s[-1]) / k if rec.token_times_s else 0.0
                    rec.token_times_s += [now_s - step * (k - 1 - j) for j in range(k)]
                    rec.num_tokens_received += k
            else:
                c = resp.complete
                rec.finish_reason = FINISH_REASONS.get(c.finish_reason, "unspecified")
                rec.prompt_tokens = c.usage.prompt_tokens
                rec.completion_tokens = c.usage.completion_tokens
    except grpc.aio.AioRpcError as e:
        rec.error = e.code().name
    except asyncio.CancelledError:
        rec.error = "CANCELLED_BY_BENCH"
        call.cancel()
        raise
    finally:
        rec.done_s = loop.time() - t0
    if rec.error is None and rec.finish_reason is None:
        rec.error = "NO_COMPLETE_MESSAGE"


class StatsSampler:
    """Polls server-side counters: the worker's internal Stats RPC (unix socket) when its address is known, else
    the gateway's Prometheus /metrics. Each sample is a dict of the StatsResponse field names plus `t`."""

    _PROM_NAMES = {
        "neoserve_requests_running": "num_running", "neoserve_requests_waiting": "num_waiting",
        "neoserve_requests_on_cpu": "num_cpu_sequences", "neoserve_gpu_kv_blocks_used": "gpu_kv_blocks_used",
        "neoserve_gpu_kv_blocks_total": "gpu_kv_blocks_total", "neoserve_cpu_kv_bytes_used": "cpu_kv_bytes_used",
        "neoserve_cpu_kv_bytes_total": "cpu_kv_bytes_total",
    } | {f"neoserve_{c[len('num_'):]}{suffix}": c for c in COUNTERS for suffix in ("", "_total")}

    def __init__(self, worker_address: str | None, metrics_url: str | None, interval_s: float):
        self.worker_address = worker_address
        self.metrics_url = metrics_url
        self.interval_s = interval_s
        self.source: str | None = None
        self._channel = None
        self._stub = None
        if worker_address:
            from neoserve.internal.v1 import worker_pb2, worker_pb2_grpc

            self._request = worker_pb2.StatsRequest()
            self._channel = grpc.aio.insecure_channel(worker_address)
            self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)

    async def sample(self) -> dict | None:
        if self._stub is not None:
            try:
                resp = await self._stub.Stats(self._request, timeout=2.0)
                self.source = "worker-stats"
                return {f.name: getattr(resp, f.name) for f in resp.DESCRIPTOR.fields}
            except grpc.aio.AioRpcError:
                pass
        if self.metrics_url:
            try:
                text = await asyncio.to_thread(_http_get, self.metrics_url)
            except OSError:
                return None
            self.source = "prometheus"
            return _parse_prometheus(text, self._PROM_NAMES)
        return None

    async def run(self, stop: asyncio.Event, t0: float) -> list[dict]:
        samples = []
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            s = await self.sample()
            if s is not None:
                s["t"] = loop.time() - t0
                samples.append(s)
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass
        return samples

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


def _http_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2.0) as r:  # noqa: S310 - a loopback URL we built
        return r.read().decode()


def _parse_prometheus(text: str, names: dict[str, str]) -> dict:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) >= 2 and parts[0] in names:
            out[names[parts[0]]] = float(parts[1])
    return out


def _percentiles(values, scale: float = 1.0) -> dict:
    if len(values) == 0:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "n": 0}
    v = np.asarray(values, dtype=np.float64) * scale
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(v.mean()), "n": int(v.size)}


def _peak_mean(values: list[float]) -> dict:
    if not values:
        return {"peak": None, "mean": None}
    return {"peak": float(max(values)), "mean": float(np.mean(values))}


def summarize_stats(samples: list[dict]) -> dict:
    """Peak/mean KV usage and queue sizes, preemptions during the window, and the share of decodes on the CPU."""
    gpu = [s["gpu_kv_blocks_used"] / s["gpu_kv_blocks_total"] for s in samples if s.get("gpu_kv_blocks_total")]
    cpu = [s["cpu_kv_bytes_used"] / s["cpu_kv_bytes_total"] for s in samples if s.get("cpu_kv_bytes_total")]
    out = {
        "num_samples": len(samples),
        "gpu_kv_usage": _peak_mean(gpu),
        "cpu_kv_usage": _peak_mean(cpu),
        "running": _peak_mean([s["num_running"] for s in samples if "num_running" in s]),
        "waiting": _peak_mean([s["num_waiting"] for s in samples if "num_waiting" in s]),
        "cpu_sequences": _peak_mean([s["num_cpu_sequences"] for s in samples if "num_cpu_sequences" in s]),
        "counters": {},
        "preemptions": None,
        "cpu_decode_share": None,
        "cpu_decode_share_source": None,
    }
    for name in COUNTERS:
        seen = [s[name] for s in samples if name in s]
        if seen:
            out["counters"][name] = int(seen[-1] - seen[0])
    c = out["counters"]
    out["preemptions"] = c.get("num_preemptions")
    d_cpu = c.get("num_cpu_decodes")
    d_all = c.get("num_decodes", d_cpu + c["num_gpu_decodes"] if d_cpu is not None and "num_gpu_decodes" in c else None)
    if d_cpu is not None and d_all:
        out["cpu_decode_share"] = float(d_cpu / d_all)
        out["cpu_decode_share_source"] = "counters"
    if out["cpu_decode_share"] is None:
        busy = [s for s in samples if s.get("num_running")]
        if busy:
            # NOTE: without decode counters, the time-average of sequences-on-CPU / running approximates it.
            out["cpu_decode_share"] = float(sum(s.get("num_cpu_sequences", 0) for s in busy)
                                            / sum(s["num_running"] for s in busy))
            out["cpu_decode_share_source"] = "sampled"
    return out


# NOTE: how a request ends when the benchmark's own time limit cuts it (not a server failure).
CUT_BY_BENCH = ("CANCELLED_BY_BENCH", "DEADLINE_EXCEEDED")


def summarize_rate(mode: str, rate: float, records: list[RequestRecord], stats: dict) -> dict:
    """Per-run figures. Latencies come from completed requests; token throughput counts every token received
    (requests cut by the time limit included) over the span from the first send to the last token."""
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error or "UNKNOWN"] = errors.get(r.error or "UNKNOWN", 0) + 1
    cut = sum(n for e, n in errors.items() if e in CUT_BY_BENCH)
    sent = [r for r in records if not math.isnan(r.send_s)]
    ends = [r.done_s for r in ok] + [r.token_times_s[-1] for r in records if r.token_times_s]
    span = (max(ends) - min(r.send_s for r in sent)) if ends and sent else math.nan
    out_tokens = sum(r.num_tokens_received for r in records)
    in_tokens = sum(r.prompt_tokens for r in records if r.token_times_s)  # prompts that were prefilled
    has_span = bool(ends) and span > 0
    ttft = [r.token_times_s[0] - r.send_s for r in ok if r.token_times_s]
    tpot = [(r.token_times_s[-1] - r.token_times_s[0]) / (len(r.token_times_s) - 1)
            for r in ok if len(r.token_times_s) >= 2]
    itl = [b - a for r in ok for a, b in zip(r.token_times_s, r.token_times_s[1:])]
    e2e = [r.done_s - r.send_s for r in ok]
    lag = [r.send_s - r.scheduled_s for r in records if not math.isnan(r.send_s)]
    return {
        "mode": mode,
        "rate": "inf" if math.isinf(rate) else rate,
        "num_requests": len(records),
        "completed": len(ok),
        "cut_by_time_limit": cut,
        "failed": len(records) - len(ok) - cut,
        "errors": errors,
        "length_mismatches": sum(1 for r in ok if r.completion_tokens != r.requested_output_len
                                 or r.num_tokens_received != r.completion_tokens),
        "duration_s": span,
        "request_throughput": len(ok) / span if has_span else 0.0,
        "output_token_throughput": out_tokens / span if has_span else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / span if has_span else 0.0,
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
        "ttft_ms": _percentiles(ttft, 1e3),
        "tpot_ms": _percentiles(tpot, 1e3),
        "itl_ms": _percentiles(itl, 1e3),
        "e2e_ms": _percentiles(e2e, 1e3),
        "client_send_lag_ms_max": float(max(lag) * 1e3) if lag else None,
        "server": stats,
    }


def _record_dict(r: RequestRecord) -> dict:
    d = asdict(r)
    times = d.pop("token_times_s")
    d["ttft_s"] = times[0] - r.send_s if times else None
    d["tpot_s"] = (times[-1] - times[0]) / (len(times) - 1) if len(times) >= 2 else None
    return d


# ------------------------------------------------------------------------------------------------ the server

class ServerProcess:
    """`python -m cli serve` in its own session on free loopback ports; stop() leaves nothing behind."""

    def __init__(self, mode: str, cfg: BenchConfig, log_path: Path, *, ready_timeout_s: float,
                 latency_bound_ms: float | None = None):
        self.mode = mode.partition("@")[0]
        self.latency_bound_ms = latency_bound_ms
        self.cfg = cfg
        self.ready_timeout_s = ready_timeout_s
        self.log_path = log_path
        self.tmp = Path(tempfile.mkdtemp(prefix="neoserve-bench-"))
        self.state_file = self.tmp / "state.json"
        self.proc: subprocess.Popen | None = None
        self.state: dict = {}
        self.child_pids: dict[str, int] = {}

    def argv(self) -> list[str]:
        serve_args = list(self.cfg.serve_args)
        if self.cfg.client_cpu is not None and "--cpus" not in serve_args:
            others = [c for c in sorted(os.sched_getaffinity(0)) if c != self.cfg.client_cpu]
            serve_args += ["--cpus", ",".join(map(str, others))]
        # NOTE: no restarts: a worker that crashes mid-run must show up as failed requests, not as a hidden gap.
        engine_args = list(self.cfg.engine_args)
        if self.latency_bound_ms is not None:
            engine_args += ["--latency-bound-ms", f"{self.latency_bound_ms:.3f}"]
        return [sys.executable, "-m", "cli", "serve", *engine_args, "--mode", self.mode,
                "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--state-file", str(self.state_file),
                "--max-restarts", "0", "--drain-timeout-s", "5", "--ready-timeout-s", f"{self.ready_timeout_s:.0f}",
                *serve_args]

    def start(self) -> str:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        env.pop("OMP_NUM_THREADS", None)  # NOTE: the launcher sets every child's thread counts from its CPU plan
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv(), cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.ready_timeout_s + 5
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode} during start-up; "
                                   f"log: {self.log_path}\n{self.log_tail()}")
            if self.state_file.exists():
                try:
                    self.state = json.loads(self.state_file.read_text())
                except json.JSONDecodeError:
                    self.state = {}
                self.child_pids = dict(self.state.get("pids", {}))
                if self.state.get("address") and _serving(self.state["address"]):
                    return self.state["address"]
            time.sleep(0.3)
        raise RuntimeError(f"the server was not SERVING after {self.ready_timeout_s:.0f} s; log: "
                           f"{self.log_path}\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> dict:
        """SIGINT (drain), then SIGTERM, then SIGKILL; then kills any child still alive and removes /dev/shm
        segments named after our processes. Returns what had to be cleaned up (empty lists when shutdown was clean)."""
        report = {"exit_code": None, "escalated": [], "orphans_killed": [], "shm_removed": [], "pids": {}}
        if self.proc is not None:
            if self.state_file.exists():  # children may have been restarted: take the latest pids
                try:
                    self.child_pids = dict(json.loads(self.state_file.read_text()).get("pids", {}))
                except json.JSONDecodeError:
                    pass
            # NOTE: before it is SERVING the launcher has written no state file: find its children in /proc.
            known = set(self.child_pids.values())
            for pid in _children_of(self.proc.pid):
                if pid not in known:
                    self.child_pids[f"child-{pid}"] = pid
            for sig, wait_s in ((signal.SIGINT, 60.0), (signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
                if self.proc.poll() is not None:
                    break
                if sig != signal.SIGINT:
                    report["escalated"].append(sig.name)
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(wait_s)
                except subprocess.TimeoutExpired:
                    pass
            report["exit_code"] = self.proc.returncode
            pids = {name: pid for name, pid in self.child_pids.items() if pid}
            report["pids"] = {"launcher": self.proc.pid, **pids}
            deadline = time.monotonic() + 5.0
            while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
                time.sleep(0.1)  # NOTE: children die with the launcher (PDEATHSIG); give them a moment
            for name, pid in pids.items():
                if _alive(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                        report["orphans_killed"].append(name)
                    except ProcessLookupError:
                        pass
            owners = {str(p) for p in [*pids.values(), self.proc.pid]}
            shm = Path("/dev/shm")
            if shm.is_dir():
                for entry in shm.iterdir():
                    parts = entry.name.split("-")
                    if entry.name.startswith("neoserve-") and len(parts) > 1 and parts[1] in owners:
                        entry.unlink(missing_ok=True)
                        report["shm_removed"].append(entry.name)
            self._log.close()
            self.proc = None
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)
        return report


def _die_with_parent() -> None:
    """Runs in the launcher between fork and exec: SIGTERM it (it then drains and stops its children) if this
    process dies, even by SIGKILL, so a benchmark killed by a timeout leaves no server behind."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _children_of(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == parent:
                pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(")") + 2:].split()[0] not in ("Z", "X")


def _serving(address: str) -> bool:
    """The gateway's own health check (SERVING needs every process up), else a ModelInfo call that succeeds."""
    with grpc.insecure_channel(address) as channel:
        try:
            from grpc_health.v1 import health_pb2, health_pb2_grpc
        except ImportError:
            health_pb2 = None
        try:
            if health_pb2 is not None:
                resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                return resp.status == health_pb2.HealthCheckResponse.SERVING
            pb_grpc.InferenceServiceStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=2)
            return True
        except grpc.RpcError:
            return False


# ---------------------------------------------------------------------------------------------------- driving

class LoadGenerator:
    """Drives one running server: warm-up, then one Poisson run per rate."""

    def __init__(self, cfg: BenchConfig, address: str, sampler: StatsSampler):
        self.cfg = cfg
        self.address = address
        self.sampler = sampler
        self.channels = [grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 1 << 26)])
                         for _ in range(cfg.channels)]
        # NOTE: a few HTTP/2 connections instead of one, so one connection's flow control does not serialise
        # hundreds of streams.
        self.stubs = [pb_grpc.InferenceServiceStub(c) for c in self.channels]

    async def close(self) -> None:
        for c in self.channels:
            await c.close()

    async def model_info(self) -> pb.ModelInfoResponse:
        return await self.stubs[0].ModelInfo(pb.ModelInfoRequest(), timeout=30)

    async def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Waits until the worker runs and queues nothing (previous rate's stragglers, warm-up)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            s = await self.sampler.sample()
            if s is None or (not s.get("num_running") and not s.get("num_waiting")):
                return
            await asyncio.sleep(0.2)

    async def warmup(self, specs: list[RequestSpec]) -> None:
        if not specs:
            return
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        recs = [RequestRecord(-1 - i, s.output_len) for i, s in enumerate(specs)]
        await asyncio.gather(*(drive_one(self.stubs[i % len(self.stubs)], s, r, t0, self.cfg.temperature,
                                         self.cfg.rate_timeout_s) for i, (s, r) in enumerate(zip(specs, recs))))
        bad = [r.error for r in recs if not r.ok]
        if bad:
            raise RuntimeError(f"warm-up requests failed: {bad}")

    async def run_rate(self, rate: float, specs: list[RequestSpec], offsets: np.ndarray, *, send_window_s: float,
                       time_limit_s: float, bar=None) -> tuple[list[RequestRecord], list[dict]]:
        """Sends specs[i] at offsets[i] (none after send_window_s), cancels what is open at time_limit_s."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        stop_sampling = asyncio.Event()
        sampler_task = asyncio.create_task(self.sampler.run(stop_sampling, t0))
        records: list[RequestRecord] = []
        tasks: list[asyncio.Task] = []
        hard_deadline = t0 + time_limit_s

        def on_done(_task) -> None:
            if bar is not None:
                bar.update(1)

        for i, (spec, offset) in enumerate(zip(specs, offsets)):
            if offset > send_window_s:
                break
            delay = t0 + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if loop.time() >= hard_deadline:
                break
            rec = RequestRecord(i, spec.output_len, scheduled_s=float(offset),
                                prompt_tokens=len(spec.prompt_token_ids or ()))
            records.append(rec)
            task = asyncio.create_task(drive_one(self.stubs[i % len(self.stubs)], spec, rec, t0, cfg.temperature,
                                                 hard_deadline - loop.time()))
            task.add_done_callback(on_done)
            tasks.append(task)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=max(0.0, hard_deadline - loop.time()) + 2.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        stop_sampling.set()
        samples = await sampler_task
        return records, samples


class TimeBudget:
    """Splits what is left of --budget-s over the runs still to do, so the whole benchmark ends in time.

    NOTE: before the first server has started, a mode's fixed cost (start-up, warm-up, shutdown) is a guess;
    afterwards the measured one is used. Each run sends for SEND_SHARE of its slot and lets the rest drain."""

    SEND_SHARE = 0.6
    SHUTDOWN_RESERVE_S = 20.0

    def __init__(self, budget_s: float | None):
        self.deadline = time.monotonic() + budget_s if budget_s else None
        self.mode_overhead_s = 60.0

    def remaining(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def slot(self, modes_after: int, runs_left: int) -> float:
        """Seconds the next run may take, leaving room for this mode's shutdown and the later modes."""
        left = self.remaining() - self.SHUTDOWN_RESERVE_S - modes_after * self.mode_overhead_s
        return left / max(1, runs_left)


async def bench_server(cfg: BenchConfig, mode: str, address: str, worker_address: str | None,
                       metrics_url: str | None, results: dict, budget: TimeBudget, modes_after: int) -> None:
    sampler = StatsSampler(worker_address, metrics_url, cfg.sample_interval_s)
    gen = LoadGenerator(cfg, address, sampler)
    try:
        info = await gen.model_info()
        results.setdefault("model", {
            "model_id": info.model_id, "architecture": info.architecture, "vocab_size": info.vocab_size,
            "max_model_len": info.max_model_len, "device": info.device})
        if info.mode and info.mode != mode.partition("@")[0]:
            print(f"serve.py: warning: the server reports mode {info.mode!r}, expected {mode!r}", file=sys.stderr)
        rng = np.random.default_rng(cfg.seed)  # NOTE: same seed per mode: every mode gets the same workload

        def make(n: int) -> list[RequestSpec]:
            if cfg.prompt_file:
                return file_requests(n, cfg, rng)
            return synthetic_requests(n, cfg, rng, vocab_size=info.vocab_size, max_model_len=info.max_model_len)

        await gen.warmup(make(cfg.warmup))
        results["timing"].setdefault(mode, {})["ready_and_warm_s"] = time.monotonic() - results["timing"][mode]["t0"]
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.num_requests * len(cfg.rates), desc=f"{mode}", unit="req", file=sys.stderr,
                       dynamic_ncols=True)
        try:
            for i, rate in enumerate(cfg.rates):
                specs = make(cfg.num_requests)
                offsets = poisson_offsets(len(specs), rate, rng)
                await gen.wait_idle(timeout_s=min(60.0, max(1.0, budget.remaining() / 10)))
                slot = budget.slot(modes_after, len(cfg.rates) - i)
                time_limit = min(cfg.rate_timeout_s, slot)
                send_window = min(cfg.duration_s or math.inf, budget.SEND_SHARE * slot)
                if time_limit < 5.0:
                    print(f"serve.py: {mode} rate {rate:g}: skipped, the time budget is spent", file=sys.stderr)
                    results["skipped"].append({"mode": mode, "rate": "inf" if math.isinf(rate) else rate})
                    continue
                if bar is not None:
                    bar.set_postfix_str(f"rate {rate:g}/s")
                records, samples = await gen.run_rate(rate, specs, offsets, send_window_s=send_window,
                                                      time_limit_s=time_limit, bar=bar)
                if bar is not None:
                    bar.update(len(specs) - len(records))  # NOTE: requests never sent (send window over)
                summary = summarize_rate(mode, rate, records, summarize_stats(samples))
                summary["server"]["source"] = sampler.source
                summary["mode_reported"] = info.mode
                summary["send_window_s"] = None if math.isinf(send_window) else send_window
                summary["time_limit_s"] = time_limit
                results["runs"].append(summary)
                results["requests"].append({"mode": mode, "rate": summary["rate"],
                                            "records": [_record_dict(r) for r in records]})
        finally:
            if bar is not None:
                bar.close()
    finally:
        await gen.close()
        await sampler.close()


def latency_bound_ms(mode: str, runs: list[dict]) -> float | None:
    """The --latency-bound-ms of a mode spec: None for a plain mode, the number of `auto@MS`, and for
    `auto@baseline` the largest p50 per-token latency among the baseline's runs so far."""
    _, _, bound = mode.partition("@")
    if not bound:
        return None
    if bound != "baseline":
        return float(bound)
    tpots = [r["tpot_ms"]["p50"] for r in runs if r["mode"] == BASELINE_MODE and r["tpot_ms"]["p50"] is not None]
    if not tpots:
        raise ValueError(f"{mode}: skipped, {BASELINE_MODE} measured no per-token latency to bound it with")
    return max(tpots)


def run(cfg: BenchConfig, argv: list[str] | None = None) -> dict:
    """Runs the whole benchmark; returns the results dict (also written to cfg.out)."""
    from bench.plot import comparisons, markdown_tables, plot_curves

    budget = TimeBudget(cfg.budget_s)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.client_cpu is not None:
        os.sched_setaffinity(0, {cfg.client_cpu})
    results: dict = {
        "meta": _meta(cfg, argv),
        "config": {k: (str(v) if isinstance(v, LengthDist) else v) for k, v in asdict(cfg).items()
                   if k not in ("input_len", "output_len")} | {"input_len": str(cfg.input_len),
                                                                 "output_len": str(cfg.output_len)},
        "runs": [], "requests": [], "shutdown": {}, "mode_errors": {}, "skipped": [], "timing": {},
    }
    results["config"]["rates"] = ["inf" if math.isinf(r) else r for r in cfg.rates]
    from neoserve import aio

    runner = aio.run
    if cfg.address:
        metrics_url = f"http://127.0.0.1:{cfg.metrics_port}/metrics" if cfg.metrics_port else None
        with grpc.insecure_channel(cfg.address) as ch:
            mode = pb_grpc.InferenceServiceStub(ch).ModelInfo(pb.ModelInfoRequest(), timeout=30).mode or "external"
        results["timing"][mode] = {"t0": time.monotonic()}
        runner(bench_server(cfg, mode, cfg.address, None, metrics_url, results, budget, 0))
    else:
        for k, mode in enumerate(cfg.modes):
            modes_after = len(cfg.modes) - k - 1
            ready_s = min(cfg.ready_timeout_s, budget.remaining() - budget.SHUTDOWN_RESERVE_S
                          - modes_after * budget.mode_overhead_s)
            if ready_s < 10:
                results["mode_errors"][mode] = "skipped: the time budget is spent"
                continue
            try:
                bound = latency_bound_ms(mode, results["runs"])
            except ValueError as e:
                results["mode_errors"][mode] = str(e)
                continue
            if bound is not None:
                results.setdefault("latency_bounds_ms", {})[mode] = bound
            server = ServerProcess(mode, cfg, out / f"server-{mode}.log", ready_timeout_s=ready_s,
                                   latency_bound_ms=bound)
            timing = results["timing"][mode] = {"t0": time.monotonic()}
            try:
                address = server.start()
                metrics_port = server.state.get("metrics_port")
                runner(bench_server(cfg, mode, address, server.state.get("worker_address"),
                                    f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port else None, results,
                                    budget, modes_after))
            except (RuntimeError, grpc.RpcError, OSError) as e:
                # NOTE: one mode failing (e.g. not implemented yet) must not cost the others their run.
                print(f"serve.py: mode {mode} failed: {e}", file=sys.stderr)
                results["mode_errors"][mode] = str(e)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop this server, skip the rest, report what ran
                print(f"serve.py: interrupted during mode {mode}; stopping the server", file=sys.stderr)
                results["mode_errors"][mode] = "interrupted"
                results["interrupted"] = True
            finally:
                t_stop = time.monotonic()
                results["shutdown"][mode] = server.stop()
                timing["shutdown_s"] = time.monotonic() - t_stop
                if "ready_and_warm_s" in timing:
                    budget.mode_overhead_s = timing["ready_and_warm_s"] + timing["shutdown_s"] + 5.0
            if results.get("interrupted"):
                break
    for timing in results["timing"].values():
        timing.pop("t0", None)
    results["comparisons"] = comparisons(results["runs"])
    (out / "serve.json").write_text(json.dumps(results, indent=1, default=_json_default))
    tables = markdown_tables(results)
    (out / "serve.md").write_text(tables + "\n")
    results["plot"] = plot_curves(results["runs"], out / "serve.png", title=_plot_title(results))
    print(tables)
    print(f"\nwrote {out / 'serve.json'}, {out / 'serve.md'}" + (f", {results['plot']}" if results["plot"] else ""))
    return results


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return str(x)


def _plot_title(results: dict) -> str:
    m = results.get("model", {})
    c = results["config"]
    return f"{m.get('model_id', '?')} on {m.get('device', '?')}; in {c['input_len']}, out {c['output_len']}"


def _meta(cfg: BenchConfig, argv: list[str] | None) -> dict:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
        "commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None,
        "command": " ".join(shlex.quote(a) for a in ["python", "bench/serve.py", *(argv or [])]),
    }


# -------------------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/serve.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="gpu-only,auto",
                   help="comma-separated modes to compare: gpu-only, auto, cpu-all, auto@MS (auto under a latency "
                        "bound of MS ms), auto@baseline (bound = gpu-only's largest p50 per-token latency)")
    p.add_argument("--rates", default="1,2,4", help="comma-separated request rates in req/s; 'inf' = all at once")
    p.add_argument("--num-requests", type=int, default=64, help="requests per rate (default: 64)")
    p.add_argument("--duration-s", type=float, default=None, help="also stop sending after this many seconds")
    p.add_argument("--rate-timeout-s", type=float, default=600.0,
                   help="cancel what is still open this long after a rate began (default: 600)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="end the whole benchmark within this many seconds: each rate gets a share of what is left "
                        "(sends for 60%% of it, then drains), later modes' start-up reserved")
    p.add_argument("--input-len", default="128", help="prompt tokens: N, uniform:LO:HI or normal:MEAN:STD")
    p.add_argument("--output-len", default="64", help="output tokens (ignore_eos): N, uniform:LO:HI, normal:MEAN:STD")
    p.add_argument("--prompt-file", default=None, help="JSONL prompts (prompt | prompt_token_ids | messages, "
                                                       "optional output_len) instead of random token ids")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests per mode, excluded (default: 2)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (same workload for every mode)")
    p.add_argument("--engine-args", default="", help="engine flags passed to `neoserve serve`, e.g. "
                                                     "\"--model random:llama-3-8b --gpu-kv-tokens 4000\"")
    p.add_argument("--serve-args", default="", help="other `neoserve serve` flags, e.g. \"--cpus 1-15\"")
    p.add_argument("--address", default=None, help="benchmark an already running loopback server (no launcher)")
    p.add_argument("--metrics-port", type=int, default=None, help="with --address: its Prometheus port")
    p.add_argument("--ready-timeout-s", type=float, default=600.0, help="server start-up limit (default: 600)")
    p.add_argument("--sample-interval-s", type=float, default=0.1, help="stats sampling period (default: 0.1)")
    p.add_argument("--channels", type=int, default=4, help="gRPC connections the client spreads requests over")
    p.add_argument("--client-cpu", default="auto",
                   help="pin this process to that core and keep the server off it; 'auto': core 0 when the host has "
                        ">= 4 cores; 'none': no pinning")
    p.add_argument("--out", default=None, help="output folder (default: $OUT when set, else bench/results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quick", action="store_true",
                   help="smoke run in seconds: one mode (the first of --modes), rate 4, 6 requests, 16 in / 8 out")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rates = [parse_rate(r) for r in args.rates.split(",") if r.strip()]
    input_len, output_len = args.input_len, args.output_len
    num_requests, warmup = args.num_requests, args.warmup
    if args.quick:
        modes, rates, num_requests, warmup = modes[:1], [4.0], 6, 1
        input_len, output_len = "16", "8"
    cpus = sorted(os.sched_getaffinity(0))
    if args.client_cpu == "auto":
        client_cpu = cpus[0] if len(cpus) >= 4 and not args.address else None
    elif args.client_cpu == "none":
        client_cpu = None
    else:
        client_cpu = int(args.client_cpu)
        if client_cpu not in cpus:
            raise ValidationError("client_cpu", f"core {client_cpu} is not in this process's affinity {cpus}")
    out = args.out or os.environ.get("OUT") or str(ROOT / "bench" / "results")
    return BenchConfig(
        modes=modes, rates=rates, num_requests=num_requests, duration_s=args.duration_s,
        rate_timeout_s=args.rate_timeout_s, budget_s=args.budget_s, input_len=LengthDist.parse(input_len, "input_len"),
        output_len=LengthDist.parse(output_len, "output_len"), prompt_file=args.prompt_file, warmup=warmup,
        temperature=args.temperature, seed=args.seed, engine_args=shlex.split(args.engine_args),
        serve_args=shlex.split(args.serve_args), address=args.address, metrics_port=args.metrics_port,
        ready_timeout_s=args.ready_timeout_s, sample_interval_s=args.sample_interval_s, channels=args.channels,
        client_cpu=client_cpu, out=out, progress=not args.no_progress)


def _exit_on_sigterm(signum, frame) -> None:
    # NOTE: SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the `finally` blocks stop the server.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValidationError as e:
        print(f"serve.py: {e}", file=sys.stderr)
        return 2
    results = run(cfg, argv)
    failed = sum(r["failed"] for r in results["runs"])
    cut = sum(r["cut_by_time_limit"] for r in results["runs"])
    if cut:
        print(f"serve.py: note: {cut} requests were cut by the time limit (see cut_by_time_limit)", file=sys.stderr)
    unclean = {m: s for m, s in results["shutdown"].items()
               if s.get("escalated") or s.get("orphans_killed") or s.get("shm_removed")}
    if unclean:
        print(f"serve.py: warning: unclean shutdown: {unclean}", file=sys.stderr)
    return 1 if failed or results["mode_errors"] or not results["runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
