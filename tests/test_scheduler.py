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
