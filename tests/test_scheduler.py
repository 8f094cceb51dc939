"""Scheduler and block manager, plain Python with fake model outputs (no torch, no model)."""

from __future__ import annotations

import random

import pytest

from gpu_worker.block_manager import BlockManager
from gpu_worker.scheduler import Scheduler, SchedulerConfig
from gpu_worker.sequence import Sequence, SequenceStatus
from neoserve.sampling_params import SamplingParams


def make_seq(prompt_len: int, max_tokens: int = 8, name: str | None = None) -> Sequence:
    return Sequence(name or f"r{random.random()}", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))


def fake_step(sched: Scheduler, out) -> list[Sequence]:
    """What the engine does after the model ran: advance computed tokens, append a fake token where sampled,
    finish sequences at max_tokens. Returns the finished ones."""
    done = []
    for s in out.scheduled:
        samples = s.samples
        s.seq.num_computed_tokens += s.num_new_tokens
        if samples:
            s.seq.output_token_ids.append(7)
            if len(s.seq.output_token_ids) >= s.seq.params.max_tokens:
                sched.remove(s.seq)
                s.seq.status = SequenceStatus.FINISHED
                done.append(s.seq)
    return done


def run_to_end(sched: Scheduler, max_steps: int = 10_000) -> int:
    steps = 0
    while sched.has_unfinished():
        out = sched.schedule()
        assert not out.failed
        assert out.num_tokens <= sched.config.max_num_batched_tokens
        assert sched.block_manager.num_used_blocks <= sched.block_manager.num_blocks
        fake_step(sched, out)
        steps += 1
        assert steps < max_steps, "no progress"
    return steps


def test_block_manager_allocates_and_frees():
    bm = BlockManager(num_blocks=4, block_size=16)
    seq = make_seq(20)
    assert bm.blocks_needed(seq, 20) == 2
    bm.allocate(seq, 20)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2
    bm.allocate(seq, 32)  # still fits in 2 blocks
    assert len(seq.block_table) == 2
    assert not bm.can_allocate(seq, 16 * 5)
    with pytest.raises(RuntimeError):
        bm.allocate(seq, 16 * 5)
    bm.free(seq)
    assert bm.num_free_blocks == 4 and seq.block_table == []


def test_mixed_prefill_and_decode_in_one_step():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), BlockManager(64, 16))
    a = make_seq(10)
    sched.add(a)
    fake_step(sched, sched.schedule())  # a prefilled, sampled its first token
    b = make_seq(30)
    sched.add(b)
    out = sched.schedule()
    assert [s.seq for s in out.decodes] == [a] and [s.seq for s in out.prefills] == [b]
    assert out.prefills[0].num_new_tokens == 30


def test_chunked_prefill_respects_token_budget():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16), BlockManager(64, 16))
    seq = make_seq(40)
    sched.add(seq)
    chunks = []
    while not seq.output_token_ids:
        out = sched.schedule()
        chunks.append(out.prefills[0].num_new_tokens if out.prefills else out.decodes[0].num_new_tokens)
        fake_step(sched, out)
    assert chunks == [16, 16, 8]


def test_preempts_newest_when_blocks_run_out_and_everything_finishes():
    bm = BlockManager(num_blocks=6, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), bm)
    seqs = [make_seq(6, max_tokens=6, name=f"s{i}") for i in range(3)]
    for s in seqs:
        sched.add(s)
    run_to_end(sched)
    assert sched.num_preemptions > 0
    assert all(len(s.output_token_ids) == 6 for s in seqs)
    assert bm.num_used_blocks == 0


def test_request_larger_than_cache_fails_instead_of_hanging():
    sched = Scheduler(SchedulerConfig(), BlockManager(num_blocks=2, block_size=4))
    big = make_seq(20)
    sched.add(big)
    out = sched.schedule()
    assert [s for s, _ in out.failed] == [big]
    assert not sched.has_unfinished()


def test_max_num_seqs_bounds_running():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2), BlockManager(64, 16))
    for _ in range(5):
        sched.add(make_seq(4))
    out = sched.schedule()
    assert len(out.scheduled) == 2 and len(sched.waiting) == 3


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_never_exceeds_budgets(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=rng.randint(8, 40), block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=rng.randint(1, 8), max_num_batched_tokens=rng.randint(8, 64)), bm)
    for _ in range(20):
        sched.add(make_seq(rng.randint(1, 20), max_tokens=rng.randint(1, 10)))
    run_to_end(sched)
    assert bm.num_used_blocks == 0


