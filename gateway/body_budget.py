"""A memory budget for request bodies: at most `max_bytes` of them read, parsed and tokenized at once.

Why: a body is held three times over while it is parsed (the bytes, the decoded JSON text, the strings in it), so
without a bound the gateway's memory grows with the number of large requests that arrive together. A body waits,
in arrival order, until its size fits in the budget; it is released once the request is tokenized, long before
the reply is generated. Until then its bytes stay in the client's socket (aiohttp pauses reading a body nobody
reads), not in the gateway.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import AsyncIterator


class BodyBudget:
    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        """Holds `nbytes` of the budget for the body (a body larger than the whole budget takes all of it)."""
        nbytes = max(0, min(nbytes, self.max_bytes))
        await self._acquire(nbytes)
        try:
            yield
        finally:
            self._release(nbytes)

    async def _acquire(self, nbytes: int) -> None:
        if not self._waiters and self.used + nbytes <= self.max_bytes:
            self.used += nbytes
            return
        fut = asyncio.get_running_loop().create_future()
        entry = (nbytes, fut)
        self._waiters.append(entry)
        try:
            await fut  # NOTE: _wake hands the bytes over (self.used already counts them), in arrival order
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._release(nbytes)  # granted just as we were cancelled: give it back
            else:
                self._waiters.remove(entry)
                self._wake()  # the head of the queue left: the next one may fit now
            raise

    def _release(self, nbytes: int) -> None:
        self.used -= nbytes
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.max_bytes:
            nbytes, fut = self._waiters.popleft()
            if not fut.done():
                self.used += nbytes
                fut.set_result(None)
