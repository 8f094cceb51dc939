"""The performance model the NEO scheduler plans with, profiled at start-up and cached in a JSON file per set of
what the measurement depends on (profile_key: model shape, dtypes, device, host CPU, threads, ring spin, graphs,
torch version), so a restart on the same host reuses it.

It predicts, for one whole forward (all layers):
- gpu_time(tokens, context, decode_only): projections + MLP of `tokens` tokens on the worker device (interpolated
  between profiled batch sizes; with --cuda-graphs, decode-only batches up to the largest bucket from graph replays)
  plus device decode attention per context token;
- cpu_time(batch, context): one sub-batch's hand-off to the sidecar and its decode attention, per layer summed
  over layers, measured through the worker's own hand-off (ModelRunner.stage_cpu_rows / submit_cpu_rows /
  collect_cpu_rows: device -> request ring slot, event wait, the sidecar's kernel with the new token's K/V
  appended, response ring, pinned host -> device). So PCIe time and every fixed cost of a call are in it (NEO
  leaves PCIe time out of its model; we do not): a fixed part per call, a part per sequence and a part per context
  token.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gpu_worker.attention import decode_attention

log = logging.getLogger(__name__)

LINEAR_POINTS = (1, 8, 32, 128, 512)
PROFILE_SEQ_ID_BASE = 2**62  # sequence ids no request uses
# The hand-off profile's probe: PROBE_SEQS short sequences (up to 16 tokens) and PROBE_SEQS long ones (up to 512,
# fewer when the sidecar's KV budget is small) in the sidecar at once; it needs PROBE_MIN_BLOCKS of its KV blocks.
PROBE_SEQS = 4
PROBE_MIN_BLOCKS = 12
FORMAT_VERSION = 4
# NOTE: a cache file no start has read for this long is deleted (its hardware or settings are likely gone); every
# hit refreshes its file's mtime, so a file in use never ages out.
CACHE_MAX_AGE_S = 30 * 24 * 3600
TMP_MAX_AGE_S = 3600  # a save interrupted this long ago left its .tmp file behind for good
# A saved PerfModel file to plan with instead of profiling (tests and comparisons that must not depend on how busy
# the machine was when the worker started). Its key is not checked: it is used as it is.
FIXED_MODEL_ENV = "NEOSERVE_PERF_MODEL"


def cache_dir() -> Path:
    return Path(os.environ.get("NEOSERVE_CACHE_DIR", Path.home() / ".cache" / "neoserve")) / "perf_model"


def cache_path(key: str) -> Path:
    """The cache file of a profile key: a digest of the key (the file holds the key itself, for a reader and for
    load_or_profile's check)."""
    return cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


@dataclass
class PerfModel:
    key: str
    linear: list[tuple[int, float]]  # (tokens, seconds) for all layers' projections and MLP
    gpu_attn_per_token: float  # seconds per context token, all layers
    cpu_attn_base: float  # seconds per sub-batch hand-off (one sidecar call per layer), all layers
    cpu_attn_per_seq: float  # seconds per sequence in it, all layers
    cpu_attn_per_token: float  # seconds per context token, all layers

    # (tokens, seconds) as decode-only batches run with --cuda-graphs (up to the largest graph bucket); empty without
    linear_graphs: list[tuple[int, float]] = field(default_factory=list)

    def gpu_time(self, num_tokens: int, context_tokens: int, decode_only: bool = False) -> float:
        if num_tokens <= 0:
            return 0.0
        graphed = decode_only and self.linear_graphs and num_tokens <= self.linear_graphs[-1][0]
        linear = _interpolate(self.linear_graphs if graphed else self.linear, num_tokens)
        return linear + context_tokens * self.gpu_attn_per_token

    def cpu_time(self, batch: int, context_tokens: int) -> float:
        if batch <= 0:
            return 0.0
        return self.cpu_attn_base + batch * self.cpu_attn_per_seq + context_tokens * self.cpu_attn_per_token

    def describe(self) -> str:
        """One line of what the scheduler plans with (logged at start-up; BENCHMARKS.md readings quote it)."""
        linear = ", ".join(f"{t} tok {1e3 * sec:.2f} ms" for t, sec in self.linear)
        if self.linear_graphs:
            linear += " (graphs: " + ", ".join(f"{t} tok {1e3 * sec:.2f} ms" for t, sec in self.linear_graphs) + ")"
        return (f"performance model: device forward {linear}; device attention {1e9 * self.gpu_attn_per_token:.1f} "
                f"ns/context token; CPU sub-batch {1e3 * self.cpu_attn_base:.2f} ms + "
                f"{1e3 * self.cpu_attn_per_seq:.3f} ms/sequence + {1e9 * self.cpu_attn_per_token:.1f} ns/context "
                f"token (all layers)")

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": FORMAT_VERSION, **asdict(self)}))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "PerfModel | None":
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if data.pop("version", None) != FORMAT_VERSION:
            return None
        data["linear"] = [tuple(p) for p in data["linear"]]
        data["linear_graphs"] = [tuple(p) for p in data.get("linear_graphs", [])]
        return cls(**data)


def _interpolate(points: list[tuple[int, float]], x: int) -> float:
    """Piecewise-linear through (tokens, seconds) points; extrapolates linearly past either end."""
    if len(points) == 1:
        return points[0][1]
    xs = [p[0] for p in points]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.0)