# --- NEO placement and the pipeline planner (fake performance model) -------------------------------------------------

from gpu_worker.block_manager import CpuKVBudget  # noqa: E402
from gpu_worker.pipeline_planner import PipelinePlanner  # noqa: E402
from gpu_worker.sequence import KVLocation  # noqa: E402


class FakeCost:
    """GPU: 1 ms + 0.01 ms per token; CPU attention: 0.001 ms per context token."""

    def gpu_time(self, num_tokens: int, context_tokens: int, decode_only: bool = False) -> float:
        return (1.0 + 0.01 * num_tokens) * 1e-3 if num_tokens else 0.0

    def cpu_time(self, batch: int, context_tokens: int) -> float:
        return 0.001e-3 * context_tokens if batch else 0.0


def fake_neo_step(sched: Scheduler, out) -> list[Sequence]:
    """fake_step plus the invariants of a placement: GPU rows own blocks, CPU rows own none."""
    for s in out.decodes + out.prefills:
        assert s.seq.location == KVLocation.GPU
        assert len(s.seq.block_table) * sched.block_manager.block_size >= s.seq.num_computed_tokens + s.num_new_tokens
    for s in out.cpu_decodes_a + out.cpu_decodes_b:
        assert s.seq.location == KVLocation.CPU and s.seq.block_table == [] and s.num_new_tokens == 1
    return fake_step(sched, out)


def neo_scheduler(mode: str, gpu_blocks: int, cpu_blocks: int = 1000, planner: PipelinePlanner | None = None,
                  **kw) -> Scheduler:
    return Scheduler(SchedulerConfig(mode=mode, max_num_batched_tokens=256, **kw), BlockManager(gpu_blocks, 4),
                     CpuKVBudget(cpu_blocks, 4), planner)


def run_neo(sched: Scheduler, max_steps: int = 5000) -> dict:
    counts = {"cpu": 0, "gpu": 0, "pipelined": 0}
    steps = 0
    while sched.has_unfinished():
        out = sched.schedule()
        assert not out.failed
        assert sched.block_manager.num_used_blocks <= sched.block_manager.num_blocks, "GPU budget exceeded"
        assert sched.cpu_budget.num_used_blocks <= sched.cpu_budget.num_blocks, "CPU budget exceeded"
        counts["cpu"] += len(out.cpu_decodes_a) + len(out.cpu_decodes_b)
        counts["gpu"] += len(out.decodes)
        counts["pipelined"] += out.pipelined
        fake_neo_step(sched, out)
        steps += 1
        assert steps < max_steps, "no progress"
    assert sched.block_manager.num_used_blocks == 0 and sched.cpu_budget.num_used_blocks == 0
    return counts


def test_cpu_all_moves_every_decode_to_cpu():
    sched = neo_scheduler("cpu-all", gpu_blocks=64)
    for i in range(6):
        sched.add(make_seq(8, max_tokens=5, name=f"s{i}"))
    counts = run_neo(sched)
    assert counts["cpu"] > 0 and sched.num_swap_outs == 6
    assert sched.num_preemptions == 0


def test_auto_swaps_out_instead_of_preempting_and_swaps_back():
    # Room for three prompts: s3's admission pushes s2 to the CPU; s0 and s1 finish early and s2 comes back.
    sched = neo_scheduler("auto", gpu_blocks=10)
    for i in range(4):
        sched.add(make_seq(10, max_tokens=3 if i < 2 else 16, name=f"s{i}"))
    counts = run_neo(sched)
    assert sched.num_swap_outs > 0 and sched.num_swap_ins > 0
    assert sched.num_preemptions == 0
    assert counts["cpu"] > 0 and counts["gpu"] > 0


def test_gpu_only_never_uses_cpu():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=256), BlockManager(12, 4))
    for i in range(8):
        sched.add(make_seq(10, max_tokens=12, name=f"s{i}"))
    run_to_end(sched)
    assert sched.num_preemptions > 0


