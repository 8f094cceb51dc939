"""Model loading: GGUF, Hugging Face folders and random shapes, checked against transformers as the reference.

References are independent of our code: transformers' own GGUF loader and state dicts, transformers' rope functions,
llama.cpp's Q/K permutation formula (convert_hf_to_gguf.py) written out here, and HF model classes built on the meta
device for the published shapes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gpu_worker.model.config import ModelConfig
from gpu_worker.model.loader import load_model
from gpu_worker.model.rope import rope_inv_freq
from neoserve.errors import ModelLoadError

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

torch.set_num_threads(1)

TINY = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def tiny_model(cls, config_cls, seed: int = 0, **overrides):
    """A tiny HF model with every parameter random (biases too, so a dropped or misplaced tensor shows)."""
    torch.manual_seed(seed)
    model = cls(config_cls(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def assert_same_weights(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], tied: bool,
                        dtype: torch.dtype = torch.float32) -> None:
    reference = dict(reference)
    if tied:
        assert torch.equal(reference.pop("lm_head.weight"), reference["model.embed_tokens.weight"])
    reference = {k: v for k, v in reference.items() if not k.endswith("rotary_emb.inv_freq")}
    assert sorted(ours) == sorted(reference)
    for name, ref in reference.items():
        assert ours[name].dtype == dtype, name
        assert ours[name].shape == ref.shape, name
        assert torch.equal(ours[name], ref.to(dtype)), name


# ----------------------------------------------------------------------------------------------------------- GGUF

def llamacpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (the reference, copied, not our inverse)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


GGUF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(path: Path, model, arch: str = "llama", qtype=gguf.GGMLQuantizationType.F32,
               meta_overrides: dict | None = None, skip_meta: tuple[str, ...] = (),
               extra_tensors: dict[str, np.ndarray] | None = None) -> None:
    """Write an HF model as llama.cpp's converter would (names, Q/K permutation for llama, untied output)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    meta = {
        "block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
        "head_count": cfg.num_attention_heads, "head_count_kv": cfg.num_key_value_heads,
        "rope_freq_base": cfg.rope_parameters["rope_theta"], "layer_norm_rms_eps": cfg.rms_norm_eps,
        "vocab_size": cfg.vocab_size, "bos_token_id": 1, "eos_token_id": 2,
    }
    meta.update(meta_overrides or {})
    writer.add_name("tiny-test")
    for key, value in meta.items():
        if key not in skip_meta:
            getattr(writer, f"add_{key}")(value)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{GGUF_BLOCK[rest]}"
        if arch == "llama" and gname.endswith("attn_q.weight"):
            data = llamacpp_permute(data, heads)
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            data = llamacpp_permute(data, kv_heads)
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gname, np.ascontiguousarray(data))
    for gname, data in (extra_tensors or {}).items():
        writer.add_tensor(gname, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def transformers_gguf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.state_dict()


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0,
                                   gguf.GGMLQuantizationType.Q4_1])
def test_tiny_llama_gguf_matches_transformers(tmp_path, qtype):
    model = tiny_model(LlamaForCausalLM, LlamaConfig, tie_word_embeddings=False)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model, qtype=qtype)
    config, weights = load_model(str(path), dtype=torch.float32, device="cpu")
    assert_same_weights(weights, transformers_gguf_state_dict(path), tied=False)
    if qtype == gguf.GGMLQuantizationType.F32:
        # Lossless file: the un-permuted Q/K must come back exactly as the HF model had them.
        assert_same_weights(weights, model.state_dict(), tied=False)
    assert (config.architecture, config.num_layers, config.hidden_size, config.intermediate_size) == ("llama", 2, 64, 128)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (4, 2, 16, 100)
    assert config.tie_word_embeddings is False and config.attention_bias is False
    assert config.eos_token_ids == [2] and config.bos_token_id == 1 and config.max_position_embeddings == 256


def test_tiny_qwen2_gguf_matches_transformers(tmp_path):
    model = tiny_model(Qwen2ForCausalLM, Qwen2Config, tie_word_embeddings=True)
    path = tmp_path / "tiny-qwen2.gguf"
    write_gguf(path, model, arch="qwen2")
    config, weights = load_model(str(path), dtype=torch.float32, device="cpu")
    assert config.architecture == "qwen2" and config.attention_bias and config.tie_word_embeddings
    assert "lm_head.weight" not in weights
    assert_same_weights(weights, transformers_gguf_state_dict(path), tied=True)
    assert_same_weights(weights, model.state_dict(), tied=True)  # qwen2 GGUFs are not permuted


