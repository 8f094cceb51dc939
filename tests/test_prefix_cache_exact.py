"""Prefix caching keeps every mode token-exact against transformers (an implementation nobody here wrote).

Prompts share a prefix with earlier ones of every length relative to the KV block size (shorter than a block,
exactly one, one plus a token, ...; identical prompts of a block multiple and of a block multiple plus one, whose
hit leaves only the last prompt token to compute), and arrive apart (each after the previous finished: every hit
the cache can give) or together (a small token budget spreads their prefills over steps, so later ones hit blocks
the earlier ones just computed). Requests arriving apart also report exactly the cached tokens the cache must give.
"""

from __future__ import annotations

import pytest

from gpu_worker.config import EngineConfig
from gpu_worker.engine import LLMEngine
from gpu_worker.pipeline_planner import PipelinePlanner
from neoserve.sampling_params import SamplingParams
from tests.test_engine_vs_transformers import DEVICE, LONG_TEXT, _hf_greedy

pytestmark = pytest.mark.slow

BS = 16
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    base = tokenizer.encode(LONG_TEXT)[:70]
    other = tokenizer.encode("Meanwhile, in a quiet village by the sea, the fishermen mended their nets and sang.")
    assert len(other) >= 12 and all(other[0] != t for t in base), "the variants must diverge where they say"
    out = [base]
    for shared in (5, 16, 17, 32, 33, 64):  # shares `shared` tokens with base, then differs
        out.append(base[:shared] + other[:12])
    for length in (16, 33):  # identical to a prefix of base: a block multiple, and one more token
        out.append(base[:length])
    out.append(base)  # all of it again
    out.append(base + other[:5])  # base and more
    return out


@pytest.fixture(scope="module")
def reference(hf_model, prompts):
    return [_hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]


def _engine(**kw) -> LLMEngine:
    engine = LLMEngine(EngineConfig(seed=0, device=DEVICE, dtype="float32", block_size=BS, threads=1, **kw))
    # NOTE: a planner without a cost model moves sequences to the CPU wherever GPU room runs out (auto), so the
    # migrations do not depend on this machine's load (as in test_neo_modes.py).
    engine.scheduler.planner = PipelinePlanner()
    return engine


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _run(engine: LLMEngine, prompts, arrivals: list[int]) -> tuple[list[list[int]], list[int], list[list[int]]]:
    """Adds prompt i at step arrivals[i] (-1: once everything before it finished). Returns each request's tokens,
    its cached prompt tokens, and the tokens whose KV it left computed on the device."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    tokens = {str(i): [] for i in range(len(prompts))}
    cached, computed = {}, {}
    step, nxt = 0, 0
    while nxt < len(prompts) or engine.has_unfinished():
        while nxt < len(prompts) and (0 <= arrivals[nxt] <= step or (arrivals[nxt] < 0 and not engine.has_unfinished())):
            engine.add_request(str(nxt), prompts[nxt], params)
            nxt += 1
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                cached[out.request_id] = out.num_cached_tokens
                # NOTE: the sampled last token's KV is never computed; in cpu-all decodes ran in the sidecar.
                on_device = prompts[int(out.request_id)] + tokens[out.request_id][:-1]
                computed[out.request_id] = on_device if engine.scheduler.config.mode == "gpu-only" else \
                    prompts[int(out.request_id)]
        step += 1
    assert engine.block_manager.num_used_blocks == 0
    engine.block_manager.check([])
    keys = [str(i) for i in range(len(prompts))]
    return [tokens[k] for k in keys], [cached[k] for k in keys], [computed[k] for k in keys]


def _expected_cached(prompts, computed) -> list[int]:
    """Apart, with nothing evicted: each prompt's longest prefix that an earlier request computed, in whole blocks,
    leaving its last token to compute."""
    return [max([min(_lcp(p, c), len(p) - 1) // BS * BS for c in computed[:i]], default=0)
            for i, p in enumerate(prompts)]


def _check_apart(engine, prompts, reference):
    engine.reset_prefix_cache()
    tokens, cached, computed = _run(engine, prompts, [-1] * len(prompts))
    assert tokens == reference
    assert cached == _expected_cached(prompts, computed)
    assert sum(cached) > 0


def _check_together(engine, prompts, reference):
    engine.reset_prefix_cache()
    before = engine.stats().prefix_cache_hit_tokens
    engine.scheduler.config.max_num_batched_tokens = 48
    try:
        tokens, _, _ = _run(engine, prompts, [0] * (len(prompts) // 2) + [1] * (len(prompts) - len(prompts) // 2))
    finally:
        engine.scheduler.config.max_num_batched_tokens = engine.config.max_num_batched_tokens
    assert tokens == reference
    assert engine.stats().prefix_cache_hit_tokens > before, "requests arriving together never shared a block"


@pytest.fixture(scope="module")
def gpu_engine():
    engine = _engine(mode="gpu-only")
    yield engine
    engine.close()


def test_gpu_only_apart(gpu_engine, prompts, reference):
    _check_apart(gpu_engine, prompts, reference)


def test_gpu_only_together(gpu_engine, prompts, reference):
    _check_together(gpu_engine, prompts, reference)


@pytest.mark.full  # NOTE: preemption and eviction with refcounts are also property-tested in test_prefix_cache.py
def test_gpu_only_with_preemption_and_eviction(prompts, reference):
    """A device cache of 10 blocks: requests preempt each other and cached blocks are evicted while others are
    parked and hit again."""
    engine = _engine(mode="gpu-only", gpu_kv_tokens=10 * BS, max_num_batched_tokens=64)
    try:
        tokens, _, _ = _run(engine, prompts, [0] * len(prompts))
        stats = engine.stats()
    finally:
        engine.close()
    assert tokens == reference
    assert stats.num_preemptions > 0 and stats.prefix_cache_evictions > 0 and stats.prefix_cache_hit_tokens > 0


@pytest.mark.full  # NOTE: the sidecar's side is also run by test_auto_with_migrations in the default run
def test_cpu_all(prompts, reference):
    engine = _engine(mode="cpu-all", cpu_kv_gib=0.25)
    try:
        _check_apart(engine, prompts, reference)
        _check_together(engine, prompts, reference)
        # NOTE: every decode after the first output token (a hit that leaves only the last prompt token to compute
        # runs that token as a GPU "decode": it is the prompt's, computed before the sequence moves).
        assert engine.stats().num_cpu_decodes == 2 * len(prompts) * (NEW_TOKENS - 1)
    finally:
        engine.close()


@pytest.mark.full  # NOTE: the scheduler's auto migrations with shared prefixes are property-tested in test_prefix_cache.py
def test_auto_with_migrations(prompts, reference):
    """Room for a few sequences on the device: the rest move to the CPU and back while prefixes are shared."""
    engine = _engine(mode="auto", cpu_kv_gib=0.25, gpu_kv_tokens=14 * BS)
    try:
        tokens, _, _ = _run(engine, prompts, [i // 3 for i in range(len(prompts))])
        stats = engine.stats()
        _check_apart(engine, prompts, reference)
    finally:
        engine.close()
    assert tokens == reference
    assert stats.num_swap_outs > 0 and stats.prefix_cache_hit_tokens > 0
