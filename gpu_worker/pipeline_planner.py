"""Splits the CPU decodes of one step between the two sub-batches of NEO's asymmetric pipeline. Plain Python.

Per layer, the GPU runs sub-batch A (prefills, GPU decodes and the CPU decodes of A: their projections and MLP)
while the sidecar computes attention for sub-batch B (CPU decodes only), then the GPU runs B's projections and MLP
while the sidecar computes attention for A's CPU decodes. So one iteration takes about

    max(gpu(A), cpu(B)) + max(gpu(B), cpu(A_cpu))

and the planner assigns each CPU decode to the side that keeps that smallest. With a latency bound, a CPU decode
whose inclusion would push the iteration past it is deferred, but never more than `max_wait_steps` steps in a row;
and the scheduler asks `admits` before it moves sequences to the CPU to start a new request, and
`swap_beats_preempt` before it moves one that outgrew the GPU's blocks: only while the predicted decode step stays
within the bound and its tokens/s does not drop (deferring cannot fix an overfull CPU
side: every CPU sequence must still decode once per `max_wait_steps + 1` steps). Without a cost model (not
profiled yet) CPU decodes are split into halves of equal context and every admission is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from gpu_worker.sequence import Sequence


class CostModel(Protocol):
    def gpu_time(self, num_tokens: int, context_tokens: int, decode_only: bool = False) -> float:
        """Seconds for one forward over all layers on the worker device: projections/MLP of num_tokens tokens
        plus paged attention over context_tokens (the GPU decodes' contexts). decode_only: no prefill chunk among
        the tokens (such a batch may replay CUDA graphs)."""

    def cpu_time(self, batch: int, context_tokens: int) -> float:
        """Seconds of sidecar attention over all layers for `batch` decodes with context_tokens in total,
        including the ring transfers."""


@dataclass
class PipelinePlan:
    sub_batch_a: list[Sequence] = field(default_factory=list)  # CPU decodes run alongside the GPU work
    sub_batch_b: list[Sequence] = field(default_factory=list)  # CPU decodes of the second sub-batch
    deferred: list[Sequence] = field(default_factory=list)
    estimated_time: float = 0.0


def _context(seqs: list[Sequence]) -> int:
    return sum(s.num_tokens for s in seqs)


class PipelinePlanner:
    OVERHEAD_EWMA = 0.1  # weight of the newest step in the learnt overheads

    def __init__(self, cost: CostModel | None = None, latency_bound_s: float | None = None, max_wait_steps: int = 4,
                 learn_overhead: bool = True):
        if max_wait_steps < 0:
            raise ValueError(f"max_wait_steps must be >= 0, got {max_wait_steps}")
        self.cost = cost
        self.latency_bound_s = latency_bound_s
        self.max_wait_steps = max_wait_steps
        # What a decode step costs beyond the cost model's prediction (scheduling, sampling, logits, launches;
        # with CPU decodes also the hand-offs and whatever the sidecar takes from the device's host), learnt from
        # measured steps, apart for steps without [False] and with [True] CPU decodes. Latency bounds and
        # admissions are about whole steps, so they count it.
        # NOTE: apart, because the two differ most where it matters: where the sidecar competes with the model for
        # the same cores, or its hand-offs cost more than the profile saw, a step with CPU decodes is much slower
        # than predicted, and admission must see that to stop moving sequences to the CPU.
        self.step_overhead_s = {False: 0.0, True: 0.0}
        self.learn_overhead = learn_overhead

    def observe(self, predicted_s: float, measured_s: float, with_cpu: bool) -> None:
        """A decode step the cost model predicted at predicted_s took measured_s."""
        if not self.learn_overhead:
            return
        o = self.step_overhead_s
        o[with_cpu] += self.OVERHEAD_EWMA * (measured_s - predicted_s - o[with_cpu])

    def _overhead(self, with_cpu: bool) -> float:
        return max(self.step_overhead_s[with_cpu], 0.0)

    def _within_bound(self, t: float) -> bool:  # a planned step always has CPU decodes
        return self.latency_bound_s is None or t + self._overhead(True) <= self.latency_bound_s

    def iteration_time(self, gpu_tokens: int, gpu_context: int, a: list[Sequence], b: list[Sequence],
                       prefill: bool = False) -> float:
        """prefill: the GPU work (sub-batch A) includes prefill chunks."""
        c = self.cost
        gpu_a = c.gpu_time(gpu_tokens + len(a), gpu_context, decode_only=not prefill)
        cpu_a = c.cpu_time(len(a), _context(a)) if a else 0.0
        if not b:  # one batch: the GPU waits for the CPU attention of A in every layer
            return gpu_a + cpu_a
        return max(gpu_a, c.cpu_time(len(b), _context(b))) + max(c.gpu_time(len(b), 0, decode_only=True), cpu_a)

    def decode_step_time(self, gpu_seqs: list[Sequence], cpu_seqs: list[Sequence]) -> float:
        """Predicted seconds of a decode-only step (learnt overhead included); needs a cost model."""
        gpu_ctx = _context(gpu_seqs)
        if cpu_seqs:
            t = self._plan(len(gpu_seqs), gpu_ctx, cpu_seqs, bounded=False).estimated_time
        else:
            t = self.cost.gpu_time(len(gpu_seqs), gpu_ctx, decode_only=True)
        return t + self._overhead(bool(cpu_seqs))

    def admits(self, gpu_seqs: list[Sequence], cpu_seqs: list[Sequence], moved: list[Sequence],
               new: Sequence) -> bool:
        """Whether moving `moved` (GPU decodes) to the CPU, so that `new` can start on the GPU, pays. Otherwise
        `new` is better off waiting for GPU room. True without a cost model.

        NOTE: NEO's test: CPU attention is worth it only while it hides under device work. Where a CPU sequence
        costs a step more than its one token is worth (hand-off overheads, a slow host), this keeps auto at
        gpu-only's throughput instead of letting every step slow down for everyone.
        """
        if self.cost is None:
            return True
        stay = [s for s in gpu_seqs if s not in moved]
        return self._pays((gpu_seqs, cpu_seqs), (stay + [new], cpu_seqs + moved))

    def swap_beats_preempt(self, gpu_seqs: list[Sequence], cpu_seqs: list[Sequence], victim: Sequence) -> bool:
        """Whether `victim`, a GPU decode that must give up its GPU blocks, should go on decoding from the CPU
        rather than be preempted (recomputed later, as gpu-only does). True without a cost model.

        NOTE: the same test as `admits`, with the victim in place of a new request: one more sequence decoding
        is worth a slower step only while tokens/s does not drop and the bound holds. The recompute a preemption
        costs later is left out, which leans towards preempting: the cost of a swap is paid every step, that of
        a recompute once.
        """
        if self.cost is None:
            return True
        stay = [s for s in gpu_seqs if s is not victim]
        return self._pays((stay, cpu_seqs), (stay, cpu_seqs + [victim]))

    def _pays(self, before: tuple[list[Sequence], list[Sequence]],
              after: tuple[list[Sequence], list[Sequence]]) -> bool:
        """Whether decode placement `after` ((GPU, CPU) sequences) stays within the latency bound and decodes at
        least the tokens/s of `before`.

        NOTE: contexts as they are now; they grow by a token per step, and the per-step deferral keeps later
        iterations near the bound.
        """
        t_after = self.decode_step_time(*after)
        if self.latency_bound_s is not None and t_after > self.latency_bound_s:
            return False
        n_before = len(before[0]) + len(before[1])
        if n_before == 0:
            return True
        return (len(after[0]) + len(after[1])) / t_after >= n_before / self.decode_step_time(*before)

    def plan(self, gpu_tokens: int, gpu_context_tokens: int, cpu_seqs: list[Sequence],
             prefill: bool = False) -> PipelinePlan:
        """prefill: the step's GPU work includes prefill chunks."""
        return self._plan(gpu_tokens, gpu_context_tokens, cpu_seqs, bounded=True, prefill=prefill)

    def _plan(self, gpu_tokens: int, gpu_context_tokens: int, cpu_seqs: list[Sequence], *,
              bounded: bool, prefill: bool = False) -> PipelinePlan:
        """The split; `bounded=False` runs every decode (what a step with all of them would take)."""
        if self.cost is None:
            return self._halves(cpu_seqs)
        # Long-waiting sequences first, so the bounded wait is honoured before anything is deferred again.
        order = sorted(cpu_seqs, key=lambda s: (-s.cpu_wait_steps, s.arrival_time))
        plan = PipelinePlan()
        a, b = plan.sub_batch_a, plan.sub_batch_b
        for seq in order:
            t_a = self.iteration_time(gpu_tokens, gpu_context_tokens, a + [seq], b, prefill)
            t_b = self.iteration_time(gpu_tokens, gpu_context_tokens, a, b + [seq], prefill)
            best = min(t_a, t_b)
            must_run = seq.cpu_wait_steps >= self.max_wait_steps
            if bounded and not self._within_bound(best) and not must_run:
                plan.deferred.append(seq)
                continue
            (a if t_a <= t_b else b).append(seq)
        # Pipelining splits the GPU's matmuls in two; keep one batch when that is faster.
        t_pipe = self.iteration_time(gpu_tokens, gpu_context_tokens, a, b, prefill)
        t_single = self.iteration_time(gpu_tokens, gpu_context_tokens, a + b, [], prefill)
        if b and t_single <= t_pipe:
            a.extend(b)
            b.clear()
        plan.estimated_time = min(t_pipe, t_single)
        return plan

    @staticmethod
    def _halves(cpu_seqs: list[Sequence]) -> PipelinePlan:
        plan = PipelinePlan()
        if len(cpu_seqs) < 2:
            plan.sub_batch_a = list(cpu_seqs)
            return plan
        total, acc = _context(cpu_seqs), 0
        for seq in sorted(cpu_seqs, key=lambda s: s.arrival_time):
            (plan.sub_batch_b if acc < total / 2 else plan.sub_batch_a).append(seq)
            acc += seq.num_tokens
        return plan
