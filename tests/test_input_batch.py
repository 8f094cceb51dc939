"""The persistent batch (gpu_worker/input_batch.py) against the host's Sequences, step by step, through real schedules.

Every step's inputs are checked against what the host state defines them to be (each decode's newest token and
position, each token's cache slot from its block table, the prefill chunks, the CPU rows, which rows sample, the
sampling parameters): the rows are only ever updated by diffs, so any diff the batch misses shows up here as a
token, position or slot that differs from the host's. The model's numbers are checked against transformers in
test_engine_vs_transformers.py, which runs the same batch.
"""

from __future__ import annotations

import random

import pytest
import torch

from gpu_worker.block_manager import BlockManager, CpuKVBudget
from gpu_worker.input_batch import InputBatch, StepInputs, SubBatch
from gpu_worker.sampler import SamplingBatch
from gpu_worker.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from gpu_worker.sequence import Sequence, SequenceStatus
from neoserve.sampling_params import SamplingParams

V = 500
EOS = [2]
BS = 4


def _params(rng: random.Random) -> SamplingParams:
    kind = rng.randrange(5)
    if kind == 0:
        return SamplingParams(max_tokens=rng.randint(1, 12), temperature=0.0)
    if kind == 1:
        return SamplingParams(max_tokens=rng.randint(1, 12), temperature=0.7, top_p=0.9, top_k=rng.choice([0, 5]))
    if kind == 2:
        return SamplingParams(max_tokens=rng.randint(1, 12), temperature=1.0, seed=rng.randrange(100), min_p=0.1)
    if kind == 3:
        return SamplingParams(max_tokens=rng.randint(3, 12), temperature=0.0, min_tokens=2, repetition_penalty=1.2,
                              stop_token_ids=[9], logprobs=2)
    return SamplingParams(max_tokens=rng.randint(1, 12), temperature=0.5, frequency_penalty=0.5,
                          presence_penalty=0.25)


def _seq(rng: random.Random, i: int) -> Sequence:
    seq = Sequence(f"r{i}", [rng.randrange(3, V) for _ in range(rng.randint(1, 14))], _params(rng))
    if seq.params.seed is not None:
        seq.generator = torch.Generator().manual_seed(seq.params.seed)
    return seq


def _slot(seq: Sequence, pos: int) -> int:
    return seq.block_table[pos // BS] * BS + pos % BS


def _check_sub_batch(sub: SubBatch, cpu, decodes, prefills) -> None:
    """sub against the host Sequences of its scheduled chunks."""
    rows = cpu + decodes
    ids = [s.seq.last_token_id() for s in rows]
    positions = [s.seq.num_computed_tokens for s in rows]
    for s in prefills:
        c0 = s.seq.num_computed_tokens
        ids += s.seq.token_ids(c0, c0 + s.num_new_tokens)
        positions += range(c0, c0 + s.num_new_tokens)
    assert sub.ids.tolist() == ids
    assert sub.positions.tolist() == positions
    assert sub.num_cpu == len(cpu)
    assert sub.cpu_seq_ids == [s.seq.seq_id for s in cpu]
    assert sub.cpu_context_lens == [s.seq.num_computed_tokens + 1 for s in cpu]
    keep, end = list(range(len(rows))), len(rows)
    for s in prefills:
        end += s.num_new_tokens
        if s.samples:
            keep.append(end - 1)
    assert sub.keep_rows.tolist() == keep
    assert sub.decode_only == (not prefills)
    if not decodes and not prefills:
        assert sub.meta is None
        return
    meta = sub.meta
    slots = [_slot(s.seq, s.seq.num_computed_tokens) for s in decodes]
    slots += [_slot(s.seq, p) for s in prefills
              for p in range(s.seq.num_computed_tokens, s.seq.num_computed_tokens + s.num_new_tokens)]
    assert meta.slot_mapping.tolist() == slots
    assert meta.num_decodes == len(decodes)
    for i, s in enumerate(decodes):
        n = s.seq.num_computed_tokens + 1
        mask = meta.decode_mask[i, 0, 0]
        assert mask.tolist() == [j < n for j in range(mask.shape[0])]
        assert meta.decode_slots[i, :n].tolist() == [_slot(s.seq, p) for p in range(n)]
    start = len(decodes)
    assert len(meta.prefills) == len(prefills)
    for chunk, s in zip(meta.prefills, prefills):
        c0 = s.seq.num_computed_tokens
        assert (chunk.start, chunk.end, chunk.context_start) == (start, start + s.num_new_tokens, c0)
        if c0:
            assert chunk.prefix_slots.tolist() == [_slot(s.seq, p) for p in range(c0 + s.num_new_tokens)]
        else:
            assert chunk.prefix_slots is None
        start = chunk.end


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


def _check_sampling(got: SamplingBatch, seqs: list[Sequence]) -> None:
    """The batch's stored parameters against SamplingBatch.build over the same sequences' params and tokens."""
    want = SamplingBatch.build([s.params for s in seqs], [s.prompt_token_ids for s in seqs],
                               [s.output_token_ids for s in seqs], [s.generator for s in seqs], V, EOS, "cpu")
    for name in ("num_rows", "all_greedy", "any_greedy", "filter_top_k_list", "logprob_rows", "num_logprobs"):
        assert getattr(got, name) == getattr(want, name), name
    for name in ("greedy", "temperature", "filter_rows", "filter_top_k", "filter_threshold", "min_p", "unseeded_rows"):
        assert _same(getattr(got, name), getattr(want, name)), name
    assert [(i, id(g)) for i, g in got.seeded_rows] == [(i, id(g)) for i, g in want.seeded_rows]
    assert (got.min_tokens_mask is None) == (want.min_tokens_mask is None)
    if want.min_tokens_mask is not None:
        assert all(torch.equal(x, y) for x, y in zip(got.min_tokens_mask, want.min_tokens_mask))
    assert (got.penalties is None) == (want.penalties is None)
    if want.penalties is not None:
        for name in ("repetition", "presence", "frequency", "output_counts", "prompt_mask"):
            assert _same(getattr(got.penalties, name), getattr(want.penalties, name)), name


def _check_step(inputs: StepInputs, sched: SchedulerOutput) -> None:
    _check_sub_batch(inputs.a, sched.cpu_decodes_a, sched.decodes, sched.prefills)
    _check_sub_batch(inputs.b, sched.cpu_decodes_b, [], [])
    sampled = [s.seq for s in sched.cpu_decodes_a + sched.decodes + sched.prefills + sched.cpu_decodes_b if s.samples]
    assert inputs.sampled_seqs == sampled
    if sampled:
        _check_sampling(inputs.sampling, sampled)
    else:
        assert inputs.sampling is None


def _postprocess(scheduler: Scheduler, sched: SchedulerOutput, tokens: list[int]) -> None:
    """What the engine does with the step's tokens: advance, append, finish."""
    samplers = [s for s in sched.scheduled if s.samples]
    for s in sched.scheduled:
        s.seq.num_computed_tokens += s.num_new_tokens
    for s, tok in zip(samplers, tokens):
        s.seq.output_token_ids.append(tok)
        if len(s.seq.output_token_ids) >= s.seq.params.max_tokens:
            scheduler.remove(s.seq)
            s.seq.status = SequenceStatus.FINISHED


def _scheduler(mode: str) -> Scheduler:
    # NOTE: few blocks and a small token budget: preemptions (or swaps) and chunked prefills happen often.
    config = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=10, max_model_len=64, mode=mode)
    cpu = CpuKVBudget(40, BS) if mode != "gpu-only" else None
    return Scheduler(config, BlockManager(12, BS), cpu)


