"""What the roofline needs of a model: parameter counts, FLOPs and KV bytes per token, from its published shape."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer's matmuls (q/k/v/o projections, gate/up/down MLP); norms left out."""
        h = self.hidden_size
        return h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * self.intermediate_size

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def matmul_params(self) -> int:
        """Weights a forward reads: every layer's matmuls and the LM head (embedding rows are a gather)."""
        return self.num_layers * self.layer_params + self.lm_head_params

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelShape":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    @classmethod
    def from_model_config(cls, mc) -> "ModelShape":
        """From gpu_worker.model.config.ModelConfig."""
        return cls(mc.name or mc.architecture, mc.num_layers, mc.hidden_size, mc.intermediate_size, mc.num_heads,
                   mc.num_kv_heads, mc.head_dim, mc.vocab_size)


def resolve(spec: str) -> ModelShape:
    """A model for `plan --model`: a random-weights shape name (llama-3-8b, llama-2-7b, smollm2-135m, with or without
    `random:`), `embedded` (SmolLM2-135M's shape), or a Hugging Face config.json (or the folder holding one)."""
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" and path.is_file():
        c = json.loads(path.read_text())
        heads = c["num_attention_heads"]
        return ModelShape(c.get("_name_or_path") or path.parent.name, c["num_hidden_layers"], c["hidden_size"],
                          c["intermediate_size"], heads, c.get("num_key_value_heads", heads),
                          c.get("head_dim") or c["hidden_size"] // heads, c["vocab_size"])
    # NOTE: the published shapes live in one table, the random-weights loader's; importing it costs torch's import.
    from gpu_worker.model.random_weights import random_model_config

    name = "smollm2-135m" if spec == "embedded" else spec.removeprefix("random:")
    return ModelShape.from_model_config(random_model_config(name))
