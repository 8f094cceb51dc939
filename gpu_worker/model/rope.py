"""Rotary embedding inverse frequencies, with the rope_scaling variants Llama-family checkpoints use.

The math follows transformers' `modeling_rope_utils` operation for operation (same float32 ops in the same order), so
the frequencies agree bit for bit and so do the logits built on them.
"""

from __future__ import annotations

import math

import torch

from gpu_worker.model.config import ModelConfig
from neoserve.errors import ModelLoadError

# NOTE: "freq_factors" is not a transformers type: it carries llama.cpp's per-frequency divisors (the GGUF tensor
# rope_freqs.weight, which is how llama.cpp stores Llama 3.1 scaling) so a GGUF loads without guessing parameters.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")


def rope_type(config: ModelConfig) -> str:
    """The scaling type of config.rope_scaling; HF files spell it `rope_type` (new) or `type` (old)."""
    scaling = config.rope_scaling
    if not scaling:
        return "default"
    value = scaling.get("rope_type", scaling.get("type", "default"))
    return "default" if value is None else str(value)


def _param(scaling: dict, key: str, rope: str) -> float:
    value = scaling.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelLoadError(f"rope_scaling.{key} is required for rope_type {rope!r} and must be a number, "
                             f"got {value!r}")
    return float(value)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies (CPU); the model moves them where it needs them.

    Raises ModelLoadError naming the rope_scaling field when the type is unsupported or a parameter is missing.
    """
    dim = config.head_dim
    if dim % 2 != 0:
        raise ModelLoadError(f"head_dim must be even for rotary embeddings, got {dim}")
    if not (isinstance(config.rope_theta, (int, float)) and config.rope_theta > 0):
        raise ModelLoadError(f"rope_theta must be a positive number, got {config.rope_theta!r}")
    base = float(config.rope_theta)
    # NOTE: int64 arange then float, as transformers does, so the float32 rounding is identical.
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))  # [dim // 2]

    kind = rope_type(config)
    scaling = config.rope_scaling or {}
    if kind == "default":
        return inv_freq
    if kind == "linear":
        factor = _param(scaling, "factor", kind)
        if factor <= 0:
            raise ModelLoadError(f"rope_scaling.factor must be > 0, got {factor}")
        return inv_freq / factor
    if kind == "llama3":
        return _llama3(inv_freq, scaling, config)
    if kind == "freq_factors":
        factors = torch.tensor(scaling.get("factors", []), dtype=torch.float32)  # [dim // 2]
        if factors.shape != inv_freq.shape:
            raise ModelLoadError(
                f"rope_scaling.factors has {factors.numel()} values, expected head_dim/2={inv_freq.numel()}"
            )
        return inv_freq / factors
    if kind == "dynamic":
        raise ModelLoadError(
            "rope_scaling.rope_type 'dynamic' is not supported (its frequencies change with sequence length); "
            f"supported: {', '.join(t for t in SUPPORTED_ROPE_TYPES if t != 'freq_factors')}"
        )
    raise ModelLoadError(
        f"rope_scaling.rope_type {kind!r} is not supported; "
        f"supported: {', '.join(t for t in SUPPORTED_ROPE_TYPES if t != 'freq_factors')}"
    )


def _llama3(inv_freq: torch.Tensor, scaling: dict, config: ModelConfig) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend in between."""
    factor = _param(scaling, "factor", "llama3")
    low_freq_factor = _param(scaling, "low_freq_factor", "llama3")
    high_freq_factor = _param(scaling, "high_freq_factor", "llama3")
    # NOTE: transformers falls back to max_position_embeddings when the original length is absent; so do we.
    old_context_len = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    if high_freq_factor == low_freq_factor:
        raise ModelLoadError("rope_scaling.high_freq_factor must differ from rope_scaling.low_freq_factor")

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # [dim // 2]
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * scaled / factor + smooth_factor * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