def _run(mode: str, seed: int, skip_every: int = 0) -> int:
    """Random arrivals through a real scheduler; checks every step's inputs. skip_every: every so many steps the
    batch does not see a step (it is run elsewhere: the host advances, the batch must notice and reload)."""
    rng = random.Random(seed)
    scheduler = _scheduler(mode)
    batch = InputBatch(max_rows=2, max_model_len=64, block_size=BS, vocab_size=V, eos_token_ids=EOS,
                       device=torch.device("cpu"))  # NOTE: fewer rows than max_num_seqs: the batch must grow
    arrivals, steps = 0, 0
    while arrivals < 24 or scheduler.has_unfinished():
        if arrivals < 24 and rng.random() < 0.5:
            scheduler.add(_seq(rng, arrivals))
            arrivals += 1
        sched = scheduler.schedule()
        assert not sched.failed
        if sched.is_empty():
            continue
        steps += 1
        samplers = [s for s in sched.scheduled if s.samples]
        tokens = [rng.randrange(3, V) for _ in samplers]
        if skip_every and steps % skip_every == 0:
            _postprocess(scheduler, sched, tokens)
            continue
        inputs = batch.prepare(sched)
        _check_step(inputs, sched)
        if samplers:
            batch.advance(inputs, torch.tensor(tokens, dtype=torch.int64))
        else:
            batch.advance(inputs, torch.empty(0, dtype=torch.int64))
        _postprocess(scheduler, sched, tokens)
        assert steps < 2000, "no progress"
    return steps


@pytest.mark.parametrize("mode", ["gpu-only", "auto", "cpu-all"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_follow_the_host_through_random_schedules(mode, seed):
    assert _run(mode, seed) > 20


def test_steps_the_batch_did_not_see_are_reloaded_from_the_host():
    assert _run("gpu-only", 3, skip_every=3) > 20


def test_a_failed_step_is_forgotten():
    """clear() after a step whose results were never used: the next step reloads every row from the host."""
    rng = random.Random(5)
    scheduler = _scheduler("gpu-only")
    batch = InputBatch(4, 64, BS, V, EOS, torch.device("cpu"))
    for i in range(4):
        scheduler.add(_seq(rng, i))
    for step in range(12):
        sched = scheduler.schedule()
        inputs = batch.prepare(sched)
        _check_step(inputs, sched)
        tokens = [rng.randrange(3, V) for s in sched.scheduled if s.samples]
        if step % 4 == 2:
            batch.clear()  # the step failed: the engine keeps nothing of it
            continue
        batch.advance(inputs, torch.tensor(tokens, dtype=torch.int64))
        _postprocess(scheduler, sched, tokens)


def test_a_decode_step_reads_its_inputs_as_views_of_the_rows():
    """The point of the persistent batch: a steady decode step gathers nothing; ids and positions are slices."""
    rng = random.Random(7)
    scheduler = _scheduler("gpu-only")
    batch = InputBatch(6, 64, BS, V, EOS, torch.device("cpu"))
    for i in range(3):
        seq = _seq(rng, i)
        seq.params = SamplingParams(max_tokens=20, temperature=0.0)
        scheduler.add(seq)
    while True:
        sched = scheduler.schedule()
        inputs = batch.prepare(sched)
        tokens = [rng.randrange(3, V) for s in sched.scheduled if s.samples]
        batch.advance(inputs, torch.tensor(tokens, dtype=torch.int64))
        _postprocess(scheduler, sched, tokens)
        if not sched.prefills and len(sched.decodes) == 3:
            break
    sched = scheduler.schedule()
    inputs = batch.prepare(sched)
    _check_step(inputs, sched)
    assert inputs.a.ids.data_ptr() == batch.token_ids.data_ptr()
    assert inputs.a.positions.data_ptr() == batch.positions.data_ptr()
    assert inputs.sample_rows is None