def test_cpu_budget_full_preempts_cpu_sequences_without_exceeding_it():
    sched = neo_scheduler("cpu-all", gpu_blocks=64, cpu_blocks=8)
    for i in range(6):
        sched.add(make_seq(10, max_tokens=8, name=f"s{i}"))
    run_neo(sched)
    assert sched.num_preemptions > 0


def _cpu_seqs(contexts: list[int]) -> list[Sequence]:
    seqs = []
    for i, n in enumerate(contexts):
        s = make_seq(n, name=f"c{i}")
        s.arrival_time = float(i)
        seqs.append(s)
    return seqs


def test_planner_balances_sub_batches():
    planner = PipelinePlanner(FakeCost())
    seqs = _cpu_seqs([1000] * 8)
    plan = planner.plan(gpu_tokens=200, gpu_context_tokens=0, cpu_seqs=seqs)
    assert not plan.deferred and plan.sub_batch_a and plan.sub_batch_b
    assert len(plan.sub_batch_a) + len(plan.sub_batch_b) == 8
    cost = FakeCost()
    cpu_b = cost.cpu_time(len(plan.sub_batch_b), sum(s.num_tokens for s in plan.sub_batch_b))
    cpu_a = cost.cpu_time(len(plan.sub_batch_a), sum(s.num_tokens for s in plan.sub_batch_a))
    # Pipelined: CPU(B) hides under GPU(A), CPU(A) under GPU(B); the split keeps the two halves close.
    t = planner.iteration_time(200, 0, plan.sub_batch_a, plan.sub_batch_b)
    assert t <= planner.iteration_time(200, 0, plan.sub_batch_a + plan.sub_batch_b, []) + 1e-12
    assert abs(cpu_a - cpu_b) <= cost.cpu_time(1, 1000) + 1e-12 or cpu_b <= cost.gpu_time(208, 0)


def test_planner_keeps_one_batch_when_pipelining_does_not_pay():
    planner = PipelinePlanner(FakeCost())
    plan = planner.plan(gpu_tokens=10, gpu_context_tokens=0, cpu_seqs=_cpu_seqs([4]))
    assert plan.sub_batch_b == [] and len(plan.sub_batch_a) == 1


def test_planner_defers_under_latency_bound_but_never_starves():
    planner = PipelinePlanner(FakeCost(), latency_bound_s=2.5e-3, max_wait_steps=3)
    seqs = _cpu_seqs([2000] * 6)  # 2 ms of CPU attention each: cannot all fit the bound
    waits = {s.seq_id: 0 for s in seqs}
    ran = set()
    for _ in range(20):
        plan = planner.plan(gpu_tokens=50, gpu_context_tokens=0, cpu_seqs=seqs)
        if not any(s.cpu_wait_steps >= 3 for s in seqs):
            assert plan.estimated_time <= 2.5e-3 + 1e-12, "the latency bound was exceeded without need"
        ran.update(s.seq_id for s in plan.sub_batch_a + plan.sub_batch_b)
        for s in plan.deferred:
            s.cpu_wait_steps += 1
        for s in plan.sub_batch_a + plan.sub_batch_b:
            s.cpu_wait_steps = 0
        for s in seqs:
            waits[s.seq_id] = max(waits[s.seq_id], s.cpu_wait_steps)
    assert max(waits.values()) == 3, "a CPU decode waited past max_wait_steps, or none was deferred"
    assert ran == set(waits), "a CPU decode never ran"


def test_planner_without_cost_model_splits_halves():
    plan = PipelinePlanner().plan(gpu_tokens=0, gpu_context_tokens=0, cpu_seqs=_cpu_seqs([100, 100, 100, 100]))
    assert len(plan.sub_batch_a) == 2 and len(plan.sub_batch_b) == 2


