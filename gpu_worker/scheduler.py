"""Decides, every step, which sequences run, how many tokens each computes, and where each one's KV lives.

One step mixes decodes (one token per running sequence) and prefill chunks (up to the token budget), as continuous
batching with chunked prefill does. Prefills always run on the worker's device ("GPU"). Decodes run with their KV on
the GPU or, NEO-style, in the cpu_attn sidecar ("CPU"), chosen by the mode:

- gpu-only: the baseline. When GPU KV blocks run out, the newest running sequence is preempted: its blocks are
  freed and it is recomputed later from its prompt and the tokens it already produced (vLLM's recompute policy).
- cpu-all: every sequence moves its KV to the CPU as soon as its prefill is done.
- auto: sequences stay on the GPU while blocks last; when they run out, the newest GPU sequences swap out to the
  CPU instead of being preempted where the planner predicts that this pays (else they are preempted, as in
  gpu-only), and they swap back in, ahead of waiting requests, when GPU blocks free up. A waiting request makes
  room by moving sequences to the CPU only when the planner predicts that it pays. The
  PipelinePlanner splits CPU decodes into the two sub-batches of an asymmetric pipeline using the profiled
  performance model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from gpu_worker.block_manager import BlockManager, CpuKVBudget
from gpu_worker.config import MODES
from gpu_worker.pipeline_planner import PipelinePlan, PipelinePlanner
from gpu_worker.sequence import KVLocation, Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    mode: str = "gpu-only"
    max_swaps_per_step: int = 8  # bounds the KV copies a single step spends on migrations
    swap_in_watermark: float = 0.05  # keep this fraction of GPU blocks free after a swap-in (no ping-pong)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from seq.num_computed_tokens on

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens, so the step samples a next token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    decodes: list[ScheduledSeq] = field(default_factory=list)  # GPU decodes, one token each
    prefills: list[ScheduledSeq] = field(default_factory=list)  # prompt chunks or recomputes, on the GPU
    # CPU decodes: sub-batch A runs with the GPU work above, sub-batch B alone (the pipeline's second half).
    cpu_decodes_a: list[ScheduledSeq] = field(default_factory=list)
    cpu_decodes_b: list[ScheduledSeq] = field(default_factory=list)
    pipelined: bool = False
    # Migrations the runner performs before the forward, in this order: swap-outs, then swap-ins.
    swap_out: list[tuple[Sequence, list[int]]] = field(default_factory=list)  # (seq, its former GPU block table)
    swap_in: list[Sequence] = field(default_factory=list)  # GPU blocks already allocated in seq.block_table
    preempted: list[Sequence] = field(default_factory=list)
    deferred: list[Sequence] = field(default_factory=list)  # CPU decodes held back this step for balance
    failed: list[tuple[Sequence, str]] = field(default_factory=list)  # can never fit: finished with an error
    estimated_time: float | None = None  # the cost model's forward time for this step (None without a model)

    @property
    def scheduled(self) -> list[ScheduledSeq]:
        """Every scheduled chunk, in the flat order the runner lays them out."""
        return self.cpu_decodes_a + self.decodes + self.prefills + self.cpu_decodes_b

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, cpu_budget: CpuKVBudget | None = None,
                 planner: PipelinePlanner | None = None):
        if config.mode != "gpu-only" and cpu_budget is None:
            raise ValueError(f"mode {config.mode} needs a CPU KV budget (a sidecar)")
        self.config = config
        self.block_manager = block_manager
        self.cpu_budget = cpu_budget
        self.planner = planner or PipelinePlanner()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one gives way first
        # Swapped in by the latest schedule(): GPU blocks allocated and the sequence placed on the GPU, but its KV is
        # still in the sidecar until the runner's migrate copies it over (confirm_swap_ins). A sidecar that dies in
        # between leaves those blocks holding garbage, so these are recomputed like the CPU sequences.
        self.swapping_in: list[Sequence] = []
        self.num_preemptions = 0
        self.num_swap_outs = 0
        self.num_swap_ins = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drops a sequence (finished or aborted) and frees its blocks on both sides."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._forget_swap_in(seq)
        self.block_manager.free(seq)
        if self.cpu_budget is not None:
            self.cpu_budget.free(seq)

    # --- the step ---------------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        if self.config.mode == "cpu-all":
            self._offload_decoders(out)
        elif self.config.mode == "auto":
            # NOTE: before admissions, also under load: CPU sequences are older than anything waiting, and one
            # left on the CPU while new requests take every freed block would slow every step until it finishes.
            self._swap_in(out)

        gpu_work: list[ScheduledSeq] = []
        cpu_work: list[ScheduledSeq] = []
        # 1. Running sequences first, oldest first: decodes and unfinished prefill chunks.
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status != SequenceStatus.RUNNING:  # gave way earlier in this loop
                continue
            if seq.location == KVLocation.CPU:
                if self._reserve_cpu(seq, out):
                    cpu_work.append(ScheduledSeq(seq, 1))
                    budget -= 1
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._make_gpu_room(seq, seq.num_computed_tokens + n, out, protect=seq):
                continue
            if seq.location == KVLocation.CPU:  # it was the one that moved: it decodes on the CPU
                cpu_work.append(ScheduledSeq(seq, 1))
                budget -= 1
                continue
            self.block_manager.allocate(seq, seq.num_computed_tokens + n)
            gpu_work.append(ScheduledSeq(seq, n))
            budget -= n

        # 2. Admit waiting sequences (FCFS) while budget, slots and blocks allow. None after a preemption this step:
        # NOTE: admitting then would just evict the sequence we preempted a moment ago.
        bm = self.block_manager
        in_flight = self._keys_in_flight()
        i = 0
        while i < len(self.waiting) and budget > 0 and not out.preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[i]
            if bm.blocks_for(seq.num_tokens + 1) > bm.num_blocks:
                del self.waiting[i]
                out.failed.append((seq, f"needs {seq.num_tokens + 1} tokens of KV; the GPU cache holds "
                                        f"{bm.num_blocks * bm.block_size}"))
                continue
            # NOTE: the cached prefix is attached first, so that the checks below see only the blocks and tokens
            # still to compute (the token budget counts computed tokens, not cached ones).
            cached = bm.attach_cached_prefix(seq)
            if in_flight is not None and bm.prefix_cache.next_key(seq) in in_flight:
                # NOTE: a running prefill is computing the next block of this prompt's prefix: wait for it to be
                # cached (a step or a few) rather than compute the same KV twice; later requests may go first.
                bm.detach(seq)
                i += 1
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if not bm.can_allocate(seq, seq.num_computed_tokens + n):
                if self.config.mode == "gpu-only" or not self._swap_out_for(seq, seq.num_computed_tokens + n, out):
                    bm.detach(seq)
                    break
            del self.waiting[i]
            self._record_prefix_hit(seq, cached)
            bm.allocate(seq, seq.num_computed_tokens + n)
            seq.status = SequenceStatus.RUNNING
            seq.location = KVLocation.GPU
            self.running.append(seq)
            gpu_work.append(ScheduledSeq(seq, n))
            budget -= n
            if in_flight is not None:
                in_flight.update(bm.prefix_cache.uncached_keys(seq))

        for s in gpu_work:
            if s.seq.location == KVLocation.CPU:  # swapped out later in this step to admit a prefill
                cpu_work.append(s)
            else:
                (out.prefills if s.seq.is_prefill else out.decodes).append(s)
        self._plan_cpu(out, cpu_work)
        if self.planner.cost is not None and out.estimated_time is None and not out.is_empty():
            out.estimated_time = self.planner.cost.gpu_time(
                sum(s.num_new_tokens for s in out.decodes + out.prefills), sum(s.seq.num_tokens for s in out.decodes),
                decode_only=not out.prefills)
        return out

    def _keys_in_flight(self) -> set[bytes] | None:
        """Keys of the blocks that running GPU sequences will fill with tokens they know (prefills under way);
        None without a prefix cache (or with nothing waiting: nobody asks)."""
        cache = self.block_manager.prefix_cache
        if cache is None or not self.waiting:
            return None
        return {key for seq in self.running if seq.location == KVLocation.GPU and seq.is_prefill
                for key in cache.uncached_keys(seq)}

    def _record_prefix_hit(self, seq: Sequence, cached: int) -> None:
        cache = self.block_manager.prefix_cache
        if seq.num_cached_tokens is None:  # the first admission: what usage reports
            seq.num_cached_tokens = min(cached, seq.num_prompt_tokens)
        if cache is not None and cache.uses_cache(seq):
            cache.record(seq.num_tokens, cached)

    # --- placement ----------------------------------------------------------------------------------------------------
    def _reserve_cpu(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Room in the sidecar for one more token of a CPU sequence; preempts the newest CPU sequence if full."""
        while not self.cpu_budget.can_reserve(seq, seq.num_tokens):
            victim = next(s for s in reversed(self.running) if s.location == KVLocation.CPU)
            self._preempt(victim, out)
            if victim is seq:
                return False
        self.cpu_budget.reserve(seq, seq.num_tokens)
        return True

    def _make_gpu_room(self, seq: Sequence, num_tokens: int, out: SchedulerOutput, protect: Sequence) -> bool:
        """Frees GPU blocks until `seq` can cover num_tokens: swap the newest GPU sequence out to the CPU (cpu-all;
        auto where the planner says that beats preempting it), else preempt it. False when `seq` itself had to
        give way."""
        bm = self.block_manager
        while not bm.can_allocate(seq, num_tokens):
            victim = next(s for s in reversed(self.running) if s.location == KVLocation.GPU)
            swap = self._can_swap_out(victim, out) and self._swap_pays(victim)
            if victim is not seq and swap:
                self._swap_out(victim, out)
                continue
            if victim is seq and swap:
                self._swap_out(seq, out)  # it decodes on the CPU from now on
                return True
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _swap_out_for(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Admission in auto/cpu-all: move decoding GPU sequences (newest first) to the CPU to fit a prefill.
        In auto, only when the planner says it pays (bound, throughput): else the request waits, as in gpu-only."""
        bm = self.block_manager
        candidates = [s for s in reversed(self.running) if s.location == KVLocation.GPU and self._can_swap_out(s, out)]
        candidates = candidates[:self.config.max_swaps_per_step - len(out.swap_out)]
        needed = bm.blocks_needed(seq, num_tokens) - bm.num_free_blocks
        victims, freed = [], 0
        for victim in candidates:
            if freed >= needed:
                break
            victims.append(victim)
            freed += len(victim.block_table)
        if freed < needed or (self.config.mode == "auto" and not self._cpu_admits(victims, seq)):
            return False
        for victim in victims:
            self._swap_out(victim, out)
        return bm.can_allocate(seq, num_tokens)

    def _cpu_admits(self, victims: list[Sequence], new: Sequence) -> bool:
        """Whether moving `victims` to the CPU to start `new` on the GPU pays (the planner's latency bound and
        predicted throughput)."""
        cpu = [s for s in self.running if s.location == KVLocation.CPU]
        gpu = [s for s in self.running if s.location == KVLocation.GPU and not s.is_prefill]
        return self.planner.admits(gpu, cpu, victims, new)

    def _swap_pays(self, victim: Sequence) -> bool:
        """auto: whether `victim` should decode from the CPU rather than be preempted (the planner's call)."""
        if self.config.mode != "auto":
            return True
        cpu = [s for s in self.running if s.location == KVLocation.CPU]
        gpu = [s for s in self.running if s.location == KVLocation.GPU and not s.is_prefill]
        return self.planner.swap_beats_preempt(gpu, cpu, victim)

    def _can_swap_out(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Only decoding sequences move (prefill needs the GPU), within the per-step copy bound and CPU room."""
        return (self.config.mode != "gpu-only" and not seq.is_prefill and seq.num_computed_tokens > 0
                and len(out.swap_out) < self.config.max_swaps_per_step
                and self.cpu_budget.can_reserve(seq, seq.num_tokens))

    def _swap_out(self, seq: Sequence, out: SchedulerOutput) -> None:
        if seq in out.swap_in:  # swapped in earlier in this step: its KV is still in the sidecar, cancel instead
            out.swap_in.remove(seq)
            self._forget_swap_in(seq)
            self.block_manager.free(seq)
            self.cpu_budget.reserve(seq, seq.num_tokens)
            seq.location = KVLocation.CPU
            self.num_swap_ins -= 1
            return
        table = seq.block_table
        self.block_manager.free(seq)  # NOTE: the runner copies `table` out before this step's writes reuse it
        self.cpu_budget.reserve(seq, seq.num_tokens)
        seq.location = KVLocation.CPU
        out.swap_out.append((seq, table))
        self.num_swap_outs += 1

    def _offload_decoders(self, out: SchedulerOutput) -> None:
        """cpu-all: every GPU sequence whose prefill is done moves to the CPU."""
        for seq in list(self.running):
            if seq.location == KVLocation.GPU and self._can_swap_out(seq, out):
                self._swap_out(seq, out)

    def _swap_in(self, out: SchedulerOutput) -> None:
        """auto: bring CPU sequences back (oldest first) while GPU blocks stay above the watermark."""
        bm = self.block_manager
        reserve = int(bm.num_blocks * self.config.swap_in_watermark)
        gpu_growth = sum(1 for s in self.running if s.location == KVLocation.GPU)  # one new block each, worst case
        for seq in self.running:
            if len(out.swap_in) >= self.config.max_swaps_per_step:
                break
            if seq.location != KVLocation.CPU:
                continue
            need = bm.blocks_for(seq.num_tokens)
            if bm.num_free_blocks - need < reserve + gpu_growth:
                break
            bm.allocate(seq, seq.num_tokens)
            # NOTE: its KV comes back from the sidecar, whose storage dtype may round it: such blocks stay private
            # (blocks it fills on the GPU from here on are cached as usual).
            bm.skip_caching(seq)
            self.cpu_budget.free(seq)
            seq.location = KVLocation.GPU
            out.swap_in.append(seq)
            self.swapping_in.append(seq)
            self.num_swap_ins += 1

    def confirm_swap_ins(self) -> None:
        """The runner migrated the latest schedule's swap-ins: their KV is on the GPU now."""
        self.swapping_in.clear()

    def _forget_swap_in(self, seq: Sequence) -> None:
        if seq in self.swapping_in:
            self.swapping_in.remove(seq)

    def evict_cpu_sequences(self) -> list[Sequence]:
        """The sidecar lost its KV: every sequence whose KV it held is recomputed on the GPU (those on the CPU and
        those whose swap-in had not arrived yet), and placement stays gpu-only until a sidecar is attached again."""
        out = SchedulerOutput()
        lost = [s for s in self.running if s.location == KVLocation.CPU or s in self.swapping_in]
        for seq in lost:
            self._preempt(seq, out)
        self.config.mode = "gpu-only"
        return out.preempted

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._forget_swap_in(seq)
        self.block_manager.free(seq)
        if self.cpu_budget is not None:
            self.cpu_budget.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.location = KVLocation.GPU
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        out.swap_out = [(s, t) for s, t in out.swap_out if s is not seq]
        if seq in out.swap_in:
            out.swap_in.remove(seq)

    # --- CPU decodes into the pipeline ---------------------------------------------------------------------------------
    def _plan_cpu(self, out: SchedulerOutput, cpu_work: list[ScheduledSeq]) -> None:
        if not cpu_work:
            return
        plan: PipelinePlan = self.planner.plan(
            gpu_tokens=sum(s.num_new_tokens for s in out.decodes + out.prefills),
            gpu_context_tokens=sum(s.seq.num_tokens for s in out.decodes),
            cpu_seqs=[s.seq for s in cpu_work],
            prefill=bool(out.prefills),
        )
        by_seq = {s.seq.seq_id: s for s in cpu_work}
        out.cpu_decodes_a = [by_seq[q.seq_id] for q in plan.sub_batch_a]
        out.cpu_decodes_b = [by_seq[q.seq_id] for q in plan.sub_batch_b]
        out.pipelined = bool(out.cpu_decodes_b)
        out.deferred = plan.deferred
        out.estimated_time = plan.estimated_time if self.planner.cost is not None else None
        for seq in plan.deferred:
            seq.cpu_wait_steps += 1
        for s in out.cpu_decodes_a + out.cpu_decodes_b:
            s.seq.cpu_wait_steps = 0
