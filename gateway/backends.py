"""Watches the worker (and sidecar) and decides what the gateway's health service says.

The gateway reports SERVING only when every process a request needs is up: the worker answers its health check
and holds the request stream, and the tokenizer is loaded. The sidecar is not one of them: without it the worker
serves gpu-only, so a sidecar that is down (or not yet taken back by the worker) makes the server degraded, not
down: the `neoserve_degraded` metric is 1 and the health service OFFLOAD_SERVICE is NOT_SERVING meanwhile.
The same loop copies the worker's scheduler and KV counters into the metrics.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2

from neoserve.errors import ModelLoadError
from neoserve.internal.v1 import sidecar_pb2, sidecar_pb2_grpc
from neoserve.model_defaults import load_generation_defaults
from neoserve.tokenizer import Tokenizer

from gateway.admission import Admission
from gateway.healthcheck import sidecar_up
from gateway.metrics import GatewayMetrics
from gateway.generation import ModelState
from gateway.worker_client import CHANNEL_OPTIONS, WorkerClient

log = logging.getLogger(__name__)

PUBLIC_SERVICE = "neoserve.v1.InferenceService"
OFFLOAD_SERVICE = "neoserve.v1.InferenceService.CpuOffload"  # SERVING while KV can go to the sidecar
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class BackendMonitor:
    def __init__(self, *, worker: WorkerClient, sidecar_address: str | None, model: ModelState, model_spec: str | None,
                 health_servicer: health.aio.HealthServicer, metrics: GatewayMetrics, admission: Admission,
                 interval_s: float):
        self._worker = worker
        self._model = model
        self._model_spec = model_spec
        self.fatal_error: ModelLoadError | None = None  # set when the model can never be served (no tokenizer)
        self._health = health_servicer
        self._metrics = metrics
        self._admission = admission
        self._interval_s = interval_s
        self._sidecar_channel = None
        self._sidecar = None
        if sidecar_address:
            self._sidecar_channel = grpc.aio.insecure_channel(sidecar_address, options=CHANNEL_OPTIONS)
            self._sidecar = sidecar_pb2_grpc.CpuAttentionServiceStub(self._sidecar_channel)
        self.serving = False
        self.degraded = False  # serving without CPU offload (see _set_offload)
        self._tokenizer_task: asyncio.Task | None = None

    async def close(self) -> None:
        if self._sidecar_channel is not None:
            await self._sidecar_channel.close()

    async def _sidecar_ok(self) -> bool:
        if self._sidecar is None:
            return True
        try:
            resp = await self._sidecar.Health(sidecar_pb2.SidecarHealthRequest(), timeout=2.0)
        except grpc.aio.AioRpcError:
            return False
        return sidecar_up(resp.status)

    def start_tokenizer_load(self, info=None) -> None:
        """Loads the tokenizer now if its source is known, in parallel with the worker loading the model. A
        random-weight model's synthetic tokenizer waits for the worker's info (it is sized to the model's vocab)."""
        if not self._model_spec or self._tokenizer_task is not None:
            return
        kwargs = {}
        if self._model_spec.startswith("random:"):
            if info is None:
                return
            kwargs = {"vocab_size": info.vocab_size, "eos_token_ids": list(info.eos_token_ids)}
        self._tokenizer_task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(Tokenizer.load, self._model_spec, **kwargs))

    async def _load_model(self) -> None:
        info = await self._worker.info()
        if self._tokenizer_task is None:
            self._model_spec = self._model_spec or info.model_spec or "embedded"
            self.start_tokenizer_load(info)
        try:
            tokenizer = await self._tokenizer_task
        except Exception:
            self._tokenizer_task = None  # retried next round
            raise
        if tokenizer.vocab_size > info.vocab_size:
            log.warning("tokenizer vocab %d > model vocab %d", tokenizer.vocab_size, info.vocab_size)
        self._model.defaults = await asyncio.to_thread(load_generation_defaults, self._model_spec)
        log.info("sampling fields a request leaves unset come from %s", self._model.defaults.source)
        self._model.tokenizer = tokenizer
        self._model.info = info
        log.info("serving %s (vocab %d, context %d) via worker at %s", info.model_id, info.vocab_size,
                 info.max_model_len, self._worker.address)

    async def check_once(self) -> bool:
        worker_ok = await self._worker.healthy()
        if worker_ok and not self._model.ready:
            try:
                await self._load_model()
            except ModelLoadError:
                raise  # NOTE: no tokenizer file will appear by waiting: retrying would only hide the cause
            except Exception:  # noqa: BLE001 - retried next round; the health status says NOT_SERVING meanwhile
                log.exception("could not load the model description from the worker")
        sidecar_ok = await self._sidecar_ok()
        if worker_ok:
            try:
                self._metrics.worker_stats.latest = await self._worker.stats(timeout=2.0)
            except grpc.aio.AioRpcError:
                pass
        self._metrics.worker_up.set(1 if worker_ok else 0)
        self._metrics.inflight.set(self._admission.inflight)
        self._metrics.queued.set(self._admission.queued)
        await self._set_offload(sidecar_ok)
        serving = worker_ok and self._model.ready and self._worker.connected and not self._admission.draining
        await self.set_serving(serving)
        return serving

    def _worker_failed_over(self) -> bool:
        """The worker runs gpu-only though it was started in a mode that offloads (its sidecar died and it has not
        taken one back yet)."""
        stats, info = self._metrics.worker_stats.latest, self._model.info
        return stats is not None and info is not None and stats.mode != info.mode

    async def _set_offload(self, sidecar_ok: bool) -> None:
        """Metrics and the OFFLOAD_SERVICE health status say whether CPU offload works (degraded while not)."""
        self._metrics.sidecar_up.set(1 if sidecar_ok else 0)
        degraded = self._sidecar is not None and (not sidecar_ok or self._worker_failed_over())
        if degraded != self.degraded:
            log.warning("CPU offload %s", "unavailable: serving gpu-only (degraded)" if degraded else "is back")
        self.degraded = degraded
        self._metrics.degraded.set(1 if degraded else 0)
        if self._sidecar is not None:
            await self._health.set(OFFLOAD_SERVICE, NOT_SERVING if degraded else SERVING)

    async def set_serving(self, serving: bool) -> None:
        if serving != self.serving:
            log.info("health: %s", "SERVING" if serving else "NOT_SERVING")
        self.serving = serving
        status = SERVING if serving else NOT_SERVING
        for service in ("", PUBLIC_SERVICE):
            await self._health.set(service, status)

    async def run(self) -> None:
        """Checks the backends every interval until cancelled; returns (with fatal_error set) when the model's
        tokenizer cannot be loaded at all."""
        self.start_tokenizer_load()
        while True:
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except ModelLoadError as e:
                log.error("cannot serve: %s", e)
                self.fatal_error = e
                return
            except Exception:  # noqa: BLE001 - the monitor must outlive any one failed check
                log.exception("backend check failed")
            await asyncio.sleep(self._interval_s)