def test_a_sequence_swapped_in_is_not_swapped_out_in_the_same_step():
    """A chunked prefill that needs room must not push out the sequence that was just swapped in: its KV is still
    in the sidecar (regression: the runner then uploaded unfilled blocks)."""
    bm, cpu = BlockManager(num_blocks=14, block_size=16), CpuKVBudget(100, 16)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, mode="auto"), bm, cpu)
    a = make_seq(300, name="a")  # chunked prefill in progress: 128 of 300 tokens computed
    a.status, a.num_computed_tokens = SequenceStatus.RUNNING, 128
    bm.allocate(a, 128)
    b = make_seq(40, name="b")  # decoding on the CPU
    b.output_token_ids.append(7)
    b.status, b.location, b.num_computed_tokens = SequenceStatus.RUNNING, KVLocation.CPU, 40
    cpu.reserve(b, b.num_tokens)
    sched.running = [a, b]
    out = sched.schedule()
    swapped_in = {s.seq_id for s in out.swap_in}
    swapped_out = {s.seq_id for s, _ in out.swap_out}
    assert not swapped_in & swapped_out
    gpu_rows = [s.seq for s in out.decodes + out.prefills]
    if b.location == KVLocation.CPU:  # the swap-in was cancelled: b keeps decoding from the sidecar
        assert b.block_table == [] and b not in gpu_rows and not out.swap_in
    assert bm.num_used_blocks <= bm.num_blocks


def test_auto_admits_to_the_cpu_only_within_the_latency_bound():
    """With a bound, auto moves sequences to the CPU only while a decode step is predicted to fit it; the other
    requests wait (as in gpu-only) instead of slowing every step down, and all of them still finish."""
    cost = FakeCost()
    # One CPU decode of ~400 tokens (0.4 ms) fits beside the GPU decodes (~1 ms); two do not, split or not.
    bound = cost.gpu_time(3, 0) + cost.cpu_time(1, 500)

    def most_on_cpu(planner: PipelinePlanner) -> int:
        # GPU room for two 400-token prompts and their growth (blocks of 4 tokens).
        sched = neo_scheduler("auto", gpu_blocks=2 * 100 + 16, planner=planner)
        for i in range(8):
            sched.add(make_seq(400, max_tokens=30, name=f"s{i}"))
        most = 0
        while sched.has_unfinished():
            out = sched.schedule()
            most = max(most, sum(s.location == KVLocation.CPU for s in sched.running))
            fake_neo_step(sched, out)
        assert sched.block_manager.num_used_blocks == 0 and sched.cpu_budget.num_used_blocks == 0
        return most

    assert most_on_cpu(PipelinePlanner(cost, latency_bound_s=bound)) == 1
    assert most_on_cpu(PipelinePlanner(cost)) > 1
    gpu = _cpu_seqs([400, 400])
    planner = PipelinePlanner(cost, latency_bound_s=bound)
    assert planner.admits(gpu, [], gpu[1:], make_seq(400))
    assert not planner.admits(gpu, [], gpu, make_seq(400))


class SlowSidecarCost(FakeCost):
    """A CPU decode costs a fixed 5 ms per step (hand-off overheads), far more than a GPU decode."""

    def cpu_time(self, batch: int, context_tokens: int) -> float:
        return 5e-3 if batch else 0.0


def test_auto_without_a_bound_admits_to_the_cpu_only_while_throughput_rises():
    """Where a CPU decode costs a step more than its token is worth, auto lets new requests wait for GPU room
    (gpu-only's behaviour) instead of slowing every step; where it is cheap, it admits them."""
    gpu = _cpu_seqs([400, 400])
    assert not PipelinePlanner(SlowSidecarCost()).admits(gpu, [], gpu[1:], make_seq(400))
    assert PipelinePlanner(FakeCost()).admits(gpu, [], gpu[1:], make_seq(400))
    sched = neo_scheduler("auto", gpu_blocks=2 * 100 + 16, planner=PipelinePlanner(SlowSidecarCost()))
    for i in range(6):
        sched.add(make_seq(400, max_tokens=30, name=f"s{i}"))
    admitted_to_cpu = 0
    while sched.has_unfinished():
        out = sched.schedule()
        admitted_to_cpu += sum(1 for s, _ in out.swap_out if out.prefills)
        fake_neo_step(sched, out)
    assert admitted_to_cpu == 0
    assert sched.block_manager.num_used_blocks == 0 and sched.cpu_budget.num_used_blocks == 0