def test_gguf_bf16_and_float16_cast(tmp_path):
    model = tiny_model(LlamaForCausalLM, LlamaConfig, tie_word_embeddings=True)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model)
    for dtype in (torch.bfloat16, torch.float16):
        _, weights = load_model(str(path), dtype=dtype, device="cpu")
        assert_same_weights(weights, model.state_dict(), tied=True, dtype=dtype)


def test_gguf_rope_freqs_tensor_is_llama3_scaling(tmp_path):
    """llama.cpp stores Llama 3.1 scaling as rope_freqs.weight (divisors); inv_freq must match transformers' llama3."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf_config = LlamaConfig(**{**TINY, "max_position_embeddings": 256}, rope_parameters=rope)
    expected = ROPE_INIT_FUNCTIONS["llama3"](hf_config, None)[0]
    default = 1.0 / (500000.0 ** (np.arange(0, 16, 2, dtype=np.float64) / 16))
    # llama.cpp's converter writes factors in float64 math, as here.
    factors = (default / expected.double().numpy()).astype(np.float32)
    model = tiny_model(LlamaForCausalLM, LlamaConfig, tie_word_embeddings=True, rope_parameters={
        "rope_type": "default", "rope_theta": 500000.0})
    path = tmp_path / "tiny-rope.gguf"
    write_gguf(path, model, extra_tensors={"rope_freqs.weight": factors})
    config, _ = load_model(str(path), dtype=torch.float32, device="cpu")
    torch.testing.assert_close(rope_inv_freq(config), expected, rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def embedded():
    return load_model(None, dtype=torch.float32, device="cpu")


@pytest.mark.slow
def test_embedded_gguf_matches_transformers(embedded):
    from neoserve.model_files import embedded_model_path

    config, weights = embedded
    path = embedded_model_path()
    ref_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    assert_same_weights(weights, ref_model.state_dict(), tied=True)
    hf = ref_model.config
    assert config.architecture == "llama"
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    assert config.rope_theta == hf.rope_parameters["rope_theta"] and config.rope_scaling is None
    assert config.rms_norm_eps == hf.rms_norm_eps
    assert config.max_position_embeddings == hf.max_position_embeddings == 8192
    assert config.tie_word_embeddings is True and "lm_head.weight" not in weights
    assert config.eos_token_ids == [2] and config.bos_token_id == 1
    # Same frequencies as the reference model's rotary embedding.
    assert torch.equal(rope_inv_freq(config), ref_model.model.rotary_emb.inv_freq)


# ------------------------------------------------------------------------------------------------------------ rope

def test_rope_default_matches_transformers():
    hf_config = LlamaConfig(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    ours = rope_inv_freq(ModelConfig("llama", 100, 64, 128, 2, 4, 2, 16, rope_theta=100000.0))
    assert ours.dtype == torch.float32 and ours.shape == (8,)
    assert torch.equal(ours, LlamaRotaryEmbedding(hf_config).inv_freq)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
     "original_max_position_embeddings": 8192},
])
def test_rope_scaling_matches_transformers(rope):
    theta = 500000.0
    hf_config = LlamaConfig(**{**TINY, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                               "max_position_embeddings": 131072}, rope_parameters={**rope, "rope_theta": theta})
    expected = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config, None)[0]
    config = ModelConfig("llama", 100, 4096, 128, 2, 32, 8, 128, rope_theta=theta, rope_scaling=dict(rope),
                         max_position_embeddings=131072)
    assert torch.equal(rope_inv_freq(config), expected)
    # Old config.json spelling: "type" instead of "rope_type".
    legacy = {("type" if k == "rope_type" else k): v for k, v in rope.items()}
    config.rope_scaling = legacy
    assert torch.equal(rope_inv_freq(config), expected)


@pytest.mark.parametrize("rope, field", [
    ({"rope_type": "yarn", "factor": 4.0}, "rope_scaling.rope_type"),
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_scaling.rope_type"),
    ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}, "rope_scaling.low_freq_factor"),
    ({"rope_type": "linear"}, "rope_scaling.factor"),
])
def test_rope_unsupported_or_incomplete_names_field(rope, field):
    config = ModelConfig("llama", 100, 64, 128, 2, 4, 2, 16, rope_scaling=rope)
    with pytest.raises(ModelLoadError, match=field.replace(".", r"\.")):
        rope_inv_freq(config)


# ------------------------------------------------------------------------------------------------ HF checkpoints

def test_hf_llama_folder(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    model = tiny_model(LlamaForCausalLM, LlamaConfig, tie_word_embeddings=False, rope_parameters=rope,
                       bos_token_id=5, eos_token_id=6, rms_norm_eps=1e-5)
    model.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [6, 9]}))
    config, weights = load_model(str(tmp_path), dtype=torch.float32, device=torch.device("cpu"))
    assert_same_weights(weights, model.state_dict(), tied=False)
    assert config.architecture == "llama" and config.attention_bias is False and config.sliding_window is None
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers) == (100, 64, 128, 2)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    assert config.rope_theta == 500000.0 and config.rope_scaling["rope_type"] == "llama3"
    assert config.rms_norm_eps == 1e-5 and config.max_position_embeddings == 256
    assert config.tie_word_embeddings is False
    assert config.bos_token_id == 5 and config.eos_token_ids == [6, 9]
    assert torch.equal(rope_inv_freq(config), model.model.rotary_emb.inv_freq)


def test_hf_qwen2_folder_tied_with_bias_bf16(tmp_path):
    model = tiny_model(Qwen2ForCausalLM, Qwen2Config, tie_word_embeddings=True, eos_token_id=[3, 4],
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    model.save_pretrained(tmp_path)
    config, weights = load_model(str(tmp_path), dtype=torch.bfloat16, device="cpu")
    assert_same_weights(weights, model.state_dict(), tied=True, dtype=torch.bfloat16)
    assert config.architecture == "qwen2" and config.attention_bias is True
    assert config.tie_word_embeddings is True and "lm_head.weight" not in weights
    assert "model.layers.1.self_attn.k_proj.bias" in weights
    assert config.eos_token_ids == [3, 4] and config.rope_theta == 1000000.0 and config.rope_scaling is None
    assert config.sliding_window is None  # Qwen2 ignores sliding_window unless use_sliding_window


def test_hf_mistral_sharded_folder(tmp_path):
    model = tiny_model(MistralForCausalLM, MistralConfig, sliding_window=32, head_dim=32)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    config, weights = load_model(str(tmp_path), dtype=torch.float32, device="cpu")
    assert_same_weights(weights, model.state_dict(), tied=False)
    assert config.architecture == "mistral" and config.sliding_window == 32
    assert config.head_dim == 32 and weights["model.layers.0.self_attn.q_proj.weight"].shape == (128, 64)


def test_hf_legacy_rope_fields(tmp_path):
    """Pre-transformers-5 config.json: top-level rope_theta and rope_scaling {"type": "linear"}."""
    model = tiny_model(LlamaForCausalLM, LlamaConfig)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg["rope_theta"] = 20000.0
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    config, _ = load_model(str(tmp_path), dtype=torch.float32, device="cpu")
    assert config.rope_theta == 20000.0 and config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    hf = LlamaConfig(**TINY, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0})
    assert torch.equal(rope_inv_freq(config), ROPE_INIT_FUNCTIONS["linear"](hf, None)[0])


# ------------------------------------------------------------------------------------------------------- errors

@pytest.fixture
def llama_folder(tmp_path):
    folder = tmp_path / "ckpt"
    tiny_model(LlamaForCausalLM, LlamaConfig, tie_word_embeddings=False).save_pretrained(folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def edit_tensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def expect_error(spec, *fragments: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(str(spec), dtype=torch.float32, device="cpu")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_error_unsupported_architecture(llama_folder):
    edit_config(llama_folder, architectures=["GPT2LMHeadModel"])
    expect_error(llama_folder, "config.json", "architectures[0]", "GPT2LMHeadModel")


def test_error_missing_config(llama_folder):
    (llama_folder / "config.json").unlink()
    expect_error(llama_folder, "config.json", "not found")


def test_error_missing_config_field(llama_folder):
    cfg = json.loads((llama_folder / "config.json").read_text())
    del cfg["intermediate_size"]
    (llama_folder / "config.json").write_text(json.dumps(cfg))
    expect_error(llama_folder, "config.json", "intermediate_size", "missing")


def test_error_unsupported_rope_in_config(llama_folder):
    edit_config(llama_folder, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    expect_error(llama_folder, "config.json", "rope_scaling.rope_type", "yarn")


def test_error_shape_mismatch(llama_folder):
    edit_config(llama_folder, intermediate_size=96)
    message = expect_error(llama_folder, "model.safetensors", "intermediate_size=96", "has shape")
    assert "expected [96, 64]" in message and "hidden_size=64" in message


def test_error_missing_tensor(llama_folder):
    edit_tensors(llama_folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    expect_error(llama_folder, "model.safetensors", "model.layers.1.mlp.up_proj.weight", "missing")


def test_error_missing_untied_head(llama_folder):
    edit_tensors(llama_folder, lambda t: t.pop("lm_head.weight"))
    expect_error(llama_folder, "model.safetensors", "lm_head.weight", "tie_word_embeddings")


def test_error_extra_tensor(llama_folder):
    edit_tensors(llama_folder, lambda t: t.__setitem__("model.layers.2.mlp.up_proj.weight", torch.zeros(128, 64)))
    expect_error(llama_folder, "model.safetensors", "unexpected tensor model.layers.2.mlp.up_proj.weight",
                 "num_hidden_layers=2")


def test_rotary_buffer_is_ignored(llama_folder):
    edit_tensors(llama_folder, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq",
                                                       torch.ones(8)))
    _, weights = load_model(str(llama_folder), dtype=torch.float32, device="cpu")
    assert not any("inv_freq" in name for name in weights)


def test_error_missing_shard(tmp_path):
    tiny_model(LlamaForCausalLM, LlamaConfig).save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    expect_error(tmp_path, "model.safetensors.index.json", shard.name, "not found")


def test_error_no_weights(llama_folder):
    (llama_folder / "model.safetensors").unlink()
    expect_error(llama_folder, "model.safetensors")


def test_error_missing_paths(tmp_path):
    expect_error(tmp_path / "nope.gguf", "nope.gguf", "not found")
    expect_error(tmp_path / "nowhere", "nowhere", "no such file or folder")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    expect_error(bad, "bad.gguf", "not a readable GGUF")


def test_error_gguf_architecture(tmp_path):
    model = tiny_model(LlamaForCausalLM, LlamaConfig)
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, model, arch="gpt2")
    expect_error(path, "gpt2.gguf", "general.architecture", "gpt2")


def test_error_gguf_shape_mismatch(tmp_path):
    model = tiny_model(LlamaForCausalLM, LlamaConfig)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model, meta_overrides={"feed_forward_length": 96})
    message = expect_error(path, "tiny.gguf", "blk.0.ffn_gate.weight", "llama.feed_forward_length=96")
    assert "expected [96, 64]" in message


def test_error_gguf_missing_metadata(tmp_path):
    model = tiny_model(LlamaForCausalLM, LlamaConfig)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model, skip_meta=("block_count",))
    expect_error(path, "tiny.gguf", "llama.block_count", "missing")


def test_error_unknown_random_shape():
    expect_error("random:gpt-5", "random:gpt-5", "random:llama-3-8b")


def test_error_bad_dtype():
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("random:smollm2-135m", dtype=torch.int8, device="meta")


# ------------------------------------------------------------------------------------------------------- random

PUBLISHED = {
    "llama-3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                              rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "llama-2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                tie_word_embeddings=True,
                                rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
}


def hf_meta_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if hf_config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_random_shapes_match_published_configs(name):
    config, weights = load_model(f"random:{name}", dtype=torch.bfloat16, device="meta")
    hf = PUBLISHED[name]
    assert {k: tuple(v.shape) for k, v in weights.items()} == hf_meta_shapes(hf)
    assert all(v.dtype == torch.bfloat16 and v.device.type == "meta" for v in weights.values())
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    assert config.rope_theta == hf.rope_parameters["rope_theta"]
    assert config.max_position_embeddings == hf.max_position_embeddings
    assert config.tie_word_embeddings == hf.tie_word_embeddings
    if name == "llama-3-8b":
        params = sum(math.prod(v.shape) for v in weights.values())
        assert 8.0e9 < params < 8.1e9  # 8.03B published


def test_random_smollm2_allocated_seeded():
    config, weights = load_model("random:smollm2-135m", dtype=torch.bfloat16, device="cpu")
    assert {k: tuple(v.shape) for k, v in weights.items()} == hf_meta_shapes(PUBLISHED["smollm2-135m"])
    assert all(v.dtype == torch.bfloat16 and v.device.type == "cpu" for v in weights.values())
    embed = weights["model.embed_tokens.weight"].float()
    assert abs(embed.std().item() - 0.02) < 0.001 and abs(embed.mean().item()) < 0.001
    assert torch.equal(weights["model.norm.weight"], torch.ones(576, dtype=torch.bfloat16))
    names = ["model.embed_tokens.weight", "model.layers.29.mlp.down_proj.weight"]
    before = {n: weights[n].clone() for n in names}
    del weights
    _, again = load_model("random:smollm2-135m", dtype=torch.bfloat16, device="cpu")
    for n in names:
        assert torch.equal(again[n], before[n]), n  # seeded: reproducible across loads
