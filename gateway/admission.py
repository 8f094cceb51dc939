"""Bounded admission: at most `max_inflight` requests at the worker, at most `max_queued` waiting for a slot.

Why in the gateway: a full server must say so at once (RESOURCE_EXHAUSTED with a retry hint) rather than let
requests pile up without bound; and during a drain it must refuse new work (UNAVAILABLE) while running streams end.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import AsyncIterator

from neoserve.errors import CapacityError

from gateway.status import DrainingError


class Admission:
    def __init__(self, max_inflight: int, max_queued: int, retry_after_s: float = 1.0):
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.inflight = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def draining(self) -> bool:
        return self._draining

    def start_draining(self) -> None:
        """Refuses new requests from now on; waiting ones are refused too, running ones go on."""
        self._draining = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(DrainingError("server is shutting down"))

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is in flight, False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Holds one in-flight slot for the body; yields the seconds spent waiting for it."""
        if self._draining:
            raise DrainingError("server is shutting down")
        start = time.perf_counter()
        if self.inflight >= self.max_inflight or self._waiters:
            if len(self._waiters) >= self.max_queued:
                raise CapacityError(
                    f"server is full ({self.inflight} requests running, {len(self._waiters)} queued)",
                    retry_after_s=self.retry_after_s,
                )
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut  # NOTE: _release hands the slot over directly (inflight is not decremented), FIFO order
            except BaseException:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._release()  # the slot was handed to us just as we were cancelled: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(fut)
                raise
        else:
            self.inflight += 1
            self._idle.clear()
        try:
            yield time.perf_counter() - start
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves to this waiter
                return
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()
