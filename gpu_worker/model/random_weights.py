"""Random weights of a published model shape, for benchmarks (no large checkpoints can be downloaded here).

Tensors are created one at a time directly on the target device in the target dtype, so the peak memory is the
model itself (no fp32 staging copy, no CPU->GPU double). device="meta" gives the shapes without any memory, which is
how tests check the 8B shapes.
"""

from __future__ import annotations

import torch

from gpu_worker.model.config import ModelConfig
from gpu_worker.model.weight_shapes import expected_weights, is_norm_weight
from neoserve.errors import ModelLoadError

INIT_STD = 0.02  # HF's initializer_range for these models
DEFAULT_SEED = 0


def _llama_3_8b() -> ModelConfig:
    # meta-llama/Meta-Llama-3-8B(-Instruct) config.json; eos 128001 (base) and 128009 (<|eot_id|>, instruct).
    return ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=128000,
        eos_token_ids=[128001, 128009], name="random:llama-3-8b",
    )


def _llama_2_7b() -> ModelConfig:
    # meta-llama/Llama-2-7b-hf config.json.
    return ModelConfig(
        architecture="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=[2],
        name="random:llama-2-7b",
    )


def _smollm2_135m() -> ModelConfig:
    # HuggingFaceTB/SmolLM2-135M-Instruct, the embedded model's shape.
    return ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=[2],
        name="random:smollm2-135m",
    )


RANDOM_MODELS = {
    "llama-3-8b": _llama_3_8b,
    "llama-2-7b": _llama_2_7b,
    "smollm2-135m": _smollm2_135m,
}


def random_model_config(name: str) -> ModelConfig:
    """The published ModelConfig of a named shape; ModelLoadError lists the known names."""
    factory = RANDOM_MODELS.get(name)
    if factory is None:
        raise ModelLoadError(
            f"random:{name}: unknown random model shape; known: {', '.join('random:' + n for n in RANDOM_MODELS)}"
        )
    return factory()


def random_weights(
    config: ModelConfig, *, dtype: torch.dtype, device: torch.device | str, seed: int = DEFAULT_SEED
) -> dict[str, torch.Tensor]:
    """Seeded N(0, 0.02) matrices, norm weights 1 and biases 0 (HF's init), HF names, on `device` in `dtype`."""
    device = torch.device(device)
    generator = None
    if device.type != "meta":
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for name, exp in expected_weights(config).items():
        t = torch.empty(exp.shape, dtype=dtype, device=device)
        if device.type == "meta":
            pass  # NOTE: shape-only: nothing to fill.
        elif is_norm_weight(name):
            t.fill_(1.0)
        elif name.endswith(".bias"):
            t.zero_()
        else:
            t.normal_(0.0, INIT_STD, generator=generator)
        weights[name] = t
    return weights
