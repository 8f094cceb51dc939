"""Running an asyncio entry point the way every neoserve process does."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """uvloop where it is installed (everywhere but Windows), the stock event loop elsewhere."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency everywhere but Windows
        return asyncio.run(main)
    return uvloop.run(main)
