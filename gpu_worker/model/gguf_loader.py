"""Loads a llama.cpp GGUF file (llama or qwen2 architecture) into Hugging Face-named torch tensors.

Quantized tensors are dequantized to float32 with the `gguf` package (the same code transformers uses), then cast to
the requested dtype, one tensor at a time so the peak is one fp32 tensor beyond the model itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from gpu_worker.model.config import ModelConfig
from gpu_worker.model.rope import rope_inv_freq
from gpu_worker.model.weight_shapes import check_weight_shapes
from neoserve.errors import ModelLoadError

# GGUF general.architecture -> ModelConfig.architecture
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's Llama 3.1 rope scaling, as per-frequency divisors


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> Hugging Face name, None if it is not a weight of a Llama-family decoder."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return None


def reverse_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py `permute`), exactly as transformers does.

    llama.cpp rotates adjacent pairs (GPT-J style) while HF rotates the two halves of each head, so the converter
    interleaves each head's rows; this puts them back: [n_head, 2, dim/2, cols] <- [n_head, dim/2, 2, cols].
    """
    rows = weight.shape[0]
    half = rows // n_head // 2
    # [n_head, half, 2, *rest] -> swap -> [n_head, 2, half, *rest] -> [rows, *rest]
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


class _Metadata:
    """Typed access to GGUF key/values; missing or mistyped keys raise ModelLoadError naming the file and key."""

    def __init__(self, reader, file: str):
        self.fields = reader.fields
        self.file = file

    def has(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        if field is None or not field.data:
            return default
        kind = field.types[0] if field.types else None
        if kind == GGUFValueType.ARRAY:
            raise ModelLoadError(f"{self.file}: metadata key {key} is an array, expected a single value")
        value = field.parts[field.data[0]]  # numpy array holding the scalar (or the string's bytes)
        if kind == GGUFValueType.STRING:
            return bytes(value).decode("utf-8")
        return value.item() if np.size(value) == 1 else value.tolist()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise ModelLoadError(f"{self.file}: metadata key {key} is missing")
        return value

    def get_int(self, key: str, default: int | None = None) -> int:
        value = self.require(key) if default is None else self.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or int(value) != value:
            raise ModelLoadError(f"{self.file}: metadata key {key} must be an integer, got {value!r}")
        return int(value)

    def get_float(self, key: str, default: float) -> float:
        value = self.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ModelLoadError(f"{self.file}: metadata key {key} must be a number, got {value!r}")
        return float(value)

    def array_len(self, key: str) -> int | None:
        field = self.fields.get(key)
        return None if field is None else len(field.data)


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise ModelLoadError(f"{path}: GGUF file not found")
    try:
        return GGUFReader(path)
    except Exception as exc:  # NOTE: GGUFReader raises bare ValueError/struct.error/... on corrupt files.
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


def _gguf_config(meta: _Metadata, tensors: dict, path: Path) -> tuple[ModelConfig, dict[str, str]]:
    """ModelConfig from the GGUF metadata, and ModelConfig field -> GGUF key (for error messages)."""
    file = path.name
    arch_name = meta.require("general.architecture")
    if arch_name not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{file}: general.architecture {arch_name!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    a = arch_name
    fields = {
        "num_layers": f"{a}.block_count",
        "hidden_size": f"{a}.embedding_length",
        "intermediate_size": f"{a}.feed_forward_length",
        "num_heads": f"{a}.attention.head_count",
        "num_kv_heads": f"{a}.attention.head_count_kv",
        "head_dim": f"{a}.attention.key_length",
        "max_position_embeddings": f"{a}.context_length",
        "vocab_size": f"{a}.vocab_size",
        "tie_word_embeddings": "output.weight present",
    }
    hidden = meta.get_int(fields["hidden_size"])
    num_heads = meta.get_int(fields["num_heads"])
    num_kv_heads = meta.get_int(fields["num_kv_heads"], num_heads)
    if num_heads <= 0 or (hidden % num_heads != 0 and not meta.has(fields["head_dim"])):
        raise ModelLoadError(f"{file}: {fields['hidden_size']}={hidden} is not divisible by "
                             f"{fields['num_heads']}={num_heads}")
    if meta.has(fields["head_dim"]):
        head_dim = meta.get_int(fields["head_dim"])
    else:
        head_dim = hidden // num_heads
        fields["head_dim"] = f"{fields['hidden_size']}/{fields['num_heads']}"
    rot_key = f"{a}.rope.dimension_count"
    if meta.has(rot_key) and meta.get_int(rot_key) != head_dim:
        raise ModelLoadError(f"{file}: {rot_key}={meta.get_int(rot_key)} differs from head_dim={head_dim}; "
                             "partial rotary embeddings are not supported")

    if meta.has(fields["vocab_size"]):
        vocab = meta.get_int(fields["vocab_size"])
    elif meta.array_len("tokenizer.ggml.tokens"):
        vocab = meta.array_len("tokenizer.ggml.tokens")
        fields["vocab_size"] = "len(tokenizer.ggml.tokens)"
    elif "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
        fields["vocab_size"] = "token_embd.weight rows"
    else:
        raise ModelLoadError(f"{file}: cannot tell the vocabulary size ({fields['vocab_size']} missing)")

    rope_scaling = _gguf_rope_scaling(meta, tensors, a, file)
    eos_ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if meta.has(key):
            token = meta.get_int(key)
            if token not in eos_ids:
                eos_ids.append(token)
    bos = meta.get_int("tokenizer.ggml.bos_token_id") if meta.has("tokenizer.ggml.bos_token_id") else None

    values = dict(
        architecture=GGUF_ARCHITECTURES[arch_name],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=meta.get_int(fields["intermediate_size"]),
        num_layers=meta.get_int(fields["num_layers"]),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=meta.get_float(f"{a}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta.get_float(f"{a}.rope.freq_base", 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=meta.get_int(fields["max_position_embeddings"]),
        # NOTE: llama.cpp ties the output to the embeddings exactly when the file has no output.weight.
        tie_word_embeddings="output.weight" not in tensors,
        # NOTE: Qwen2 always has q/k/v biases; llama GGUFs never do.
        attention_bias=arch_name == "qwen2",
        sliding_window=None,
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        name=str(meta.get("general.name") or path.stem),
        source_quantization=_projection_type(tensors),
    )
    try:
        config = ModelConfig(**values)
    except ModelLoadError as exc:  # ModelConfig's own checks do not know the file
        raise ModelLoadError(f"{file}: {exc}") from exc
    return config, fields


def _projection_type(tensors: dict) -> str | None:
    """The most common storage type of the layers' 2-D weights ("Q4_1" for the embedded model)."""
    types = [t.tensor_type.name for name, t in tensors.items() if name.startswith("blk.") and len(t.shape) == 2]
    return max(set(types), key=types.count) if types else None


def _gguf_rope_scaling(meta: _Metadata, tensors: dict, a: str, file: str) -> dict | None:
    kind = meta.get(f"{a}.rope.scaling.type")
    factor = meta.get(f"{a}.rope.scaling.factor")
    if kind is None and meta.has(f"{a}.rope.scale_linear"):  # NOTE: pre-2024 spelling of linear scaling
        kind, factor = "linear", meta.get(f"{a}.rope.scale_linear")
    scaling: dict | None = None
    if kind not in (None, "none"):
        if kind != "linear":
            raise ModelLoadError(f"{file}: {a}.rope.scaling.type {kind!r} is not supported; supported: none, linear")
        scaling = {"rope_type": "linear", "factor": float(factor if factor is not None else 1.0)}
    if ROPE_FREQS in tensors:
        if scaling is not None:
            raise ModelLoadError(f"{file}: both {a}.rope.scaling.type and tensor {ROPE_FREQS} are set; "
                                 "combining them is not supported")
        t = tensors[ROPE_FREQS]
        if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            raise ModelLoadError(f"{file}: tensor {ROPE_FREQS} must be F32 or F16, got {t.tensor_type.name}")
        scaling = {"rope_type": "freq_factors",
                   "factors": [float(x) for x in dequantize(t.data, t.tensor_type).reshape(-1)]}
    return scaling


def load_gguf(
    path: str | Path, *, dtype: torch.dtype, device: torch.device, reader: GGUFReader | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Parse, validate (before reading any tensor data), then dequantize tensor by tensor.

    reader: an already opened GGUFReader of `path`. NOTE: GGUFReader parses every metadata array (100k tokenizer
    strings for SmolLM2) in Python, which costs more than the dequantization; a caller that also builds the
    tokenizer from the same file can open it once and pass it to both.
    """
    path = Path(path)
    file = path.name
    if reader is None:
        reader = _open(path)
    tensors = {t.name: t for t in reader.tensors}
    config, fields = _gguf_config(_Metadata(reader, file), tensors, path)
    try:
        rope_inv_freq(config)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{file}: {exc}") from exc

    found: dict[str, tuple[int, ...]] = {}
    file_of: dict[str, str] = {}
    source: dict[str, object] = {}
    for gname, t in tensors.items():
        if gname == ROPE_FREQS:
            continue
        name = hf_name(gname)
        if name is None:
            raise ModelLoadError(f"{file}: unexpected tensor {gname} (not part of a {config.architecture} decoder)")
        # NOTE: GGUF lists dimensions fastest-first (ggml's ne order); torch wants them reversed.
        found[name] = tuple(int(d) for d in reversed(t.shape.tolist()))
        file_of[name] = f"{file} ({gname})"
        source[name] = t
    check_weight_shapes(config, found, file_of=file_of, default_file=file, config_file=file,
                        field_names=fields)

    weights: dict[str, torch.Tensor] = {}
    for name, t in source.items():
        try:
            # NOTE: a plain-ndarray view of the memory map: numpy.memmap's per-view bookkeeping costs ~30% here.
            array = dequantize(t.data.view(np.ndarray), t.tensor_type)  # float32, numpy
        except NotImplementedError as exc:
            raise ModelLoadError(
                f"{file}: tensor {t.name} uses quantization {t.tensor_type.name}, which gguf cannot dequantize"
            ) from exc
        if not array.flags.writeable:
            # NOTE: F32 tensors come back as views of the read-only memory map; copy so torch owns writable memory.
            array = np.array(array)
        weight = torch.from_numpy(array).reshape(found[name])  # [out, in] or [n], float32
        # NOTE: only llama GGUFs are permuted; llama.cpp's converter leaves qwen2 (NEOX-style rope) as is.
        if config.architecture == "llama":
            if name.endswith("self_attn.q_proj.weight"):
                weight = reverse_permute(weight, config.num_heads)
            elif name.endswith("self_attn.k_proj.weight"):
                weight = reverse_permute(weight, config.num_kv_heads)
        weights[name] = weight.to(device=device, dtype=dtype)
        del array
    return config, weights
