"""In-process, deterministic sidecar faults: the worker's engine with a real sidecar process that the test SIGKILLs at
an exact point, where a whole server could only hit that point by chance.

What must hold (docs/RELIABILITY.md, "Process faults"): a sidecar death is acted on when it happens, also while the
server is idle; every request whose KV the sidecar held either finishes exactly (recomputed on the GPU) or fails with
a clear status, never with tokens decoded from KV that did not arrive.

Reference for every generated token: the engine in this process (tests/test_reliability_common.py).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.test_reliability_common import PROMPTS

pytest_plugins = ["tests.test_reliability_common"]

NEW_TOKENS = 24


def greedy(max_tokens: int = NEW_TOKENS):
    from neoserve.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def step_tokens(engine) -> list[int]:
    return [t for out in engine.step() for t in out.new_token_ids]


@pytest.mark.parametrize("kill_before_layer", [0, 1], ids=["before-any-layer", "after-the-first-layer"])
def test_sidecar_death_while_a_swap_in_is_in_flight_recomputes_exactly(reference, kill_before_layer):
    """A CPU sequence is swapped back in: the scheduler gives it GPU blocks and places it on the GPU before the
    runner copies its KV down from the sidecar. The sidecar dies in that window (before the first layer's copy, or
    after one layer arrived): the request must still produce exactly the reference tokens (it recomputes), not
    decode on blocks that never received their KV."""
    from gpu_worker.config import EngineConfig
    from gpu_worker.engine import LLMEngine

    engine = LLMEngine(EngineConfig(mode="cpu-all", threads=1, cpu_kv_gib=0.05))
    try:
        engine.add_request("victim", reference.tokenizer.encode(PROMPTS[0]), greedy())
        ids = []
        while engine.stats().num_cpu_sequences < 1:
            ids += step_tokens(engine)
        ids += step_tokens(engine)  # one decode on the CPU: the sidecar holds KV the GPU never had
        assert engine.stats().num_cpu_sequences == 1 and len(ids) < NEW_TOKENS
        # NOTE: auto swaps CPU sequences back in as soon as GPU blocks are free, which they all are. The device
        # cache is zeroed first: the blocks the swap-in gets may be the ones this sequence had before it moved, and
        # their stale KV would hide a copy that never happened.
        engine.scheduler.config.mode = "auto"
        engine.runner.kv_cache.zero_()
        sidecar, download = engine.sidecar, engine.sidecar.download_kv
        layers_copied = []

        def download_then_die(seq_id, layer, *args, **kwargs):
            if layer == kill_before_layer:
                sidecar._process.kill()
                sidecar._process.wait(10)
            download(seq_id, layer, *args, **kwargs)
            layers_copied.append(layer)

        sidecar.download_kv = download_then_die
        deadline = time.monotonic() + 120
        while engine.has_unfinished():
            assert time.monotonic() < deadline, "the request never finished"
            ids += step_tokens(engine)
        assert layers_copied == list(range(kill_before_layer)), "the sidecar did not die inside the swap-in"
        assert ids == reference.greedy(PROMPTS[0], NEW_TOKENS)
        stats = engine.stats()
        assert stats.mode == "gpu-only" and stats.num_swap_ins >= 1 and stats.num_preemptions >= 1
        assert (stats.gpu_kv_blocks_used, stats.cpu_kv_bytes_used, stats.num_running) == (0, 0, 0)
    finally:
        engine.close()


def test_sidecar_death_while_idle_is_acted_on_without_a_request():
    """The sidecar dies while no request runs: the worker's engine fails over (its stats say gpu-only) within
    seconds, not when the next request arrives."""
    from gpu_worker.async_engine import AsyncEngine
    from gpu_worker.config import EngineConfig
    from gpu_worker.server import ReattachingEngine, SidecarWatcher

    llm = ReattachingEngine(EngineConfig(mode="cpu-all", threads=1, cpu_kv_gib=0.05))
    engine = AsyncEngine(llm)
    process = llm.sidecar._process

    async def run() -> float:
        watcher = asyncio.get_running_loop().create_task(SidecarWatcher(llm, llm.sidecar.address).run())
        try:
            assert engine.stats().mode == "cpu-all"
            killed = time.monotonic()
            process.kill()
            while engine.stats().mode != "gpu-only":
                assert time.monotonic() - killed < 10, "the idle engine never noticed that its sidecar died"
                await asyncio.sleep(0.05)
            return time.monotonic() - killed
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await engine.shutdown()

    try:
        noticed_after = asyncio.run(run())
    finally:
        process.wait(10)
        llm.close()
    assert not llm.has_unfinished() and llm.sidecar is None
    print(f"idle sidecar death acted on after {noticed_after:.2f} s")