def _timed(fn, device: torch.device, reps: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def profile(runner, sidecar) -> PerfModel:
    """Measures the running worker (runner: ModelRunner) and its sidecar (SidecarClient)."""
    model, mc, dev, dtype = runner.model, runner.model_config, runner.device, runner.dtype
    layers = mc.num_layers

    def inputs(t: int):
        x = torch.randn(t, mc.hidden_size, device=dev, dtype=dtype)  # [t, hidden]
        attn = torch.randn(t, mc.q_size, device=dev, dtype=dtype)  # [t, Hq * D]
        return x, attn, model.rope_tables(torch.arange(t, device=dev) % runner.max_model_len)

    linear = []
    for t in LINEAR_POINTS:
        x, attn, rope = inputs(t)
        linear.append((t, _timed(lambda: (model.pre_attention(0, x, rope), model.post_attention(0, x, attn)),
                                 dev) * layers))
    linear_graphs = []
    if runner.graphs is not None:
        # NOTE: decode-only batches up to the largest bucket replay graphs, the others (prefills, bigger batches)
        # run eagerly: one curve each, as launch overheads make them differ most at small sizes.
        top = runner.graphs.buckets[-1]
        for t in sorted({p for p in LINEAR_POINTS if p <= top} | {top}):
            x, _, rope = inputs(t)
            graphed = runner.graphs.start("A", x, rope)
            linear_graphs.append((t, _timed(lambda: (graphed.pre(0), graphed.post(0)), dev) * layers))

    b, ctx = 8, 512
    q = torch.randn(b, mc.num_heads, mc.head_dim, device=dev, dtype=dtype)
    kv = torch.randn(b, ctx, mc.num_kv_heads, mc.head_dim, device=dev, dtype=dtype)
    mask = torch.ones(b, 1, 1, ctx, dtype=torch.bool, device=dev)
    gpu_attn = _timed(lambda: decode_attention(q, kv, kv, mask, model.scale), dev) * layers / (b * ctx)

    cpu_base, cpu_per_seq, cpu_per_token = _profile_hand_off(runner, sidecar)
    return PerfModel(key=profile_key(runner, sidecar), linear=linear, gpu_attn_per_token=gpu_attn,
                     cpu_attn_base=cpu_base * layers, cpu_attn_per_seq=cpu_per_seq * layers,
                     cpu_attn_per_token=cpu_per_token * layers, linear_graphs=linear_graphs)


def _profile_hand_off(runner, sidecar) -> tuple[float, float, float]:
    """Seconds per layer of one sub-batch's CPU attention, as the step runs it: (per call, per sequence, per context
    token), from three probes (1 and PROBE_SEQS short sequences, PROBE_SEQS long ones)."""
    mc, dev, dtype = runner.model_config, runner.device, runner.dtype
    stats = sidecar.stats(per_sequence=False)
    block = int(stats["kv_stats"].get("block_size", 128)) or 128
    if int(stats["blocks_total"]) < PROBE_MIN_BLOCKS:
        raise ValueError(f"cpu_kv_gib: the sidecar's KV cache holds {stats['blocks_total']} blocks of {block} tokens; "
                         f"the profile needs at least {PROBE_MIN_BLOCKS}")
    short = min(16, block)
    long = min(512, (int(stats["blocks_total"]) // PROBE_SEQS - 1) * block)  # the long and the short ones fit
    ids = [PROFILE_SEQ_ID_BASE + i for i in range(2 * PROBE_SEQS)]  # short ones first, then the long ones
    q = torch.randn(PROBE_SEQS, mc.num_heads, mc.head_dim, device=dev, dtype=dtype)
    kv = torch.randn(PROBE_SEQS, mc.num_kv_heads, mc.head_dim, device=dev, dtype=dtype)
    sidecar.create_sequences(ids)
    try:
        for i, s in enumerate(ids):
            n = (short if i < PROBE_SEQS else long) - 1  # the probe appends the last token, as a decode step does
            k = torch.randn(n, mc.num_kv_heads, mc.head_dim)
            sidecar.upload_kv(s, 0, 0, k, k)

        def probe(seqs: list[int], context: int) -> float:
            def one_call():
                n = len(seqs)
                staged = runner.stage_cpu_rows(0, seqs, [context] * n, q, kv, kv)
                ticket = runner.submit_cpu_rows(staged)
                runner.collect_cpu_rows(ticket, q.new_empty(n, mc.q_size), n)
            return _timed(one_call, dev, reps=5)

        t1s, t4s, t4l = probe(ids[:1], short), probe(ids[:PROBE_SEQS], short), probe(ids[PROBE_SEQS:], long)
    finally:
        sidecar.free_sequences(ids)
    per_token = max(t4l - t4s, 1e-9) / (PROBE_SEQS * (long - short))
    per_seq = max((t4s - t1s) / (PROBE_SEQS - 1) - short * per_token, 0.0)
    base = max(t1s - per_seq - short * per_token, 0.0)
    return base, per_seq, per_token


# Worker settings that do not change what the profile measures, or whose effect the key holds resolved (the dtype
# and device in use, the torch threads, the sidecar's threads as it reports them, the graph buckets in use).
# NOTE: an exclusion list, not an inclusion list: a new setting counts until it is listed here. A key that holds
# too much costs one profile; one that holds too little plans with another machine's or setting's figures.
NOT_MEASURED = frozenset({
    "model", "dtype", "device", "sidecar", "seed", "mode", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
    "gpu_kv_gib", "gpu_kv_tokens", "latency_bound_ms", "max_cpu_wait_steps", "threads", "cpu_attn_threads",
    "cuda_graphs", "cuda_graph_max_batch",
})


def profile_key(runner, sidecar) -> str:
    """What the measurement depends on, and nothing else: the model's shape (and how its file stores the weights),
    the resolved dtype and device, the host CPU (the sidecar's kernel and every hand-off run on it), the worker's
    torch threads and the sidecar's, the CUDA graph buckets, the torch version, and every worker setting not in
    NOT_MEASURED (the sidecar KV's dtype and budget, the ring spin, ...). Not the sidecar's address: the launcher
    gives each start a fresh random socket path, and a key holding it never hit."""
    mc, cfg = runner.model_config, runner.config
    device = torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda" else "cpu"
    parts = {
        "model": f"{mc.architecture}-L{mc.num_layers}-H{mc.hidden_size}-I{mc.intermediate_size}-h{mc.num_heads}-"
                 f"kv{mc.num_kv_heads}-d{mc.head_dim}-V{mc.vocab_size}",
        # NOTE: getattr: a model config from before the field (or a test's stand-in) stores dense weights
        "stored_as": getattr(mc, "source_quantization", None),
        "dtype": str(runner.dtype).removeprefix("torch."),
        "device": device,
        "host_cpu": _host_cpu(),
        "worker_threads": torch.get_num_threads(),
        "sidecar_threads": _sidecar_threads(sidecar, cfg.cpu_attn_threads),
        "cuda_graphs": runner.graphs.buckets[-1] if runner.graphs is not None else 0,
        "torch": torch.__version__,
    }
    parts.update((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in NOT_MEASURED)
    return ";".join(f"{name}={value}" for name, value in parts.items())


def _host_cpu() -> str:
    """The host CPU's model name (Linux /proc/cpuinfo), else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown"


def _sidecar_threads(sidecar, configured: int) -> int:
    """The threads the running sidecar reports: a launcher-started one gets its own --threads, which the worker's
    --cpu-attn-threads (used only by a sidecar the worker spawns) does not know."""
    try:
        return int(sidecar.health().threads) or configured
    except Exception:  # NOTE: no sidecar, or one that cannot say: the key falls back to the worker's setting
        return configured


def prune_cache(keep: Path, now: float | None = None) -> list[Path]:
    """Deletes the cache files no start will read again, all but `keep`: unreadable ones and other format versions,
    names of an older scheme, files unread for CACHE_MAX_AGE_S, and .tmp files of saves interrupted long ago.
    Returns what it deleted."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(cache_dir().iterdir())
    except OSError:
        return removed
    for path in entries:
        if path == keep:
            continue
        try:
            age = now - path.stat().st_mtime
        except OSError:  # NOTE: another start pruned it first
            continue
        if path.suffix == ".tmp":
            stale = age > TMP_MAX_AGE_S
        elif path.suffix == ".json":
            stale = age > CACHE_MAX_AGE_S or not _is_digest(path.stem) or PerfModel.load(path) is None
        else:
            continue  # not ours
        if stale:
            try:
                path.unlink()
                removed.append(path)
            except OSError as e:
                log.debug("could not prune %s: %s", path, e)
    if removed:
        log.info("pruned %d stale performance-model cache files from %s", len(removed), cache_dir())
    return removed


def _is_digest(stem: str) -> bool:
    """Whether a cache file's name is cache_path's digest; an older scheme named files by their readable key."""
    return len(stem) == 16 and all(c in "0123456789abcdef" for c in stem)


def load_or_profile(runner, sidecar) -> PerfModel:
    fixed = os.environ.get(FIXED_MODEL_ENV)
    if fixed:
        model = PerfModel.load(Path(fixed))
        if model is None:
            raise ValueError(f"{FIXED_MODEL_ENV}={fixed}: not a readable performance model file (format version "
                             f"{FORMAT_VERSION}, as load_or_profile saves them)")
        log.info("performance model from %s (%s; not profiled): %s", fixed, FIXED_MODEL_ENV, model.describe())
        return model
    key = profile_key(runner, sidecar)
    path = cache_path(key)
    cached = PerfModel.load(path)
    if cached is not None and cached.key == key:  # NOTE: the name is a digest: the key inside settles a collision
        with contextlib.suppress(OSError):
            os.utime(path)  # NOTE: marks it read, so prune_cache keeps a file in use however old its profile
        log.info("performance model from %s: %s", path, cached.describe())
        prune_cache(keep=path)
        return cached
    t0 = time.perf_counter()
    model = profile(runner, sidecar)
    try:
        model.save(path)
    except OSError as e:  # a read-only home is no reason to fail start-up
        log.warning("could not cache the performance model at %s: %s", path, e)
    log.info("profiled the performance model in %.1f s", time.perf_counter() - t0)
    log.info("%s", model.describe())
    prune_cache(keep=path)
    return model
