"""A model's own generation defaults (temperature, top-p, ...), read from the files it ships.

Where they come from, first match wins:
- a Hugging Face checkpoint folder: its `generation_config.json` (what `transformers`' generate() would use);
- a GGUF file: its `general.sampling.*` metadata (llama.cpp's keys for the same values);
- the embedded SmolLM2-135M-Instruct, whose GGUF carries none: the values its model card generates with
  (https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct: temperature 0.2, top_p 0.9);
- otherwise (random weights, a file without them): neutral values, as the OpenAI API and vLLM use.

Requests that set a value win; neoserve/sampling_params.py `resolve` is where the two meet.
"""

from __future__ import annotations

import json
from pathlib import Path

from neoserve.errors import ModelLoadError, ValidationError
from neoserve.model_files import embedded_model_path
from neoserve.sampling_params import NEUTRAL_DEFAULTS, GenerationDefaults

SMOLLM2_MODEL_CARD = GenerationDefaults(
    temperature=0.2, top_p=0.9, source="SmolLM2-135M-Instruct's model card (temperature 0.2, top_p 0.9)")

# generation_config.json key -> GenerationDefaults field
_HF_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
            "repetition_penalty": "repetition_penalty"}
# GGUF metadata key -> GenerationDefaults field
_GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
              "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
              "general.sampling.penalty_repeat": "repetition_penalty"}


def load_generation_defaults(spec: str | None) -> GenerationDefaults:
    """The generation defaults of the model `spec` names (as --model takes it). Raises ModelLoadError naming the
    file and the value when the model's own defaults are invalid."""
    if spec is None or spec == "embedded":
        return SMOLLM2_MODEL_CARD
    if spec.startswith("random:"):
        return NEUTRAL_DEFAULTS
    path = Path(spec)
    if path.is_dir():
        config = path / "generation_config.json"
        if config.is_file():
            return _from_generation_config(config)
        ggufs = sorted(path.glob("*.gguf"))
        path = ggufs[0] if len(ggufs) == 1 else path
    if path.is_file() and path.suffix == ".gguf":
        if path.resolve() == embedded_model_path().resolve():
            return SMOLLM2_MODEL_CARD
        return _from_gguf(path)
    return NEUTRAL_DEFAULTS


def _from_generation_config(path: Path) -> GenerationDefaults:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable JSON file ({exc})") from exc
    values = {field: config[key] for key, field in _HF_KEYS.items() if config.get(key) is not None}
    if config.get("do_sample") is False:
        # NOTE: as transformers' generate() does: without sampling it decodes greedily, whatever the temperature.
        values = {"temperature": 0.0}
    return _defaults(values, path, {v: k for k, v in _HF_KEYS.items()})


def _from_gguf(path: Path) -> GenerationDefaults:
    import gguf  # NOTE: imported here: only GGUF checkpoints other than the embedded one need it

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - whatever the reader trips on, the file is not usable
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from exc
    values = {field: reader.fields[key].contents() for key, field in _GGUF_KEYS.items() if key in reader.fields}
    return _defaults(values, path, {v: k for k, v in _GGUF_KEYS.items()})


def _defaults(values: dict, path: Path, key_of: dict[str, str]) -> GenerationDefaults:
    if not values:
        return NEUTRAL_DEFAULTS
    shown = ", ".join(f"{key_of[f]} {v}" for f, v in values.items())
    try:
        return GenerationDefaults(**values, source=f"{path} ({shown})")
    except ValidationError as exc:
        raise ModelLoadError(f"{path}: the generation default {key_of.get(exc.field, exc.field)} is invalid: "
                             f"{exc.message}") from exc
