"""The gateway's connection to the GPU worker: one multiplexed gRPC stream carrying token ids for all requests.

Why one stream: the worker coalesces the deltas of one engine step into one message, so the link costs about one
message per step instead of one per sequence per step. Each request gets an async iterator of its deltas; leaving
the iterator early (client cancel, deadline, stop string) sends an abort so the worker frees the request's KV.
If the stream breaks, every open request fails with BackendUnavailableError and the client reconnects in the
background (the supervisor restarts a crashed worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from neoserve.errors import BackendUnavailableError, CapacityError, ValidationError
from neoserve.internal.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

# NOTE: keepalive pings detect a dead worker host; messages of a few KiB need no size tuning.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def error_from_record(err: worker_pb2.RequestError) -> Exception:
    """The typed exception a worker error record stands for."""
    if err.kind == worker_pb2.ERROR_KIND_VALIDATION:
        return ValidationError(err.field or "request", err.message)
    if err.kind == worker_pb2.ERROR_KIND_CAPACITY:
        return CapacityError(err.message, retry_after_s=err.retry_after_s or 1.0)
    if err.kind == worker_pb2.ERROR_KIND_UNAVAILABLE:
        return BackendUnavailableError(err.message)
    return RuntimeError(f"worker failed the request: {err.message}")


class _StreamLost:
    """Marker put on a request's queue when the stream broke."""

    def __init__(self, reason: str):
        self.reason = reason


class _Cut:
    """Marker put on a request's queue to end it with `error` (the gateway is shutting down)."""

    def __init__(self, error: Exception):
        self.error = error


class WorkerClient:
    def __init__(self, address: str, *, reconnect_delay_s: float = 0.2):
        self.address = address
        self._reconnect_delay_s = reconnect_delay_s
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._pending: dict[str, asyncio.Queue] = {}
        self._outbox: asyncio.Queue | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="worker-stream")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._channel.close()

    async def wait_connected(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def info(self, timeout: float = 5.0) -> worker_pb2.InfoResponse:
        return await self._stub.Info(worker_pb2.InfoRequest(), timeout=timeout)

    async def stats(self, timeout: float = 5.0) -> worker_pb2.StatsResponse:
        return await self._stub.Stats(worker_pb2.StatsRequest(), timeout=timeout)

    async def healthy(self, timeout: float = 2.0) -> bool:
        try:
            resp = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    async def generate(self, start: worker_pb2.StartRequest) -> AsyncIterator[worker_pb2.RequestDelta]:
        """Deltas of one request until it finishes. Raises the worker's typed error, or BackendUnavailableError."""
        if not self._connected.is_set() or self._outbox is None:
            raise BackendUnavailableError(f"worker at {self.address} is not connected")
        rid = start.request_id
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[rid] = queue
        outbox = self._outbox
        outbox.put_nowait(start)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _StreamLost):
                    finished = True  # nothing to abort: the worker dropped the stream's requests
                    raise BackendUnavailableError(f"lost the worker stream: {item.reason}")
                if isinstance(item, _Cut):
                    raise item.error  # not finished: the finally below aborts it in the worker
                if item.HasField("error"):
                    finished = True
                    raise error_from_record(item.error)
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            self._pending.pop(rid, None)
            if not finished and outbox is self._outbox:
                outbox.put_nowait(rid)  # a str in the outbox means "abort this request"

    def cut_all(self, error: Exception) -> int:
        """Ends every open request with `error` (raised from its `generate`), which aborts it in the worker.
        Returns how many were open."""
        for queue in self._pending.values():
            queue.put_nowait(_Cut(error))
        return len(self._pending)

    async def _run(self) -> None:
        while not self._closed:
            try:
                await self._serve_one_stream()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                log.debug("worker stream ended: %s %s", e.code(), e.details())
                reason = f"{e.code().name}: {e.details()}"
            except Exception as e:  # noqa: BLE001 - keep reconnecting whatever broke
                log.warning("worker stream failed: %r", e)
                reason = repr(e)
            else:
                reason = "the worker closed the stream"
            finally:
                self._connected.clear()
                self._outbox = None
            for queue in list(self._pending.values()):
                queue.put_nowait(_StreamLost(reason))
            self._pending.clear()
            await asyncio.sleep(self._reconnect_delay_s)

    async def _serve_one_stream(self) -> None:
        await self._channel.channel_ready()
        call = self._stub.Stream(wait_for_ready=False)
        # NOTE: gRPC sends headers lazily; a first empty message makes a dead worker fail here rather than later.
        await call.write(worker_pb2.StreamRequest())
        outbox: asyncio.Queue = asyncio.Queue()
        self._outbox = outbox
        self._connected.set()
        writer = asyncio.get_running_loop().create_task(self._write_loop(call, outbox))
        try:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    return
                for delta in resp.deltas:
                    queue = self._pending.get(delta.request_id)
                    if queue is not None:
                        queue.put_nowait(delta)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, grpc.aio.UsageError):
                await writer
            call.cancel()

    @staticmethod
    async def _write_loop(call, outbox: asyncio.Queue) -> None:
        while True:
            items = [await outbox.get()]
            while not outbox.empty():  # NOTE: coalesce everything queued into one message
                items.append(outbox.get_nowait())
            msg = worker_pb2.StreamRequest()
            for item in items:
                if isinstance(item, str):
                    msg.abort.append(item)
                else:
                    msg.start.append(item)
            await call.write(msg)
