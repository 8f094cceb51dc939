"""The engine's numbers against transformers loading the same GGUF (an implementation nobody here wrote)."""

from __future__ import annotations

import os

import pytest
import torch

from gpu_worker.config import EngineConfig
from gpu_worker.engine import LLMEngine
from neoserve.outputs import FinishReason
from neoserve.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

NEW_TOKENS = 32
# NOTE: bench/gpu_check.sh sets this to cuda: the same exact-match checks then hold the CUDA path (fp32) to them.
DEVICE = os.environ.get("NEOSERVE_TEST_DEVICE", "cpu")
LONG_TEXT = ("The history of computing spans centuries, from the abacus to mechanical calculators, "
             "to the programmable machines of the twentieth century and the networks that connect them. ") * 40


def _prompts(tokenizer) -> list[list[int]]:
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Color of the sky?"}],
        [{"role": "user", "content": "Write a haiku about GPUs."}, {"role": "assistant", "content": "Silicon hums."},
         {"role": "user", "content": "Another one, about CPUs."}],
    ]
    raw = ["Hi", "def fibonacci(n):\n    ", "1, 2, 3, 5, 8, 13,", "Once upon a time in a land far away, there lived",
           LONG_TEXT]
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(c)) for c in chats]
    prompts += [tokenizer.encode(t) for t in raw]
    assert len(prompts[-1]) > 1000
    return prompts


@torch.inference_mode()
def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with transformers' forward and its own KV cache (no EOS stop: compares all n tokens)."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens = []
    for _ in range(n):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        # NOTE: transformers 5 names the cache `cache` (in and out); 4.x called it `past_key_values`.
        key = "cache" if "cache" in out else "past_key_values"
        out = model(torch.tensor([[nxt]]), use_cache=True, **{key: out[key]})
    return tokens


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return _prompts(tokenizer)


@pytest.fixture(scope="module")
def reference(hf_model, prompts):
    return [_hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(seed=0, device=DEVICE, dtype="float32"))


def _greedy():
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


def _run(engine: LLMEngine, prompts, arrival_steps: list[int]) -> list[list[int]]:
    """Adds prompt i at step arrival_steps[i]; runs to completion; returns each request's tokens."""
    tokens = {str(i): [] for i in range(len(prompts))}
    step = 0
    pending = sorted(range(len(prompts)), key=lambda i: arrival_steps[i])
    while pending or engine.has_unfinished():
        while pending and arrival_steps[pending[0]] <= step:
            i = pending.pop(0)
            engine.add_request(str(i), prompts[i], _greedy())
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                assert out.finish_reason == FinishReason.LENGTH
        step += 1
    assert engine.block_manager.num_used_blocks == 0
    return [tokens[str(i)] for i in range(len(prompts))]


def test_prompt_logits_match_transformers(engine, hf_model, prompts):
    for prompt in (prompts[0], prompts[4], prompts[-1]):
        ours = engine.runner.prompt_logits(prompt).cpu()
        with torch.inference_mode():
            ref = hf_model(torch.tensor([prompt])).logits[0].float()
        assert ours.shape == ref.shape
        diff = (ours - ref).abs().max().item()
        assert diff < 1e-3, f"prompt of {len(prompt)} tokens: max |logit diff| {diff}"


def test_greedy_alone_matches_transformers(engine, prompts, reference):
    for i, prompt in enumerate(prompts):
        assert _run(engine, [prompt], [0])[0] == reference[i], f"prompt {i} ({len(prompt)} tokens)"


def test_greedy_batched_staggered_matches_transformers(engine, prompts, reference):
    arrivals = [0, 0, 3, 5, 5, 9, 14, 20]
    assert _run(engine, prompts, arrivals) == reference


def test_greedy_chunked_prefill_matches_transformers(engine, prompts, reference):
    """A small token budget splits prompts into chunks that attend to their cached prefix."""
    engine.scheduler.config.max_num_batched_tokens = 96
    try:
        assert _run(engine, prompts, [0, 1, 2, 3, 4, 5, 6, 7]) == reference
    finally:
        engine.scheduler.config.max_num_batched_tokens = engine.config.max_num_batched_tokens


def test_greedy_with_preemption_matches_transformers(prompts, reference):
    """A KV cache too small for all requests forces recompute-preemption; the output must not change."""
    engine = LLMEngine(EngineConfig(gpu_kv_tokens=1600, max_num_batched_tokens=512, device=DEVICE, dtype="float32"))
    assert _run(engine, prompts, [0] * len(prompts)) == reference
    assert engine.scheduler.num_preemptions > 0


def test_greedy_with_layer_graphs_matches_transformers(prompts, reference):
    """Decode-only steps replay each layer's projections and MLP from graphs over padded static buffers (real CUDA
    graphs with NEOSERVE_TEST_DEVICE=cuda; on the CPU the same buffers run eagerly). Staggered arrivals give every
    batch size from 1 to 8, so decodes run in buckets 1, 2, 4 (3 padded to 4) and eagerly above the largest (4)."""
    engine = LLMEngine(EngineConfig(seed=0, device=DEVICE, dtype="float32", cuda_graphs=True, cuda_graph_max_batch=4))
    assert engine.runner.graphs is not None and engine.runner.graphs.buckets == [1, 2, 4]
    graphed = []
    start = engine.runner.graphs.start

    def counting_start(role, x, rope):
        run = start(role, x, rope)
        graphed.append(x.shape[0] if run is not None else 0)
        return run

    engine.runner.graphs.start = counting_start
    assert _run(engine, prompts, [0, 0, 3, 5, 5, 9, 14, 20]) == reference
    # Sizes 1 and 2 fill their buckets, 3 pads to 4, and 0 marks decode-only batches above 4 that ran eagerly.
    assert {0, 1, 2, 3} <= set(graphed), graphed
