"""Watches the backends (worker + sidecar pairs) and decides what the gateway's health service says.

The gateway reports SERVING when its tokenizer is loaded and at least one backend can take requests: its worker
answers its health check and holds the request stream (gateway/backend.py). A backend that fails its check is
drained: the router sends it nothing new while its open streams run on or fail. The sidecar is not needed to serve:
without it a worker serves gpu-only, so a sidecar that is down (or not yet taken back by its worker) makes the
server degraded, not down: the `neoserve_degraded` metric is 1 and the health service OFFLOAD_SERVICE is
NOT_SERVING meanwhile. The model (tokenizer, limits) comes from the first backend that answers; a backend serving
another model is never routed to. The same loop copies the workers' counters into the metrics (summed, and per
backend) and closes backends that discovery retired once they are idle.
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

from neoserve.errors import ModelLoadError
from neoserve.internal.v1 import worker_pb2
from neoserve.model_defaults import load_generation_defaults
from neoserve.tokenizer import Tokenizer

from gateway.admission import Admission
from gateway.backend import Backend, BackendSpec
from gateway.backend_pool import BackendPool
from gateway.metrics import GatewayMetrics
from gateway.generation import ModelState
from gateway.health_names import ALL_BACKENDS_SERVICE, OFFLOAD_SERVICE, PUBLIC_SERVICE  # noqa: F401 - re-exported
from gateway.router import DEFAULT_BLOCK_SIZE, Router

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class BackendMonitor:
    def __init__(self, *, model: ModelState, model_spec: str | None, health_servicer: health.aio.HealthServicer,
                 metrics: GatewayMetrics, admission: Admission, interval_s: float, pool: BackendPool | None = None,
                 router: Router | None = None, worker=None, sidecar_address: str | None = None):
        """Watches `pool`; or, given `worker` (a WorkerClient) and its `sidecar_address`, that one backend."""
        if pool is None:
            pool = BackendPool([BackendSpec(worker.address, sidecar_address)],
                               make=lambda spec: Backend(spec, worker))
        self.pool = pool
        self._router = router
        self._model = model
        self._model_spec = model_spec
        self.fatal_error: ModelLoadError | None = None  # set when the model can never be served (no tokenizer)
        self._health = health_servicer
        self._metrics = metrics
        self._admission = admission
        self._interval_s = interval_s
        self.serving = False
        self.degraded = False  # serving without CPU offload on some backend (see _set_offload)
        self._tokenizer_task: asyncio.Task | None = None

    async def close(self) -> None:
        await self.pool.close()

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

    async def _load_model(self, backend: Backend) -> None:
        info = backend.info
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
        if self._router is not None:
            self._router.block_size = info.block_size or DEFAULT_BLOCK_SIZE
        log.info("serving %s (vocab %d, context %d) via %d backend(s), first %s", info.model_id, info.vocab_size,
                 info.max_model_len, len(self.pool), backend.name)

    async def _check_backend(self, backend: Backend) -> None:
        was_healthy = backend.healthy
        await backend.check()
        if backend.healthy and not was_healthy:
            backend.info = None  # NOTE: a restarted worker may have come back changed; ask again
            if self._router is not None:
                self._router.affinity.forget(backend.name)  # NOTE: a restarted worker's KV cache is empty
        if backend.healthy and backend.info is None:
            try:
                backend.info = await backend.client.info()
            except Exception:  # noqa: BLE001 - asked again next round
                log.exception("could not read backend %s's model description", backend.name)
        self._check_model(backend)

    def _check_model(self, backend: Backend) -> None:
        ours, theirs = self._model.info, backend.info
        if ours is None or theirs is None:
            return
        mismatch = None
        if (theirs.model_id, theirs.vocab_size, theirs.max_model_len) != (ours.model_id, ours.vocab_size,
                                                                         ours.max_model_len):
            mismatch = (f"serves {theirs.model_id} (vocab {theirs.vocab_size}, context {theirs.max_model_len}), "
                        f"not {ours.model_id} (vocab {ours.vocab_size}, context {ours.max_model_len})")
        if mismatch != backend.mismatch and mismatch is not None:
            log.error("backend %s %s: not routing to it", backend.name, mismatch)
        backend.mismatch = mismatch

    async def check_once(self) -> bool:
        backends = list(self.pool)
        await asyncio.gather(*(self._check_backend(b) for b in backends))
        if not self._model.ready:
            first = next((b for b in backends if b.healthy and b.info is not None), None)
            if first is not None:
                try:
                    await self._load_model(first)
                except ModelLoadError:
                    raise  # NOTE: no tokenizer file will appear by waiting: retrying would only hide the cause
                except Exception:  # noqa: BLE001 - retried next round; the health status says NOT_SERVING meanwhile
                    log.exception("could not load the model description from the worker")
                for b in backends:
                    self._check_model(b)
        await self.pool.reap()
        self._export(backends)
        await self._set_offload(backends)
        serving = self._model.ready and any(b.routable for b in backends) and not self._admission.draining
        await self.set_serving(serving)
        everyone = serving and all(b.routable for b in backends)
        await self._health.set(ALL_BACKENDS_SERVICE, SERVING if everyone else NOT_SERVING)
        return serving

    def _export(self, backends: list[Backend]) -> None:
        m = self._metrics
        stats = [b.stats for b in backends if b.healthy and b.stats is not None]
        m.worker_stats.latest = sum_stats(stats) if stats else None
        m.worker_up.set(1 if any(b.healthy for b in backends) else 0)
        m.inflight.set(self._admission.inflight)
        m.queued.set(self._admission.queued)

    async def _set_offload(self, backends: list[Backend]) -> None:
        """Metrics and the OFFLOAD_SERVICE health status say whether CPU offload works (degraded while not, on any
        backend)."""
        self._metrics.sidecar_up.set(1 if all(b.sidecar_ok for b in backends) else 0)
        degraded = any(b.degraded for b in backends)
        if degraded != self.degraded:
            log.warning("CPU offload %s", "unavailable: serving gpu-only (degraded)" if degraded else "is back")
        self.degraded = degraded
        self._metrics.degraded.set(1 if degraded else 0)
        if any(b.spec.sidecar_address for b in backends):
            await self._health.set(OFFLOAD_SERVICE, NOT_SERVING if degraded else SERVING)

    async def set_serving(self, serving: bool) -> None:
        if serving != self.serving:
            log.info("health: %s", "SERVING" if serving else "NOT_SERVING")
        self.serving = serving
        status = SERVING if serving else NOT_SERVING
        for service in ("", PUBLIC_SERVICE):
            await self._health.set(service, status)
        if not serving:
            await self._health.set(ALL_BACKENDS_SERVICE, NOT_SERVING)

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


def sum_stats(stats: list[worker_pb2.StatsResponse]) -> worker_pb2.StatsResponse:
    """The backends' counters added up (the unlabelled metrics); `mode` is the first backend's."""
    total = worker_pb2.StatsResponse()
    for s in stats:
        for field in worker_pb2.StatsResponse.DESCRIPTOR.fields:
            if field.type != field.TYPE_STRING:
                setattr(total, field.name, getattr(total, field.name) + getattr(s, field.name))
    total.mode = stats[0].mode
    return total
