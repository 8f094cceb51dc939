"""The CPU decode path: block-quantized small-batch model and torch.compile'd whole decode steps.

References: transformers (fp32, the GGUF dequantized) for the quantized path's accuracy, and the same step run
eagerly for the compiled graphs (compiled code must compute the same function, up to float reassociation).
"""

from __future__ import annotations

import pytest
import torch

from gpu_worker.attention import PagedKVCache
from gpu_worker.compiled_decode import CompiledDecode, decode_step
from gpu_worker.config import EngineConfig
from gpu_worker.cpu_formats import FormatPlan, plan_formats, source_quant
from gpu_worker.engine import LLMEngine
from gpu_worker.model import quant
from gpu_worker.model.config import ModelConfig
from gpu_worker.model.llama import LlamaModel
from gpu_worker.model.random_weights import random_weights

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden press adapted from those used to make wine. Within fifty "
        "years printers worked in more than two hundred cities across Europe, and the price of books fell so far "
        "that ordinary merchants could own them.")


def test_source_formats_map_to_kernels():
    assert source_quant("Q4_1") == "q4" and source_quant("Q4_K") == "q4" and source_quant("Q8_0") == "q8"
    assert source_quant("F16") is None and source_quant(None) is None


def test_float32_is_the_exact_plan():
    mc = ModelConfig("llama", 256, 64, 128, 2, 4, 2, 16)
    assert plan_formats(mc, "float32", "auto", "Q4_1", 8) == FormatPlan.exact()
    plan = plan_formats(mc, "float32", "q8", "Q4_1", 8)  # asked for by name: quantized at least at batch 1
    assert plan.quant == "q8" and plan.quant_max_batch >= 1 and plan.kv_dtype == torch.bfloat16


def test_shapes_the_block_formats_cannot_hold_are_served_dense():
    mc = ModelConfig("llama", 256, 80, 160, 2, 4, 2, 20)  # hidden 80: not a multiple of the 32-weight groups
    plan = plan_formats(mc, "float32", "q4", "Q4_1", 8)
    assert plan.quant is None and plan.quant_max_batch == 0


@pytest.mark.slow
def test_quantized_decode_path_agrees_with_transformers(hf_model, tokenizer):
    """Teacher forcing through the decode path that serves batch 1 (the Q4_1 weights, the Q8_0 LM head, bf16 KV):
    its greedy choice must match fp32 transformers at nearly every position."""
    engine = LLMEngine(EngineConfig(threads=1, quantization="q4", max_model_len=512, compile="off"))
    try:
        runner = engine.runner
        assert runner.quant_model is not None and runner.formats.kv_dtype == torch.bfloat16
        ids = tokenizer.encode(TEXT)
        ours = runner.prompt_logits(ids, decode_from=4)  # [T, V]: positions 4.. one decode step each
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0]  # [T, V]
        agree = (ours[4:].argmax(-1) == ref[4:].argmax(-1)).float().mean().item()
        assert len(ids) - 4 >= 50 and agree >= 0.9, f"top-1 agreement {agree:.3f}"
    finally:
        engine.close()


def _tiny_model(kind: str | None) -> LlamaModel:
    mc = ModelConfig("llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaModel(mc, random_weights(mc, dtype=torch.float32, device="cpu"), max_positions=256)
    if kind is None:
        return model
    return model.variant(torch.float32, project=lambda w: quant.quantize(w, kind), head=quant.quantize_q8)


def _step_inputs(batch: int, contexts: list[int], block_size: int, num_blocks: int):
    """Sequences on disjoint blocks; each decodes the token at position context - 1."""
    per_seq = num_blocks // batch
    tables = [[s * per_seq + b for b in range(per_seq)] for s in range(batch)]
    L = -(-max(contexts) // block_size) * block_size
    slots = torch.tensor([[t[p // block_size] * block_size + p % block_size for p in range(L)] for t in tables])
    mask = (torch.arange(L)[None, :] < torch.tensor(contexts)[:, None]).view(batch, 1, 1, L)
    pos = torch.tensor(contexts) - 1
    ids = torch.arange(batch) * 7 + 3
    return ids, pos, slots[torch.arange(batch), pos], slots, mask


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["q4", None], ids=["q4", "dense"])
def test_compiled_step_matches_the_eager_step(kind):
    """Batch 1 and batch >= 2 graphs (dynamic batch and context length) against the uncompiled function, writing
    the same K/V into the cache."""
    torch.manual_seed(0)  # NOTE: the data must not depend on which tests ran before in this process
    model = _tiny_model(kind)
    mc, bs, blocks = model.config, 16, 24
    cache = PagedKVCache(mc.num_layers, blocks, bs, mc.num_kv_heads, mc.head_dim, torch.bfloat16, torch.device("cpu"))
    for t in (*cache.k, *cache.v):
        t.normal_()
    compiled = CompiledDecode([model], cache, bs)
    compiled.start([(1, 8)])
    assert compiled.wait(timeout=600) and compiled.ready == {(0, False), (0, True)}, compiled.compile_seconds
    for batch, contexts in ((1, [5]), (1, [40]), (3, [17, 3, 60]), (5, [1, 2, 33, 64, 20])):
        inputs = _step_inputs(batch, contexts, bs, blocks)
        k_ref, v_ref = [t.clone() for t in cache.k], [t.clone() for t in cache.v]
        with torch.inference_mode():
            ref = decode_step(model, k_ref, v_ref, *inputs)  # [B, V]
            out = compiled.run(0, *inputs)
        assert out is not None and out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
        for a, b in zip(cache.k + cache.v, k_ref + v_ref):
            # NOTE: the same K/V up to one bf16 step: fused fp32 arithmetic may round the other way at the cast.
            torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=0.0,
                                       msg="the compiled step wrote different K/V")


def test_run_returns_none_until_compiled():
    model = _tiny_model(None)
    mc = model.config
    cache = PagedKVCache(mc.num_layers, 4, 16, mc.num_kv_heads, mc.head_dim, torch.float32, torch.device("cpu"))
    compiled = CompiledDecode([model], cache, 16)
    with torch.inference_mode():
        assert compiled.run(0, *_step_inputs(1, [3], 16, 4)) is None
