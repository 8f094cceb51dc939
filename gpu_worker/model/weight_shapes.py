"""The tensors a Llama-family decoder needs (Hugging Face names) and the shape each must have.

Every loader (GGUF, HF folder, random) checks what it found against this one table, so a checkpoint that does not
fit its config fails at start-up with a message naming the file, the tensor and the config fields behind the
expected shape, instead of failing later inside a matmul.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gpu_worker.model.config import ModelConfig
from neoserve.errors import ModelLoadError

# NOTE: old checkpoints saved the rotary cache as a buffer; it is derived from the config, never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ExpectedTensor:
    """Shape of one weight, with the ModelConfig fields each dimension comes from (for error messages)."""

    shape: tuple[int, ...]
    fields: tuple[str, ...]  # ModelConfig field names, in the order they appear in the shape


def expected_weights(config: ModelConfig) -> dict[str, ExpectedTensor]:
    """Hugging Face name -> expected shape, in a stable order (embeddings, layers in order, final norm, head)."""
    h, v, inter = config.hidden_size, config.vocab_size, config.intermediate_size
    q, kv = config.q_size, config.kv_size
    hidden = ("hidden_size",)
    q_fields = ("num_heads", "head_dim")
    kv_fields = ("num_kv_heads", "head_dim")
    out: dict[str, ExpectedTensor] = {
        "model.embed_tokens.weight": ExpectedTensor((v, h), ("vocab_size", "hidden_size")),
    }
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = ExpectedTensor((h,), hidden)
        out[p + "self_attn.q_proj.weight"] = ExpectedTensor((q, h), q_fields + hidden)
        out[p + "self_attn.k_proj.weight"] = ExpectedTensor((kv, h), kv_fields + hidden)
        out[p + "self_attn.v_proj.weight"] = ExpectedTensor((kv, h), kv_fields + hidden)
        if config.attention_bias:
            out[p + "self_attn.q_proj.bias"] = ExpectedTensor((q,), q_fields)
            out[p + "self_attn.k_proj.bias"] = ExpectedTensor((kv,), kv_fields)
            out[p + "self_attn.v_proj.bias"] = ExpectedTensor((kv,), kv_fields)
        out[p + "self_attn.o_proj.weight"] = ExpectedTensor((h, q), hidden + q_fields)
        out[p + "post_attention_layernorm.weight"] = ExpectedTensor((h,), hidden)
        out[p + "mlp.gate_proj.weight"] = ExpectedTensor((inter, h), ("intermediate_size", "hidden_size"))
        out[p + "mlp.up_proj.weight"] = ExpectedTensor((inter, h), ("intermediate_size", "hidden_size"))
        out[p + "mlp.down_proj.weight"] = ExpectedTensor((h, inter), ("hidden_size", "intermediate_size"))
    out["model.norm.weight"] = ExpectedTensor((h,), hidden)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = ExpectedTensor((v, h), ("vocab_size", "hidden_size"))
    return out


def is_norm_weight(name: str) -> bool:
    return name.endswith("layernorm.weight") or name == "model.norm.weight"


def describe_fields(config: ModelConfig, fields: tuple[str, ...], field_names: Mapping[str, str]) -> str:
    """'intermediate_size=1536, hidden_size=576' in the source's own key names (config.json keys, GGUF keys)."""
    seen: list[str] = []
    for f in fields:
        if f not in seen:
            seen.append(f)
    return ", ".join(f"{field_names.get(f, f)}={getattr(config, f)}" for f in seen)


def check_weight_shapes(
    config: ModelConfig,
    found: Mapping[str, tuple[int, ...]],
    *,
    file_of: Mapping[str, str],
    default_file: str,
    config_file: str,
    field_names: Mapping[str, str],
) -> None:
    """Raise ModelLoadError for the first missing, unexpected or mis-shaped tensor.

    found: HF name -> shape as stored; file_of: HF name -> file it came from (for the message); default_file names the
    file where a missing tensor was looked for; config_file and field_names say where the expected shape came from.
    """
    expected = expected_weights(config)
    for name in found:
        if name not in expected and not name.endswith(IGNORED_SUFFIXES):
            hint = ""
            if name.startswith("model.layers."):
                hint = f"; {config_file} {field_names.get('num_layers', 'num_layers')}={config.num_layers}"
            raise ModelLoadError(f"{file_of.get(name, default_file)}: unexpected tensor {name}{hint}")
    # NOTE: walk in model order so the first error reported is the first one a reader of the config would find.
    for name, exp in expected.items():
        if name not in found:
            hint = ""
            if name == "lm_head.weight":
                hint = f" ({config_file} {field_names.get('tie_word_embeddings', 'tie_word_embeddings')}=false)"
            elif name.startswith("model.layers."):
                hint = f" ({config_file} {field_names.get('num_layers', 'num_layers')}={config.num_layers})"
            raise ModelLoadError(f"{default_file}: tensor {name} is missing{hint}")
        shape = tuple(found[name])
        if shape != exp.shape:
            raise ModelLoadError(
                f"{file_of.get(name, default_file)}: tensor {name} has shape {list(shape)}, expected "
                f"{list(exp.shape)} from {config_file} {describe_fields(config, exp.fields, field_names)}"
            )
