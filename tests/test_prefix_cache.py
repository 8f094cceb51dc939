"""Prefix caching in the block manager and the scheduler, plain Python (no torch, no model): content keys,
reference counts, LRU eviction, admission with a cached prefix, and property tests (hypothesis) that random
admit/append/fork/preempt/cancel/swap sequences keep every block accounted for and never let a sequence read KV
that is not its own prefix's."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gpu_worker.block_manager import BlockManager, CpuKVBudget
from gpu_worker.pipeline_planner import PipelinePlanner
from gpu_worker.prefix_cache import PrefixCache
from gpu_worker.scheduler import Scheduler, SchedulerConfig
from gpu_worker.sequence import KVLocation, Sequence, SequenceStatus
from neoserve.errors import ValidationError
from neoserve.prefix_hash import chain_block_keys, prefix_block_keys, root_key
from neoserve.sampling_params import SamplingParams

BS = 4
_names = itertools.count()


def seq_of(tokens: list[int], max_tokens: int = 4, **params) -> Sequence:
    return Sequence(f"r{next(_names)}", list(tokens), SamplingParams(max_tokens=max_tokens, **params))


def cached_manager(num_blocks: int, block_size: int = BS) -> BlockManager:
    return BlockManager(num_blocks, block_size, PrefixCache("test-model", block_size))


def compute(bm: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """What a step does to one sequence: blocks for its tokens, KV computed, full blocks cached."""
    bm.allocate(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    bm.cache_computed_blocks(seq)


# --- keys ---------------------------------------------------------------------------------------------------------

def test_keys_chain_the_whole_prefix_and_separate_models_and_salts():
    a = prefix_block_keys(list(range(12)), 4, "m")
    assert len(a) == 3 and len(set(a)) == 3
    assert prefix_block_keys(list(range(12)) + [99, 98], 4, "m") == a  # a partial last block has no key
    b = prefix_block_keys([100] + list(range(1, 12)), 4, "m")
    assert all(x != y for x, y in zip(a, b)), "block i's key must depend on every earlier token"
    assert prefix_block_keys(list(range(12)), 4, "other")[0] != a[0]
    assert prefix_block_keys(list(range(12)), 4, "m", "tenant")[0] != a[0]
    assert root_key("m", "") == root_key("m", None)
    assert root_key("ab", "c") != root_key("a", "bc")
    # Incremental hashing from the last known key gives the same keys as hashing from the start.
    assert a[:1] + chain_block_keys(a[0], list(range(4, 12)), 4) == a


# --- the block manager --------------------------------------------------------------------------------------------

def test_freed_full_blocks_stay_cached_and_a_new_request_shares_them():
    bm = cached_manager(8)
    a = seq_of(list(range(10)))
    compute(bm, a, 10)  # blocks 0, 1 full (cached), block 2 partial
    bm.free(a)
    assert bm.num_free_blocks == 8 and bm.num_used_blocks == 0
    assert bm.prefix_cache.num_cached_blocks == 2 and bm.prefix_cache.num_parked_blocks == 2
    b = seq_of(list(range(9)) + [77])  # shares 9 tokens: two full blocks
    assert bm.attach_cached_prefix(b) == 8
    assert b.num_computed_tokens == 8 and [bm.refcount(x) for x in b.block_table] == [1, 1]
    c = seq_of(list(range(6)) + [55, 56])  # shares one full block
    assert bm.attach_cached_prefix(c) == 4 and c.block_table == b.block_table[:1]
    assert bm.refcount(c.block_table[0]) == 2
    bm.check([b, c])


@pytest.mark.parametrize("length, hit", [(3, 0), (4, 0), (5, 4), (8, 4), (9, 8), (12, 8), (13, 12)])
def test_the_last_token_is_always_computed(length, hit):
    """An identical prompt hits every full block but the one holding its last token (the step needs its logits)."""
    bm = cached_manager(8)
    a = seq_of(list(range(length)))
    compute(bm, a, length)
    bm.free(a)
    b = seq_of(list(range(length)))
    assert bm.attach_cached_prefix(b) == hit
    assert b.num_uncomputed_tokens >= 1


def test_eviction_takes_free_blocks_first_then_the_least_recently_parked():
    bm = cached_manager(4)
    a, b = seq_of([1, 1, 1, 1, 9]), seq_of([2, 2, 2, 2, 9])
    compute(bm, a, 5)  # blocks 0 (cached), 1
    compute(bm, b, 5)  # blocks 2 (cached), 3
    bm.free(a)
    bm.free(b)  # parked: a's block first, then b's
    c = seq_of([3] * 7)
    bm.allocate(c, 7)  # two never-cached free blocks: nothing evicted
    assert bm.prefix_cache.stats.evicted_blocks == 0
    d = seq_of([4] * 4)
    bm.allocate(d, 4)  # evicts a's block, the least recently parked
    assert bm.prefix_cache.stats.evicted_blocks == 1
    assert bm.attach_cached_prefix(seq_of([1, 1, 1, 1, 9])) == 0
    e = seq_of([2, 2, 2, 2, 9])
    assert bm.attach_cached_prefix(e) == 4
    assert not bm.can_allocate(seq_of([5]), 1), "a referenced cached block must not be evicted"
    bm.check([c, d, e])


def test_hit_refreshes_lru_position():
    bm = cached_manager(3)
    a, b = seq_of([1] * 4 + [0]), seq_of([2] * 4 + [0])
    compute(bm, a, 4)
    compute(bm, b, 4)
    bm.free(a)
    bm.free(b)
    again = seq_of([1] * 4 + [0])
    bm.attach_cached_prefix(again)  # a's block is used again: it is now the most recently parked after this
    bm.free(again)
    bm.allocate(seq_of([3] * 8), 8)  # one free block, then one eviction: b's
    assert bm.attach_cached_prefix(seq_of([1] * 4 + [0])) == 4


def test_salt_and_opt_out_isolate_requests():
    bm = cached_manager(16)
    a = seq_of(list(range(9)), cache_salt="tenant-a")
    compute(bm, a, 9)
    bm.free(a)
    assert bm.attach_cached_prefix(seq_of(list(range(9)))) == 0
    assert bm.attach_cached_prefix(seq_of(list(range(9)), cache_salt="tenant-b")) == 0
    assert bm.attach_cached_prefix(seq_of(list(range(9)), cache_salt="tenant-a")) == 8
    assert bm.attach_cached_prefix(seq_of(list(range(9)), cache_salt="tenant-a", skip_prefix_cache=True)) == 0
    private = seq_of([7] * 9, skip_prefix_cache=True)
    compute(bm, private, 9)
    bm.free(private)
    assert bm.attach_cached_prefix(seq_of([7] * 9)) == 0, "an opted-out request must not add to the cache"


def test_two_sequences_computing_the_same_block_keep_one_cached():
    bm = cached_manager(8)
    a, b = seq_of(list(range(5))), seq_of(list(range(5)))
    compute(bm, a, 5)
    compute(bm, b, 5)
    assert bm.prefix_cache.num_cached_blocks == 1
    bm.free(a)
    bm.free(b)  # b's duplicate block goes back to the free list
    assert bm.prefix_cache.num_parked_blocks == 1 and bm.num_free_blocks == 8
    bm.check([])


def test_fork_shares_full_blocks_only():
    bm = cached_manager(8)
    parent = seq_of(list(range(10)))
    compute(bm, parent, 10)
    child = seq_of(list(range(10)))
    bm.fork(parent, child)
    assert child.block_table == parent.block_table[:2] and child.num_computed_tokens == 8
    with pytest.raises(ValueError):
        bm.fork(parent, seq_of([9] * 10))
    bm.check([parent, child])


def test_sampling_params_check_cache_fields():
    with pytest.raises(ValidationError, match="cache_salt"):
        SamplingParams(cache_salt="")
    with pytest.raises(ValidationError, match="cache_salt"):
        SamplingParams(cache_salt=5)
    with pytest.raises(ValidationError, match="cache_salt"):
        SamplingParams(cache_salt="\ud800")
    with pytest.raises(ValidationError, match="skip_prefix_cache"):
        SamplingParams(skip_prefix_cache="yes")


# --- the scheduler ------------------------------------------------------------------------------------------------

def test_admission_prefills_only_the_uncached_tokens_within_the_budget():
    bm = cached_manager(64)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16), bm)
    system = list(range(100, 140))  # 40 tokens: 10 full blocks
    first = seq_of(system + [1, 2])
    sched.add(first)
    while first.num_computed_tokens < first.num_tokens:
        out = sched.schedule()
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            bm.cache_computed_blocks(s.seq)
    second = seq_of(system + [3, 4, 5])
    sched.add(second)
    out = sched.schedule()
    chunk = next(s for s in out.prefills if s.seq is second)
    # 40 cached tokens: the prefill starts there, and the 16-token budget is spent on computed tokens only.
    assert second.num_computed_tokens == 40 and chunk.num_new_tokens == 3
    assert second.num_cached_tokens == 40
    assert bm.prefix_cache.stats.hit_tokens == 40
    assert out.num_tokens <= 16


def test_a_request_waits_for_the_prefix_a_running_prefill_is_computing():
    """Two requests with the same 40-token system prompt arrive together: the second waits until the first has
    cached the prompt's blocks, then computes only its own tokens; a request with another prefix is not held."""
    bm = cached_manager(64)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=24), bm)
    system = list(range(100, 140))
    first, second, other = seq_of(system + [1, 2]), seq_of(system + [3, 4, 5]), seq_of([9] * 10)
    for seq in (first, second, other):
        sched.add(seq)
    computed = {}
    for _ in range(4):
        out = sched.schedule()
        for s in out.scheduled:
            computed[s.seq.request_id] = computed.get(s.seq.request_id, 0) + s.num_new_tokens
            s.seq.num_computed_tokens += s.num_new_tokens
            bm.cache_computed_blocks(s.seq)
    assert other.status == SequenceStatus.RUNNING
    assert second.num_cached_tokens == 40 and computed[second.request_id] == 3


