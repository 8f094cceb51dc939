"""Splits the CPU decodes of one step between the two sub-batches of NEO's asymmetric pipeline. Plain Python.

Per layer, the GPU runs sub-batch A (prefills, GPU decodes and the CPU decodes of A: their projections and MLP)
while the sidecar computes attention for sub-batch B (CPU decodes only), then the GPU runs B's projections and MLP
while the sidecar computes attention for A's CPU decodes. So one iteration takes about

    max(gpu(A), cpu(B)) + max(gpu(B), cpu(A_cpu))

and the planner assigns each CPU decode to the side that keeps that smallest. With a latency bound, a CPU decode
whose inclusion would push the iteration past it is deferred, but never more than `max_wait_steps` steps in a row.
Without a cost model (not profiled yet) CPU decodes are split into halves of equal context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from gpu_worker.sequence import Sequence


class CostModel(Protocol):
    def gpu_time(self, num_tokens: int, context_tokens: int) -> float:
        """Seconds for one forward over all layers on the worker device: projections/MLP of num_tokens tokens
        plus paged attention over context_tokens (the GPU decodes' contexts)."""

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
    def __init__(self, cost: CostModel | None = None, latency_bound_s: float | None = None, max_wait_steps: int = 4):
        if max_wait_steps < 0:
            raise ValueError(f"max_wait_steps must be >= 0, got {max_wait_steps}")
        self.cost = cost
        self.latency_bound_s = latency_bound_s
        self.max_wait_steps = max_wait_steps

    def iteration_time(self, gpu_tokens: int, gpu_context: int, a: list[Sequence], b: list[Sequence]) -> float:
        c = self.cost
        gpu_a = c.gpu_time(gpu_tokens + len(a), gpu_context)
        cpu_a = c.cpu_time(len(a), _context(a)) if a else 0.0
        if not b:  # one batch: the GPU waits for the CPU attention of A in every layer
            return gpu_a + cpu_a
        return max(gpu_a, c.cpu_time(len(b), _context(b))) + max(c.gpu_time(len(b), 0), cpu_a)

    def plan(self, gpu_tokens: int, gpu_context_tokens: int, cpu_seqs: list[Sequence]) -> PipelinePlan:
        if self.cost is None:
            return self._halves(cpu_seqs)
        # Long-waiting sequences first, so the bounded wait is honoured before anything is deferred again.
        order = sorted(cpu_seqs, key=lambda s: (-s.cpu_wait_steps, s.arrival_time))
        plan = PipelinePlan()
        a, b = plan.sub_batch_a, plan.sub_batch_b
        for seq in order:
            t_a = self.iteration_time(gpu_tokens, gpu_context_tokens, a + [seq], b)
            t_b = self.iteration_time(gpu_tokens, gpu_context_tokens, a, b + [seq])
            best = min(t_a, t_b)
            must_run = seq.cpu_wait_steps >= self.max_wait_steps
            if self.latency_bound_s is not None and best > self.latency_bound_s and not must_run:
                plan.deferred.append(seq)
                continue
            (a if t_a <= t_b else b).append(seq)
        # Pipelining splits the GPU's matmuls in two; keep one batch when that is faster.
        t_pipe = self.iteration_time(gpu_tokens, gpu_context_tokens, a, b)
        t_single = self.iteration_time(gpu_tokens, gpu_context_tokens, a + b, [])
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
