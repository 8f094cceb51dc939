"""Loads a Hugging Face checkpoint folder (config.json + *.safetensors) for Llama, Qwen2 and Mistral.

Everything is checked before any tensor data is read: the config, the shard list, and every tensor's name and shape
(from the safetensors headers), so a bad checkpoint fails at start-up in seconds with a message naming the file and
the field, not after minutes of loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from gpu_worker.model.config import ModelConfig
from gpu_worker.model.rope import rope_inv_freq
from gpu_worker.model.weight_shapes import IGNORED_SUFFIXES, check_weight_shapes, expected_weights
from neoserve.errors import ModelLoadError

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# config.json architectures[0] -> ModelConfig.architecture
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}

# ModelConfig field -> config.json key, for messages.
CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
}


def _read_json(path: Path, folder: Path) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"{path}: file not found in checkpoint folder {folder}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object at the top level")
    return data


def _int(cfg: dict, key: str, default: int | None = None) -> int:
    """A positive integer field (all the sizes are)."""
    value = cfg.get(key, default)
    if value is None:
        raise ModelLoadError(f"{CONFIG_FILE}: field {key} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelLoadError(f"{CONFIG_FILE}: field {key} must be a positive integer, got {value!r}")
    return value


def _float(cfg: dict, key: str, default: float) -> float:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelLoadError(f"{CONFIG_FILE}: field {key} must be a number, got {value!r}")
    return float(value)


def _token_ids(value, source: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ModelLoadError(f"{source}: eos_token_id must be an integer or a list of integers, got {value!r}")
    return list(values)


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either spelling: transformers 5 `rope_parameters`, or `rope_theta` +
    `rope_scaling` (older files). A default rope comes back as None scaling."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ModelLoadError(f"{CONFIG_FILE}: field rope_parameters must be an object, got {params!r}")
    if scaling is not None and not isinstance(scaling, dict):
        raise ModelLoadError(f"{CONFIG_FILE}: field rope_scaling must be an object, got {scaling!r}")
    merged = dict(scaling or {})
    merged.update(params or {})
    theta = merged.pop("rope_theta", None)
    if theta is None:
        theta = _float(cfg, "rope_theta", 10000.0)
    elif isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ModelLoadError(f"{CONFIG_FILE}: field rope_parameters.rope_theta must be a number, got {theta!r}")
    prf = merged.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise ModelLoadError(f"{CONFIG_FILE}: field partial_rotary_factor={prf} is not supported (only 1.0)")
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    merged["rope_type"] = kind
    merged.pop("type", None)
    return float(theta), merged


def parse_config(folder: Path) -> ModelConfig:
    """ModelConfig from config.json (+ generation_config.json eos ids); ModelLoadError names the field."""
    cfg = _read_json(folder / CONFIG_FILE, folder)
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise ModelLoadError(f"{CONFIG_FILE}: field architectures is missing or empty; supported: "
                             f"{', '.join(HF_ARCHITECTURES)}")
    if archs[0] not in HF_ARCHITECTURES:
        raise ModelLoadError(f"{CONFIG_FILE}: architectures[0] {archs[0]!r} is not supported; supported: "
                             f"{', '.join(HF_ARCHITECTURES)}")
    arch = HF_ARCHITECTURES[archs[0]]

    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"{CONFIG_FILE}: field hidden_act={act!r} is not supported (only 'silu')")
    # NOTE: Llama's attention_bias puts a bias on o_proj too and mlp_bias on the MLP; ModelConfig has neither.
    if arch == "llama" and cfg.get("attention_bias"):
        raise ModelLoadError(f"{CONFIG_FILE}: field attention_bias=true is not supported for LlamaForCausalLM")
    if cfg.get("mlp_bias"):
        raise ModelLoadError(f"{CONFIG_FILE}: field mlp_bias=true is not supported")

    sliding_window = None
    if arch == "mistral":
        sliding_window = cfg.get("sliding_window")
        if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                           or sliding_window <= 0):
            raise ModelLoadError(f"{CONFIG_FILE}: field sliding_window must be a positive integer or null, "
                                 f"got {sliding_window!r}")
    if arch == "qwen2":
        # NOTE: Qwen2 ignores sliding_window unless use_sliding_window; when on it applies only to some layers.
        layer_types = cfg.get("layer_types") or []
        if cfg.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
            raise ModelLoadError(f"{CONFIG_FILE}: field use_sliding_window=true (per-layer sliding attention) "
                                 "is not supported for Qwen2ForCausalLM")

    num_heads = _int(cfg, "num_attention_heads")
    hidden = _int(cfg, "hidden_size")
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % num_heads != 0:
            raise ModelLoadError(f"{CONFIG_FILE}: field hidden_size={hidden} is not divisible by "
                                 f"num_attention_heads={num_heads} and head_dim is not given")
        head_dim = hidden // num_heads
    else:
        head_dim = _int(cfg, "head_dim")
    rope_theta, rope_scaling = _rope(cfg)

    eos = _token_ids(cfg.get("eos_token_id"), CONFIG_FILE)
    gen_path = folder / GENERATION_CONFIG_FILE
    if gen_path.is_file():
        for token in _token_ids(_read_json(gen_path, folder).get("eos_token_id"), GENERATION_CONFIG_FILE):
            if token not in eos:
                eos.append(token)
    bos = cfg.get("bos_token_id")
    if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int)):
        raise ModelLoadError(f"{CONFIG_FILE}: field bos_token_id must be an integer, got {bos!r}")
    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ModelLoadError(f"{CONFIG_FILE}: field tie_word_embeddings must be true or false, got {tie!r}")

    try:
        config = ModelConfig(
            architecture=arch,
            vocab_size=_int(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(cfg, "intermediate_size"),
            num_layers=_int(cfg, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=_int(cfg, "num_key_value_heads", num_heads),
            head_dim=head_dim,
            rms_norm_eps=_float(cfg, "rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=_int(cfg, "max_position_embeddings"),
            tie_word_embeddings=tie,
            attention_bias=arch == "qwen2",
            sliding_window=sliding_window,
            bos_token_id=bos,
            eos_token_ids=eos,
            name=folder.resolve().name,
        )
        rope_inv_freq(config)
    except ModelLoadError as exc:
        if str(exc).startswith(CONFIG_FILE):
            raise
        raise ModelLoadError(f"{CONFIG_FILE}: {exc}") from exc
    return config


def shard_files(folder: Path) -> tuple[list[Path], dict[str, str], str]:
    """(shards, tensor -> shard listed in the index, the file a missing tensor should have been in)."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        index = _read_json(index_path, folder)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{INDEX_FILE}: field weight_map is missing or empty")
        shards: list[Path] = []
        for tensor, shard in weight_map.items():
            path = folder / str(shard)
            if not path.is_file():
                raise ModelLoadError(f"{INDEX_FILE}: shard {shard} (listed for tensor {tensor}) not found in {folder}")
            if path not in shards:
                shards.append(path)
        return shards, {k: str(v) for k, v in weight_map.items()}, INDEX_FILE
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single], {}, SINGLE_FILE
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise ModelLoadError(f"{folder}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file in the checkpoint folder")
    return found, {}, ", ".join(p.name for p in found)


