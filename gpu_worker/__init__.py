"""The worker process: model, paged KV cache, scheduler and engine loop (see docs/ARCHITECTURE.md)."""

import os
from pathlib import Path

# NOTE: torch.compile's caches (compiled_decode.py) live beside our other caches so that a restart reuses them.
# Set here, before anything imports torch._dynamo: inductor fixes its cache folder at that import.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "neoserve" / "inductor"))
