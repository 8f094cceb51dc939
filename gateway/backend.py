"""One backend (a worker and its sidecar: a replica) as the gateway sees it: its link, its health and its load.

The load the router scores comes from two places: the worker's Stats (running and waiting sequences, KV blocks and
CPU KV bytes in use), polled every health interval, and this gateway's own books, which change the moment a request
is sent or answered (requests open on the backend, prompt tokens sent but not yet answered with a first token). The
recent step time is derived from two polls: wall time over engine steps between them, while the engine was busy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc

from neoserve.errors import ValidationError
from neoserve.internal.v1 import sidecar_pb2, sidecar_pb2_grpc, worker_pb2

from gateway.healthcheck import sidecar_up
from gateway.worker_client import CHANNEL_OPTIONS, WorkerClient

log = logging.getLogger(__name__)

STEP_EWMA = 0.3  # weight of the newest step-time sample


@dataclass(frozen=True)
class BackendSpec:
    """Where a backend is: its worker's gRPC target and, optionally, its sidecar's control target (health only)."""

    address: str
    sidecar_address: str | None = None

    @classmethod
    def parse(cls, text: str) -> "BackendSpec":
        """`WORKER` or `WORKER,sidecar=SIDECAR` (each HOST:PORT or unix:PATH)."""
        address, *options = [part.strip() for part in text.split(",")]
        if not address:
            raise ValidationError("backend", f"{text!r}: give the worker's HOST:PORT or unix:PATH first")
        sidecar = None
        for option in options:
            key, _, value = option.partition("=")
            if key != "sidecar" or not value:
                raise ValidationError("backend", f"{text!r}: unknown option {option!r} (the only one is sidecar=ADDR)")
            sidecar = value
        return cls(address, sidecar)


class StepClock:
    """The worker's recent step time: wall time over engine steps between two Stats polls while it ran requests.
    NOTE: a busy engine steps back to back, so that ratio is its step time; an idle one keeps the last estimate."""

    def __init__(self) -> None:
        self.seconds: float | None = None
        self._last: tuple[float, int] | None = None

    def observe(self, now: float, num_steps: int, busy: bool) -> None:
        last, self._last = self._last, (now, num_steps)
        if last is None or not busy or num_steps <= last[1]:
            return
        sample = (now - last[0]) / (num_steps - last[1])
        self.seconds = sample if self.seconds is None else (1 - STEP_EWMA) * self.seconds + STEP_EWMA * sample

    def reset(self) -> None:
        self._last = None


class Backend:
    def __init__(self, spec: BackendSpec, client: WorkerClient | None = None):
        self.spec = spec
        self.name = spec.address  # the Prometheus label and the affinity table's key
        self.client = client if client is not None else WorkerClient(spec.address)
        self._sidecar_channel = None
        self._sidecar = None
        if spec.sidecar_address:
            self._sidecar_channel = grpc.aio.insecure_channel(spec.sidecar_address, options=CHANNEL_OPTIONS)
            self._sidecar = sidecar_pb2_grpc.CpuAttentionServiceStub(self._sidecar_channel)
        self.healthy = False  # the worker's health check said SERVING last time
        self.sidecar_ok = True
        self.retired = False  # discovery dropped it: it takes no new request and closes once idle
        self.mismatch: str | None = None  # why it cannot serve this gateway's model (another model), or None
        self.info: worker_pb2.InfoResponse | None = None
        self.stats: worker_pb2.StatsResponse | None = None
        self.step = StepClock()
        # This gateway's books (see the module docstring).
        self.inflight = 0
        self.prefill_tokens = 0
        # Counters since the gateway started (exported per backend).
        self.routed = 0
        self.retried_away = 0  # requests that failed here before their first token and were sent elsewhere
        self.affinity_hits = 0  # requests routed here with at least one leading block it was sent before

    @property
    def routable(self) -> bool:
        """Whether new requests may go here."""
        return self.healthy and self.client.connected and not self.retired and self.mismatch is None

    @property
    def failed_over(self) -> bool:
        """The worker runs gpu-only though started in a mode that offloads (its sidecar died and it has not taken
        one back yet)."""
        return self.stats is not None and self.info is not None and self.stats.mode != self.info.mode

    @property
    def degraded(self) -> bool:
        return self._sidecar is not None and (not self.sidecar_ok or self.failed_over)

    def start(self) -> None:
        self.client.start()

    async def close(self) -> None:
        await self.client.close()
        if self._sidecar_channel is not None:
            await self._sidecar_channel.close()

    async def check(self) -> None:
        """One health round: worker health, its Stats (and step time), the sidecar's health."""
        healthy = await self.client.healthy()
        if healthy != self.healthy:
            log.log(logging.INFO if healthy else logging.WARNING, "backend %s is %s", self.name,
                    "up" if healthy else "down: draining it (no new requests)")
            self.step.reset()
        self.healthy = healthy
        if healthy:
            try:
                self.stats = await self.client.stats(timeout=2.0)
                self.step.observe(time.monotonic(), self.stats.num_steps,
                                  busy=self.stats.num_running + self.stats.num_waiting > 0)
            except grpc.aio.AioRpcError:
                pass
        self.sidecar_ok = await self._sidecar_ok()

    async def _sidecar_ok(self) -> bool:
        if self._sidecar is None:
            return True
        try:
            resp = await self._sidecar.Health(sidecar_pb2.SidecarHealthRequest(), timeout=2.0)
        except grpc.aio.AioRpcError:
            return False
        return sidecar_up(resp.status)

    # --- load as the router sees it ------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Sequences ahead of a new request: the worker's running + waiting, or this gateway's own open requests
        when higher (they count at once; the worker's counters lag a poll)."""
        worker = self.stats.num_running + self.stats.num_waiting if self.stats is not None else 0
        return max(worker, self.inflight)

    def kv_usage(self) -> float:
        """KV in use in [0, 1]: the device tier's fraction, blended with the host tier's where there is one.
        NOTE: the host tier is where sequences go when the device runs out, so it weighs less."""
        s = self.stats
        if s is None or not s.gpu_kv_blocks_total:
            return 0.0
        gpu = s.gpu_kv_blocks_used / s.gpu_kv_blocks_total
        if not s.cpu_kv_bytes_total:
            return gpu
        return 0.75 * gpu + 0.25 * s.cpu_kv_bytes_used / s.cpu_kv_bytes_total

    def free_gpu_tokens(self, block_size: int) -> int | None:
        """Tokens the device KV has free now, or None before the first Stats."""
        s = self.stats
        if s is None or not s.gpu_kv_blocks_total:
            return None
        return (s.gpu_kv_blocks_total - s.gpu_kv_blocks_used) * block_size