def _content(seq: Sequence, pos: int) -> tuple[int, ...]:
    """What the K/V at `pos` depends on: every token up to it (and the salt)."""
    return (seq.params.cache_salt, *seq.token_ids(0, pos + 1))


class FakeKV:
    """Stands in for the runner: writes each computed position's content into its slot (GPU) or into the
    sequence's sidecar copy (CPU), migrates as the runner does, and checks that every running sequence reads
    exactly its own prefix's content at every computed position."""

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.slots: dict[int, tuple] = {}
        self.sidecar: dict[int, dict[int, tuple]] = {}

    def step(self, sched: Scheduler, out) -> None:
        bs = self.bm.block_size
        for seq, table in out.swap_out:  # NOTE: before this step's writes, which may reuse these blocks
            self.sidecar[seq.seq_id] = {p: self.slots[table[p // bs] * bs + p % bs]
                                        for p in range(seq.num_computed_tokens)}
        for seq in out.swap_in:
            for p, c in self.sidecar.pop(seq.seq_id).items():
                self.slots[seq.block_table[p // bs] * bs + p % bs] = c
        for s in out.scheduled:
            seq = s.seq
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + s.num_new_tokens):
                if seq.location == KVLocation.CPU:
                    self.sidecar.setdefault(seq.seq_id, {})[p] = _content(seq, p)
                else:
                    self.slots[seq.block_table[p // bs] * bs + p % bs] = _content(seq, p)
        sched.confirm_swap_ins()

    def check(self, seqs: list[Sequence]) -> None:
        bs = self.bm.block_size
        for seq in seqs:
            for p in range(seq.num_computed_tokens):
                if seq.location == KVLocation.CPU:
                    got = self.sidecar[seq.seq_id][p]
                else:
                    got = self.slots.get(seq.block_table[p // bs] * bs + p % bs)
                assert got == _content(seq, p), f"seq {seq.seq_id} reads wrong KV at position {p}"


def _drive(sched: Scheduler, kv: FakeKV, arrivals: list[tuple[int, Sequence]], aborts: dict[int, set[int]],
           max_steps: int = 3000) -> None:
    """Runs the scheduler with a fake model (token = position mod 5, so different requests produce different
    outputs) until everything finished; aborts[step] holds indices into the arrivals list."""
    bm = sched.block_manager
    pending = sorted(arrivals, key=lambda a: a[0])
    added: list[Sequence] = []
    step = 0
    while pending or sched.has_unfinished():
        while pending and pending[0][0] <= step:
            seq = pending.pop(0)[1]
            sched.add(seq)
            added.append(seq)
        for i in aborts.get(step, ()):
            if i < len(added) and added[i].status != SequenceStatus.FINISHED:
                sched.remove(added[i])
                added[i].status = SequenceStatus.FINISHED
        out = sched.schedule()
        for seq, _ in out.failed:
            seq.status = SequenceStatus.FINISHED
        kv.step(sched, out)
        for s in out.scheduled:
            seq = s.seq
            assert s.num_new_tokens >= 1, "a scheduled sequence must compute at least one token"
            samples = s.samples
            seq.num_computed_tokens += s.num_new_tokens
            bm.cache_computed_blocks(seq)
            if samples:
                seq.output_token_ids.append(seq.num_tokens % 5)
                if len(seq.output_token_ids) >= seq.params.max_tokens:
                    sched.remove(seq)
                    seq.status = SequenceStatus.FINISHED
        bm.check(sched.running)
        kv.check(sched.running)
        step += 1
        assert step < max_steps, "no progress"
    bm.check([])
    assert bm.num_used_blocks == 0


_PREFIXES = [[], [1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 7, 8, 9], [6] * 11]
_request = st.tuples(
    st.integers(0, 12),  # arrival step
    st.sampled_from(range(len(_PREFIXES))),
    st.lists(st.integers(0, 9), min_size=1, max_size=9),  # own tokens after the shared prefix
    st.integers(1, 6),  # max_tokens
    st.sampled_from([None, None, "salt"]),
)


@pytest.mark.parametrize("mode", ["gpu-only", "auto", "cpu-all"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(_request, min_size=1, max_size=10),
       aborts=st.dictionaries(st.integers(0, 15), st.sets(st.integers(0, 9), max_size=2), max_size=4),
       gpu_blocks=st.integers(6, 14), budget=st.integers(3, 24))
def test_random_workloads_keep_refcounts_and_kv_consistent(mode, requests, aborts, gpu_blocks, budget):
    """Arrivals, chunked prefills, decodes, preemptions, swaps (auto, cpu-all) and aborts with shared prefixes in a
    small cache: after every step each block is referenced exactly by the tables that hold it, every other block
    is free or parked, and every running sequence reads its own prefix's KV at every computed position."""
    bm = cached_manager(gpu_blocks)
    cpu = CpuKVBudget(40, BS) if mode != "gpu-only" else None
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, mode=mode, max_num_seqs=6), bm, cpu,
                      PipelinePlanner())
    arrivals = [(at, seq_of(_PREFIXES[p] + own, max_tokens=n, cache_salt=salt))
                for at, p, own, n, salt in requests]
    _drive(sched, FakeKV(bm), arrivals, aborts)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random admit / append / fork / preempt / cancel on the block manager alone."""

    def __init__(self):
        super().__init__()
        self.bm = cached_manager(12)
        self.kv = FakeKV(self.bm)
        self.live: list[Sequence] = []

    def _write(self, seq: Sequence, start: int, end: int) -> None:
        bs = self.bm.block_size
        for p in range(start, end):
            self.kv.slots[seq.block_table[p // bs] * bs + p % bs] = _content(seq, p)

    def _start(self, seq: Sequence) -> None:
        """Computes the rest of a sequence given its shared prefix (attached or forked), or gives the prefix back
        when its other blocks do not fit."""
        start = seq.num_computed_tokens
        if not self.bm.can_allocate(seq, seq.num_tokens):
            self.bm.detach(seq)
            assert not seq.block_table and seq.num_computed_tokens == 0
            return
        self.bm.allocate(seq, seq.num_tokens)
        self._write(seq, start, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
        self.bm.cache_computed_blocks(seq)
        self.live.append(seq)

    @rule(prefix=st.sampled_from(range(len(_PREFIXES))), own=st.lists(st.integers(0, 3), min_size=1, max_size=6),
          salt=st.sampled_from([None, "s"]))
    def admit(self, prefix, own, salt):
        seq = seq_of(_PREFIXES[prefix] + own, cache_salt=salt)
        self.bm.attach_cached_prefix(seq)
        self._start(seq)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), tokens=st.lists(st.integers(0, 3), min_size=1, max_size=5))
    def append(self, i, tokens):
        seq = self.live.pop(i % len(self.live))
        if self.bm.can_allocate(seq, seq.num_tokens + len(tokens)):
            seq.output_token_ids += tokens
        self._start(seq)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), extra=st.lists(st.integers(0, 3), max_size=4))
    def fork(self, i, extra):
        parent = self.live[i % len(self.live)]
        child = seq_of(parent.token_ids(0, parent.num_tokens) + extra + [0], cache_salt=parent.params.cache_salt)
        self.bm.fork(parent, child)
        self._start(child)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def preempt_and_readmit(self, i):
        seq = self.live.pop(i % len(self.live))
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        self.bm.attach_cached_prefix(seq)
        self._start(seq)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def cancel(self, i):
        self.bm.free(self.live.pop(i % len(self.live)))

    @rule()
    def reset(self):
        self.bm.reset_prefix_cache()

    @invariant()
    def accounted(self):
        self.bm.check(self.live)
        self.kv.check(self.live)
        assert self.bm.num_used_blocks == len({b for s in self.live for b in s.block_table})


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