def load_hf_folder(
    folder: str | Path, *, dtype: torch.dtype, device: torch.device
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    folder = Path(folder)
    config = parse_config(folder)
    shards, index_map, default_file = shard_files(folder)

    shapes: dict[str, tuple[int, ...]] = {}
    file_of: dict[str, str] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    if name in shapes:
                        raise ModelLoadError(f"{shard.name}: tensor {name} is also in {file_of[name]}")
                    shapes[name] = tuple(f.get_slice(name).get_shape())
                    file_of[name] = shard.name
        except ModelLoadError:
            raise
        except Exception as exc:  # NOTE: safetensors raises its own SafetensorError / OSError on bad files.
            raise ModelLoadError(f"{shard.name}: not a readable safetensors file ({exc})") from exc
    for name, shard in index_map.items():
        if file_of.get(name) != shard and not name.endswith(IGNORED_SUFFIXES):
            raise ModelLoadError(f"{INDEX_FILE}: tensor {name} is listed in {shard} but that shard does not hold it")

    if config.tie_word_embeddings and "lm_head.weight" in shapes:
        # NOTE: some exports store the tied head anyway; it must equal the embeddings, so it is skipped.
        del shapes["lm_head.weight"]
    check_weight_shapes(config, shapes, file_of=file_of, default_file=default_file, config_file=CONFIG_FILE,
                        field_names=CONFIG_KEYS)

    wanted = expected_weights(config)
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name in wanted:
                    weights[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    return config, weights
