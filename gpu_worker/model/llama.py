"""The Llama-family decoder (Llama 2/3, SmolLM2, Qwen2, Mistral) as plain torch functions over fused weights.

The forward is split per layer into `pre_attention` (norm, QKV projection, RoPE) and `post_attention` (output
projection, MLP), with attention left to the caller: that seam is where the model runner routes each sequence's
attention to the device's paged cache or to the CPU sidecar, and where it pipelines two sub-batches.
Numerics follow transformers' LlamaForCausalLM operation for operation (fp32 on CPU matches its logits).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from gpu_worker.model.config import ModelConfig
from gpu_worker.model.quant import Weight, linear
from gpu_worker.model.rope import rope_inv_freq


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: Weight  # [q_size + 2 * kv_size, hidden]
    qkv_bias: torch.Tensor | None  # [q_size + 2 * kv_size] (Qwen2)
    o_proj: Weight  # [hidden, q_size]
    post_norm: torch.Tensor  # [hidden]
    gate_up: Weight  # [2 * intermediate, hidden]
    down: Weight  # [hidden, intermediate]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op; same numbers as the line below in fp32
    # NOTE: normalise in fp32 and cast back before the weight multiply, as transformers' LlamaRMSNorm does.
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, 1, D]. Non-interleaved halves (HF layout; GGUF Q/K are un-permuted on load)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [T, heads, D]
    return x * cos + rotated * sin


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], max_positions: int):
        self.config = config
        w = weights
        self.embed_tokens = w["model.embed_tokens.weight"]  # [V, hidden]
        self.device = self.embed_tokens.device
        self.dtype = self.embed_tokens.dtype
        self.lm_head = self.embed_tokens if config.tie_word_embeddings else w["lm_head.weight"]  # [V, hidden]
        self.final_norm = w["model.norm.weight"]
        self.layers: list[LayerWeights] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            attn = p + "self_attn."
            # NOTE: one fused QKV and one fused gate/up matmul per layer: fewer, larger GEMMs (fewer kernel
            # launches on CUDA, fewer passes over activations on CPU). Same dot products as separate matmuls.
            qkv = torch.cat([w[attn + "q_proj.weight"], w[attn + "k_proj.weight"], w[attn + "v_proj.weight"]])
            bias = None
            if config.attention_bias:
                bias = torch.cat([w[attn + "q_proj.bias"], w[attn + "k_proj.bias"], w[attn + "v_proj.bias"]])
            gate_up = torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]])
            self.layers.append(LayerWeights(
                input_norm=w[p + "input_layernorm.weight"], qkv=qkv, qkv_bias=bias,
                o_proj=w[attn + "o_proj.weight"], post_norm=w[p + "post_attention_layernorm.weight"],
                gate_up=gate_up, down=w[p + "mlp.down_proj.weight"],
            ))
        # Rotary tables for every position, in fp32 like transformers, cast to the activation dtype at use.
        inv_freq = rope_inv_freq(config).to(self.device)  # [D / 2]
        t = torch.arange(max_positions, device=self.device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_positions, D / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, D]
        self.cos = emb.cos().to(self.dtype)
        self.sin = emb.sin().to(self.dtype)
        self.scale = config.head_dim ** -0.5

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def variant(self, dtype: torch.dtype, project: Callable[[torch.Tensor], Weight] | None = None,
                head: Callable[[torch.Tensor], Weight] | None = None) -> "LlamaModel":
        """The same model with activations in `dtype` and each projection (and the LM head) converted by
        `project` (and `head`), e.g. to quant.Q4Weight: the small-batch decode model next to the dense one.
        Unconverted tensors are cast to `dtype` (shared, not copied, where they already have it)."""
        cast = lambda t: None if t is None else t.to(self.device, dtype)  # noqa: E731
        project = project or cast
        other = copy.copy(self)
        other.dtype = dtype
        other.embed_tokens = cast(self.embed_tokens)
        other.final_norm = cast(self.final_norm)
        # NOTE: call this on the fp32 model as loaded: quantizing weights already rounded to bf16 rounds twice.
        other.layers = [LayerWeights(
            input_norm=cast(w.input_norm), qkv=project(w.qkv), qkv_bias=cast(w.qkv_bias), o_proj=project(w.o_proj),
            post_norm=cast(w.post_norm), gate_up=project(w.gate_up), down=project(w.down)) for w in self.layers]
        other.lm_head = (head or cast)(self.lm_head)
        other.cos, other.sin = cast(self.cos), cast(self.sin)
        return other

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_tokens)  # [T, hidden]

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Looked up once per step and shared by all layers."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # [T, 1, D] each

    def pre_attention(self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """x [T, hidden] residual stream -> q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]."""
        c = self.config
        layer = self.layers[i]
        h = rms_norm(x, layer.input_norm, c.rms_norm_eps)  # [T, hidden]
        qkv = linear(h, layer.qkv, layer.qkv_bias)  # [T, q_size + 2 * kv_size]
        qk, v = qkv.split([c.q_size + c.kv_size, c.kv_size], dim=-1)
        cos, sin = rope
        # NOTE: q and k heads rotate together in one pass (same positions), halving the elementwise ops.
        qk = apply_rope(qk.view(-1, c.num_heads + c.num_kv_heads, c.head_dim), cos, sin)  # [T, Hq + Hkv, D]
        q, k = qk.split([c.num_heads, c.num_kv_heads], dim=1)
        return q, k, v.view(-1, c.num_kv_heads, c.head_dim)

    def post_attention(self, i: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """x [T, hidden], attn [T, Hq * D] -> next layer's residual stream [T, hidden]."""
        layer = self.layers[i]
        x = x + linear(attn, layer.o_proj)  # [T, hidden]
        h = rms_norm(x, layer.post_norm, self.config.rms_norm_eps)
        gate, up = linear(h, layer.gate_up).chunk(2, dim=-1)  # [T, intermediate] each
        return x + linear(F.silu(gate) * up, layer.down)  # [T, hidden]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, hidden] residual stream at the sampled positions -> [N, V] fp32."""
        h = rms_norm(x, self.final_norm, self.config.rms_norm_eps)
        return linear(h, self.lm_head).float()
