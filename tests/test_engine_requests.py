"""Request-level behaviour of the engine: validation, stops, aborts, seeds, logprobs (real SmolLM2, in process)."""

from __future__ import annotations

import math

import pytest
import torch

from gpu_worker.config import EngineConfig
from gpu_worker.engine import LLMEngine
from neoserve.errors import ValidationError
from neoserve.outputs import FinishReason
from neoserve.sampling_params import SamplingParams
from tests.test_engine_vs_transformers import DEVICE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(threads=1, max_model_len=512, device=DEVICE, dtype="float32"))


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a story."}]))


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, dict]:
    """Adds all requests, steps to the end; returns per request its tokens, finish output and logprobs."""
    results = {rid: {"tokens": [], "logprobs": [], "final": None} for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            r = results[out.request_id]
            r["tokens"] += out.new_token_ids
            r["logprobs"] += out.new_logprobs or []
            if out.finished:
                r["final"] = out
    assert engine.block_manager.num_used_blocks == 0
    return results


@pytest.mark.parametrize("field, kwargs", [
    ("max_tokens", {"max_tokens": 0}),
    ("temperature", {"temperature": -0.5}),
    ("temperature", {"temperature": float("nan")}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.5}),
    ("top_k", {"top_k": -1}),
    ("min_p", {"min_p": 2.0}),
    ("stop", {"stop": [3]}),
    ("stop", {"stop": "not a list"}),
    ("seed", {"seed": -1}),
    ("logprobs", {"logprobs": 99}),
])
def test_bad_sampling_params_name_the_field(field, kwargs):
    with pytest.raises(ValidationError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field


def test_bad_prompts_are_refused_and_the_engine_keeps_serving(engine, prompt):
    with pytest.raises(ValidationError) as e:
        engine.add_request("empty", [], SamplingParams())
    assert e.value.field == "prompt"
    with pytest.raises(ValidationError) as e:
        engine.add_request("long", [1] * 600, SamplingParams())
    assert e.value.field == "prompt" and "512" in str(e.value)
    with pytest.raises(ValidationError) as e:
        engine.add_request("oov", [10**9], SamplingParams())
    assert e.value.field == "prompt_token_ids"
    out = run(engine, {"ok": (prompt, SamplingParams(max_tokens=3, temperature=0))})
    assert len(out["ok"]["tokens"]) == 3 and out["ok"]["final"].finish_reason == FinishReason.LENGTH


def test_abort_frees_blocks(engine, prompt):
    engine.add_request("a", prompt, SamplingParams(max_tokens=50))
    engine.add_request("b", prompt, SamplingParams(max_tokens=50))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0
    final = engine.abort_request("a")
    assert final.finished and final.finish_reason == FinishReason.ABORT
    engine.abort_request("b")
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished()
    assert engine.abort_request("a") is None  # already gone: a no-op


def test_eos_stops_and_is_not_emitted(engine, tokenizer):
    # A greedy chat answer to a short question ends with <|im_end|> (id 2) well before 64 tokens.
    p = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    out = run(engine, {"q": (p, SamplingParams(max_tokens=64, temperature=0))})["q"]
    assert out["final"].finish_reason == FinishReason.STOP and out["final"].stop_token_id == 2
    assert 2 not in out["tokens"] and "Paris" in tokenizer.decode(out["tokens"])
    ignored = run(engine, {"q": (p, SamplingParams(max_tokens=out["final"].num_output_tokens + 3, temperature=0,
                                                   ignore_eos=True))})["q"]
    assert ignored["final"].finish_reason == FinishReason.LENGTH
    assert ignored["tokens"][:len(out["tokens"])] == out["tokens"]


def test_stop_token_ids(engine, prompt):
    free = run(engine, {"f": (prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))})["f"]["tokens"]
    stop_at = free[4]
    out = run(engine, {"s": (prompt, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop_at]))})["s"]
    first = free.index(stop_at)
    assert out["tokens"] == free[:first] and out["final"].stop_token_id == stop_at


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(engine, prompt, tokenizer):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=1234)
    alone = run(engine, {"x": (prompt, params)})["x"]["tokens"]
    other = tokenizer.encode("The quick brown fox")
    mixed = run(engine, {
        "n1": (other, SamplingParams(max_tokens=20, temperature=0.8)),
        "x": (prompt, params),
        "n2": (prompt, SamplingParams(max_tokens=5, temperature=1.0, seed=7)),
    })["x"]["tokens"]
    assert mixed == alone
    different = run(engine, {"y": (prompt, SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95,
                                                          seed=4321))})["y"]["tokens"]
    assert different != alone


def test_logprobs_match_transformers(engine, prompt, hf_model):
    out = run(engine, {"l": (prompt, SamplingParams(max_tokens=4, temperature=0, logprobs=3))})["l"]
    assert len(out["logprobs"]) == 4
    with torch.inference_mode():
        ids = torch.tensor([prompt + out["tokens"]])
        ref = torch.log_softmax(hf_model(ids).logits[0].double(), dim=-1)
    for i, lp in enumerate(out["logprobs"]):
        row = ref[len(prompt) - 1 + i]
        assert lp.token_id == out["tokens"][i]
        assert math.isclose(lp.logprob, row[lp.token_id].item(), abs_tol=1e-3)
        top = row.topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert all(math.isclose(v, r, abs_tol=1e-3) for (_, v), r in zip(lp.top, top.values.tolist()))
