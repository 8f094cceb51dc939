"""Runs the LLMEngine's step loop on its own thread and serves it to asyncio code.

NOTE: torch releases the GIL inside its kernels, so a step running on the engine thread leaves the event loop (gRPC
I/O) responsive. Requests and aborts cross threads through a locked inbox; outputs come back to the loop with one
call_soon_threadsafe per step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from gpu_worker.engine import EngineStats, LLMEngine
from neoserve.errors import BackendUnavailableError, ValidationError
from neoserve.outputs import FinishReason, RequestOutput
from neoserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.model_config = engine.model_config
        self.max_model_len = engine.max_model_len
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._adds: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Stream] = {}
        self._stats = engine.stats()
        self._stopping = False
        self._dead: str | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # --- asyncio side ----------------------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yields deltas; the last has finished=True. Raises ValidationError before the first yield.
        Closing or cancelling the iterator aborts the request and frees its KV."""
        if self._dead is not None:
            raise BackendUnavailableError(f"engine stopped: {self._dead}")
        with self._lock:
            if request_id in self._streams:
                raise ValidationError("request_id", f"{request_id!r} is already running")
            self.engine.validate(request_id, prompt_token_ids, params)
            stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
            self._streams[request_id] = stream
            self._adds.append((request_id, list(prompt_token_ids), params))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self._aborts.append(request_id)
        self._wakeup.set()

    def stats(self) -> EngineStats:
        """Stats as of the end of the latest step (read without stopping the loop)."""
        return self._stats

    async def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # --- engine thread ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug: fail every open stream instead of leaving them hanging
            log.exception("engine loop died")
            self._dead = f"engine loop died: {e}"
        else:
            self._dead = "shut down"
        with self._lock:
            pending = list(self._streams)
        self._deliver([(rid, BackendUnavailableError(f"engine stopped: {self._dead}")) for rid in pending])

    def _loop(self) -> None:
        engine = self.engine
        while not self._stopping:
            with self._lock:
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
            for request_id in aborts:
                engine.abort_request(request_id)
            for request_id, prompt, params in adds:
                if request_id not in self._streams:  # aborted before it reached the engine
                    continue
                try:
                    engine.add_request(request_id, prompt, params)
                except Exception as e:  # validated already; a race (duplicate id) lands here
                    self._deliver([(request_id, e)])
            if not engine.has_unfinished():
                self._stats = engine.stats()
                self._wakeup.wait(IDLE_WAIT_S)
                self._wakeup.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # a bug or a device fault: fail what is running, keep serving
                log.exception("engine step failed; failing the running requests")
                outputs = [engine.abort_request(rid) for rid in list(engine.requests)]
                for out in outputs:
                    out.finish_reason, out.error = FinishReason.ERROR, f"engine step failed: {e}"
            self._stats = engine.stats()
            self._deliver([(out.request_id, out) for out in outputs if out is not None])

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is None:
                    continue
                if isinstance(item, BaseException) or item.finished:
                    del self._streams[request_id]
                by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the loop closed; nobody is listening
                pass


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)