def test_planner_learns_step_overhead_and_bounds_the_whole_step():
    """The bound is about a whole step: overhead the cost model does not see (sampling, scheduling) is learnt from
    measured decode steps and counted against it."""
    cost = FakeCost()
    bound = cost.gpu_time(3, 0) + cost.cpu_time(1, 500)
    planner = PipelinePlanner(cost, latency_bound_s=bound)
    gpu = _cpu_seqs([400, 400])
    short = _cpu_seqs([200])
    assert planner.admits(gpu, [], gpu[1:], make_seq(400))
    for _ in range(100):  # every step with CPU decodes measured 0.2 ms slower than predicted
        planner.observe(1.0e-3, 1.2e-3, with_cpu=True)
        planner.observe(1.0e-3, 1.0e-3, with_cpu=False)
    assert planner.step_overhead_s[True] == pytest.approx(0.2e-3, rel=1e-3)
    assert planner.step_overhead_s[False] == pytest.approx(0.0, abs=1e-12)
    assert not planner.admits(gpu, [], gpu[1:], make_seq(400))  # 1.43 ms + 0.2 ms > 1.53 ms
    assert planner.admits(gpu[:1] + short, [], short, make_seq(400))
    plan = planner.plan(gpu_tokens=2, gpu_context_tokens=0, cpu_seqs=_cpu_seqs([400]))
    assert len(plan.deferred) == 1


def test_scheduler_reports_the_predicted_step_time():
    cost = FakeCost()
    sched = neo_scheduler("auto", gpu_blocks=64, planner=PipelinePlanner(cost))
    sched.add(make_seq(10, max_tokens=4, name="s0"))
    out = sched.schedule()
    assert out.estimated_time == pytest.approx(cost.gpu_time(10, 0))
    fake_neo_step(sched, out)
    out = sched.schedule()
    assert out.estimated_time == pytest.approx(cost.gpu_time(1, 11))
    assert neo_scheduler("auto", gpu_blocks=64).schedule().estimated_time is None


def test_admission_stops_when_steps_with_cpu_decodes_run_slower_than_predicted():
    """The profile can miss what CPU decodes cost in practice (a sidecar sharing the model's cores, hand-offs):
    measured steps with CPU decodes correct the prediction, and admission to the CPU stops when it no longer pays."""
    planner = PipelinePlanner(FakeCost())
    gpu = _cpu_seqs([400, 400])
    assert planner.admits(gpu, [], gpu[1:], make_seq(400))
    for _ in range(50):
        planner.observe(1.0e-3, 1.0e-3, with_cpu=False)
        planner.observe(1.4e-3, 6.4e-3, with_cpu=True)  # 5 ms more than predicted, every time
    assert not planner.admits(gpu, [], gpu[1:], make_seq(400))


def test_auto_preempts_a_sequence_that_outgrows_the_gpu_where_the_cpu_does_not_pay():
    """A GPU decode that runs out of blocks is swapped to the CPU only where the planner predicts more tokens/s
    from it there; where a CPU decode costs a step more than its token is worth, auto preempts as gpu-only does."""

    def growth(planner: PipelinePlanner) -> Scheduler:
        # Three 40-token prompts fill 30 of 32 blocks; their decodes outgrow the rest within a few steps.
        sched = neo_scheduler("auto", gpu_blocks=32, planner=planner)
        for i in range(3):
            sched.add(make_seq(40, max_tokens=24, name=f"s{i}"))
        run_neo(sched)
        return sched

    slow = growth(PipelinePlanner(SlowSidecarCost()))
    assert slow.num_swap_outs == 0 and slow.num_preemptions > 0
    cheap = growth(PipelinePlanner(FakeCost()))
    assert cheap.num_swap_outs > 0 and cheap.num_preemptions == 0
    gpu = _cpu_seqs([400, 400])
    assert PipelinePlanner(FakeCost()).swap_beats_preempt(gpu, [], gpu[1])
    assert not PipelinePlanner(SlowSidecarCost()).swap_beats_preempt(gpu, [], gpu[1])
    assert not PipelinePlanner(FakeCost(), latency_bound_s=1e-3).swap_beats_preempt(gpu, [], gpu[1])


def test_a_pinned_cost_model_learns_no_overhead():
    """With learn_overhead off (a pinned $NEOSERVE_PERF_MODEL), measured steps do not move the planner's decisions."""
    learning, pinned = PipelinePlanner(learn_overhead=True), PipelinePlanner(learn_overhead=False)
    for planner in (learning, pinned):
        planner.observe(predicted_s=0.01, measured_s=0.5, with_cpu=True)
    assert learning.step_overhead_s[True] > 0
    assert pinned.step_overhead_s == {False: 0.0, True: 0.0}
