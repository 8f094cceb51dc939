"""The gateway's router (gateway/router.py) and prefix-affinity table (gateway/affinity.py), alone: scores and choices
over backends whose load is set by hand. Several backends behind a real gateway are in tests/test_router_backends.py.
"""

from __future__ import annotations

import pytest

from gateway.affinity import PrefixAffinity, block_hashes
from gateway.backend import Backend, BackendSpec, StepClock
from gateway.backend_pool import BackendPool
from gateway.router import Router
from neoserve.errors import BackendUnavailableError, ValidationError
from neoserve.internal.v1 import worker_pb2


class _Link:
    """What Backend needs of a WorkerClient to be routable (nothing is sent through it here)."""

    def __init__(self, address: str):
        self.address = address
        self.connected = True

    def cut_all(self, error) -> int:
        return 0


def _pool(*names: str) -> BackendPool:
    pool = BackendPool([BackendSpec(n) for n in names], make=lambda spec: Backend(spec, _Link(spec.address)))
    for b in pool:
        b.healthy = True
        b.stats = worker_pb2.StatsResponse(gpu_kv_blocks_total=1000)
    return pool


def _backend(pool: BackendPool, name: str) -> Backend:
    return next(b for b in pool if b.name == name)


# --- prefix affinity ---------------------------------------------------------------------------------------------------

def test_block_hashes_chain_whole_blocks_only():
    a = block_hashes(list(range(40)), 16)
    assert len(a) == 2  # the partial third block has no key
    assert block_hashes(list(range(32)), 16) == a
    b = block_hashes([99] + list(range(1, 40)), 16)
    assert a[0] != b[0] and a[1] != b[1]  # a change in block 0 changes every later key (they are chained)
    c = block_hashes(list(range(16)) + [7] * 16, 16)
    assert c[0] == a[0] and c[1] != a[1]


def test_affinity_counts_only_unbroken_runs_from_the_first_block():
    table = PrefixAffinity()
    keys = block_hashes(list(range(64)), 16)
    table.record(keys[:3], "a")
    table.record(keys[:1], "b")
    assert table.matched_blocks(keys) == {"a": 3, "b": 1}
    table.forget("a")
    assert table.matched_blocks(keys) == {"b": 1}
    assert table.matched_blocks(block_hashes([5] * 64, 16)) == {}


def test_affinity_forgets_old_and_least_recently_used_entries():
    now = [0.0]
    table = PrefixAffinity(ttl_s=10, max_entries=4, clock=lambda: now[0])
    keys = block_hashes(list(range(64)), 16)
    table.record(keys, "a")
    now[0] = 11.0
    assert table.matched_blocks(keys) == {}  # older than the TTL
    table.record(block_hashes([1] * 96, 16), "b")  # 6 new keys push the oldest out of a table of 4
    assert len(table) == 4 and table.matched_blocks(keys) == {}


# --- scores ------------------------------------------------------------------------------------------------------------

def test_load_routing_avoids_the_backend_with_a_long_prefill_queued():
    pool = _pool("a", "b")
    router = Router(pool)
    _backend(pool, "a").prefill_tokens = 2000  # a long prompt waits there for its first token
    assert router.choose(list(range(40))).backend.name == "b"
    _backend(pool, "a").prefill_tokens = 0
    _backend(pool, "b").inflight = 5
    _backend(pool, "b").stats.num_running = 5
    assert router.choose(list(range(40))).backend.name == "a"


def test_load_routing_weighs_kv_use_step_time_and_fit():
    pool = _pool("a", "b")
    router = Router(pool)
    a, b = _backend(pool, "a"), _backend(pool, "b")
    a.stats.gpu_kv_blocks_used = 900
    assert router.choose([1] * 8).backend is b
    a.stats.gpu_kv_blocks_used, b.step.seconds, a.step.seconds = 0, 0.5, 0.1
    assert router.choose([1] * 8).backend is a
    a.stats.gpu_kv_blocks_used = 999  # 16 free tokens: a 40-token prompt does not fit, whatever else
    a.step.seconds = 0.0
    assert router.choose(list(range(40))).backend is b


def test_prefix_affinity_keeps_a_shared_prefix_on_one_backend_unless_it_is_loaded():
    pool = _pool("a", "b", "c")
    router = Router(pool)
    system = list(range(1000, 1160))  # 10 blocks of a shared system prompt
    first = router.choose(system + [1, 2, 3])
    router.affinity.record(first.keys, first.backend.name)
    again = router.choose(system + [7, 8, 9, 10])
    assert again.backend is first.backend and again.matched_blocks == 10
    first.backend.prefill_tokens = 50_000  # that backend is swamped: load wins over affinity
    assert router.choose(system + [4]).backend is not first.backend


def test_equal_backends_get_one_prefix_in_one_place_and_short_prompts_in_turn():
    pool = _pool("a", "b", "c")
    router = Router(pool)
    prompt = list(range(64))
    assert len({router.choose(prompt).backend.name for _ in range(10)}) == 1  # rendezvous hash: stable
    assert {router.choose([1, 2]).backend.name for _ in range(6)} == {"a", "b", "c"}


def test_round_robin_takes_backends_in_turn_and_skips_unroutable_ones():
    pool = _pool("a", "b", "c")
    router = Router(pool, policy="round-robin")
    _backend(pool, "a").prefill_tokens = 10**6  # ignored by round-robin
    assert [router.choose([1]).backend.name for _ in range(6)] == ["a", "b", "c"] * 2
    _backend(pool, "b").healthy = False
    assert {router.choose([1]).backend.name for _ in range(4)} == {"a", "c"}


def test_no_routable_backend_is_unavailable():
    pool = _pool("a", "b")
    router = Router(pool)
    for b in pool:
        b.client.connected = False  # the stream to its worker broke
    with pytest.raises(BackendUnavailableError, match="no backend is serving"):
        router.choose([1, 2, 3])
    _backend(pool, "a").client.connected = True
    with pytest.raises(BackendUnavailableError, match="no other backend"):
        router.choose([1], exclude={"a"})


def test_retired_and_mismatched_backends_get_nothing():
    pool = _pool("a", "b", "c")
    router = Router(pool)
    _backend(pool, "b").mismatch = "serves another model"
    pool.set_discovered({"b", "c"}, keep=set())  # discovery lost "a"
    assert [b.name for b in pool] == ["b", "c"] and any(b.retired for b in pool.all())
    assert {router.choose([i]).backend.name for i in range(6)} == {"c"}


def test_step_clock_measures_busy_intervals_only():
    clock = StepClock()
    clock.observe(0.0, 100, busy=True)
    clock.observe(1.0, 120, busy=True)
    assert clock.seconds == pytest.approx(0.05)
    clock.observe(5.0, 121, busy=False)  # idle most of that time: not a step time
    assert clock.seconds == pytest.approx(0.05)


def test_backend_flag_is_parsed_with_a_clear_error():
    assert BackendSpec.parse("10.0.0.1:50061") == BackendSpec("10.0.0.1:50061")
    assert BackendSpec.parse("unix:/r/w.sock,sidecar=unix:/r/s.sock") == BackendSpec("unix:/r/w.sock",
                                                                                    "unix:/r/s.sock")
    with pytest.raises(ValidationError, match="sidecar=ADDR"):
        BackendSpec.parse("unix:/r/w.sock,side=unix:/r/s.sock")
    from gateway.discovery import split_host_port

    with pytest.raises(ValidationError, match="NAME:PORT"):
        split_host_port("neoserve-worker")
