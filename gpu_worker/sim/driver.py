"""The discrete-event simulation: the worker's real Scheduler and PipelinePlanner, built as LLMEngine builds them,
stepped on a virtual clock, each step costed by the roofline instead of running the model.

Events are request arrivals and step ends. Between them nothing changes, so the driver jumps the clock: to the next
arrival when nothing is left to run, else by the step's roofline time. After each step it does what
LLMEngine._postprocess does (advance computed tokens, append one token where the step samples, finish at max_tokens
or the context length) with a placeholder token, since every request runs to its given output length (ignore_eos,
as bench/serve.py sends them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gpu_worker.block_manager import BlockManager, CpuKVBudget
from gpu_worker.pipeline_planner import PipelinePlanner
from gpu_worker.scheduler import Scheduler, SchedulerConfig
from gpu_worker.sequence import Sequence, SequenceStatus
from gpu_worker.sim.clock import VirtualClock
from gpu_worker.sim.model_shape import DTYPE_BYTES
from gpu_worker.sim.roofline import Roofline
from gpu_worker.sim.workload import Request
from neoserve.sampling_params import SamplingParams

GIB = 1 << 30
SIDECAR_BLOCK = 128  # tokens per block of the sidecar's KV cache (cpu_attn.kv_cache.DEFAULT_BLOCK_SIZE)
CUDA_ACTIVATION_RESERVE = 2 * GIB  # as gpu_worker.model_runner: left free for activations on a GPU
DEFAULT_CPU_DEVICE_KV_GIB = 1.0  # as gpu_worker.model_runner.DEFAULT_CPU_KV_GIB
PLACEHOLDER_TOKEN = 7
MAX_IDLE_STEPS = 10_000  # empty steps in a row before the driver calls the run stuck


@dataclass
class SimConfig:
    """The engine flags a run is simulated with (the same names as `neoserve serve`'s)."""

    mode: str = "gpu-only"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    block_size: int = 16
    gpu_kv_tokens: int | None = None
    gpu_kv_gib: float | None = None
    cpu_kv_gib: float = 4.0
    cpu_kv_dtype: str = "float32"
    latency_bound_ms: float | None = None
    max_cpu_wait_steps: int = 4


@dataclass
class RequestResult:
    arrival_s: float
    input_len: int
    output_len: int
    first_token_s: float | None = None
    last_token_s: float | None = None
    tokens: int = 0
    failed: str | None = None


@dataclass
class SimResult:
    mode: str
    requests: list[RequestResult]
    end_s: float
    steps: int
    pipelined_steps: int
    cpu_decodes: int
    decodes: int
    preemptions: int
    swap_outs: int
    swap_ins: int
    gpu_blocks: int
    cpu_blocks: int
    gpu_kv_use_mean: float
    gpu_kv_use_peak: float
    cpu_kv_use_mean: float
    cpu_kv_use_peak: float
    wall_s: float
    planner_overhead_s: dict = field(default_factory=dict)


def gpu_kv_blocks(cfg: SimConfig, roofline: Roofline, device_kind: str, device_memory: float | None) -> int:
    """The device KV cache's blocks, as ModelRunner._num_kv_blocks sizes it."""
    per_block = cfg.block_size * roofline.kv_bytes_per_token
    if cfg.gpu_kv_gib is not None:
        budget = cfg.gpu_kv_gib * GIB
    elif device_kind == "cpu" or device_memory is None:
        budget = DEFAULT_CPU_DEVICE_KV_GIB * GIB
    else:
        budget = max(0.0, device_memory * 0.9 - roofline.weight_bytes - CUDA_ACTIVATION_RESERVE)
    blocks = int(budget // per_block)
    if cfg.gpu_kv_tokens is not None:
        blocks = min(blocks, cfg.gpu_kv_tokens // cfg.block_size)
    if blocks < 1:
        raise ValueError(f"the device KV budget holds no {cfg.block_size}-token block")
    return blocks


def cpu_kv_blocks(cfg: SimConfig, roofline: Roofline) -> int:
    """The sidecar's blocks (its head dimension padded to 32 values, as cpu_attn.kernel.Geometry lays them out)."""
    s = roofline.shape
    padded = -(-s.head_dim // 32) * 32
    block_bytes = s.num_layers * s.num_kv_heads * SIDECAR_BLOCK * (s.head_dim + padded) * DTYPE_BYTES[cfg.cpu_kv_dtype]
    return int(cfg.cpu_kv_gib * GIB // block_bytes)


def make_scheduler(cfg: SimConfig, roofline: Roofline, num_gpu_blocks: int, num_cpu_blocks: int) -> Scheduler:
    """The scheduler as LLMEngine.__init__ builds it: the planner has a cost model in auto only."""
    bound = cfg.latency_bound_ms / 1000 if cfg.latency_bound_ms else None
    planner = PipelinePlanner(roofline if cfg.mode == "auto" else None, latency_bound_s=bound,
                              max_wait_steps=cfg.max_cpu_wait_steps)
    cpu_budget = CpuKVBudget(num_cpu_blocks, SIDECAR_BLOCK) if cfg.mode != "gpu-only" else None
    return Scheduler(SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len, mode=cfg.mode),
                     BlockManager(num_gpu_blocks, cfg.block_size), cpu_budget, planner)


def simulate(requests: list[Request], cfg: SimConfig, roofline: Roofline, num_gpu_blocks: int,
             num_cpu_blocks: int) -> SimResult:
    wall0 = time.perf_counter()
    sched = make_scheduler(cfg, roofline, num_gpu_blocks, num_cpu_blocks)
    clock = VirtualClock()
    results = [RequestResult(r.arrival_s, r.input_len, r.output_len) for r in requests]
    of_seq: dict[int, RequestResult] = {}
    bm, cpu = sched.block_manager, sched.cpu_budget
    steps = pipelined = cpu_decodes = decodes = idle = 0
    gpu_use_area = cpu_use_area = gpu_peak = cpu_peak = 0.0
    nxt = 0
    while nxt < len(requests) or sched.has_unfinished():
        while nxt < len(requests) and requests[nxt].arrival_s <= clock.now:
            r = requests[nxt]
            # NOTE: the scheduler only takes len() of a prompt, so a range stands in for the token ids (no memory).
            seq = Sequence(f"r{nxt}", range(r.input_len), SamplingParams(max_tokens=r.output_len, ignore_eos=True),
                           arrival_time=r.arrival_s)
            of_seq[seq.seq_id] = results[nxt]
            sched.add(seq)
            nxt += 1
        if not sched.has_unfinished():
            clock.advance_to(requests[nxt].arrival_s)
            continue
        out = sched.schedule()
        for seq, error in out.failed:
            of_seq.pop(seq.seq_id).failed = error
            seq.status = SequenceStatus.FINISHED
        if out.is_empty():
            idle += 1
            if idle > MAX_IDLE_STEPS:
                raise RuntimeError(f"the scheduler scheduled nothing {MAX_IDLE_STEPS} steps in a row at "
                                   f"t={clock.now:.3f} s ({len(sched.running)} running, {len(sched.waiting)} waiting)")
            clock.advance(max(roofline.step_overhead(0), 1e-4))
            continue
        idle = 0
        dt = roofline.step_time(out)
        if out.estimated_time is not None and not out.prefills:
            # NOTE: as LLMEngine.step: the planner learns what a decode step costs beyond its cost model.
            sched.planner.observe(out.estimated_time, dt, with_cpu=bool(out.cpu_decodes_a or out.cpu_decodes_b))
        gpu_used = bm.num_used_blocks / bm.num_blocks
        cpu_used = cpu.num_used_blocks / cpu.num_blocks if cpu is not None and cpu.num_blocks else 0.0
        gpu_use_area += gpu_used * dt
        cpu_use_area += cpu_used * dt
        gpu_peak, cpu_peak = max(gpu_peak, gpu_used), max(cpu_peak, cpu_used)
        now = clock.advance(dt)
        steps += 1
        pipelined += out.pipelined
        n_cpu = len(out.cpu_decodes_a) + len(out.cpu_decodes_b)
        cpu_decodes += n_cpu
        decodes += n_cpu + len(out.decodes)
        _postprocess(sched, out, now, of_seq, cfg.max_model_len)
    end = clock.now
    return SimResult(
        mode=cfg.mode, requests=results, end_s=end, steps=steps, pipelined_steps=pipelined, cpu_decodes=cpu_decodes,
        decodes=decodes, preemptions=sched.num_preemptions, swap_outs=sched.num_swap_outs,
        swap_ins=sched.num_swap_ins, gpu_blocks=bm.num_blocks, cpu_blocks=cpu.num_blocks if cpu else 0,
        gpu_kv_use_mean=gpu_use_area / end if end else 0.0, gpu_kv_use_peak=gpu_peak,
        cpu_kv_use_mean=cpu_use_area / end if end else 0.0, cpu_kv_use_peak=cpu_peak,
        wall_s=time.perf_counter() - wall0, planner_overhead_s=dict(sched.planner.step_overhead_s))


def _postprocess(sched: Scheduler, out, now: float, of_seq: dict[int, RequestResult], max_model_len: int) -> None:
    """LLMEngine._postprocess with a placeholder token: every sampled token is stamped with the step's end."""
    sampled = [s.seq for s in out.scheduled if s.samples]
    for s in out.scheduled:
        s.seq.num_computed_tokens += s.num_new_tokens
    for seq in sampled:
        seq.output_token_ids.append(PLACEHOLDER_TOKEN)
        rec = of_seq[seq.seq_id]
        if rec.first_token_s is None:
            rec.first_token_s = now
        rec.last_token_s = now
        rec.tokens = len(seq.output_token_ids)
        if rec.tokens >= seq.params.max_tokens or seq.num_tokens >= max_model_len:
            sched.remove(seq)
            seq.status = SequenceStatus.FINISHED
            del of_seq[seq.seq_id]
