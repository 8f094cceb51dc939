"""The worker process's gRPC face: neoserve.internal.v1.WorkerService around the AsyncEngine.

Each gateway connection holds one bidirectional Stream. Requests that arrive on it run as one asyncio task each,
consuming the engine's per-request iterator; their deltas meet in one outbox, and everything in the outbox is sent
as one message, so one engine step costs about one message on the link. When the stream ends for any reason (the
gateway died, cancelled or closed it), every request that came over it is aborted and its KV cache freed.

With an external sidecar (--sidecar, as the launcher and compose run it) a SidecarWatcher follows the sidecar's
identity: when it died the engine recomputes its CPU sequences on the GPU and serves gpu-only; once the supervisor
has restarted it, the watcher attaches a new client and the engine takes it back before its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from neoserve.config_fields import CliConfig, flag
from neoserve.errors import BackendUnavailableError, CapacityError, ModelLoadError, ValidationError
from neoserve.internal.v1 import worker_pb2, worker_pb2_grpc
from neoserve.model_files import model_id
from neoserve.outputs import FinishReason, RequestOutput
from neoserve.sampling_params import SamplingParams

from gpu_worker.config import EngineConfig
from gpu_worker.engine import LLMEngine

log = logging.getLogger(__name__)

_FINISH = {
    FinishReason.STOP: worker_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: worker_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: worker_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: worker_pb2.FINISH_REASON_ERROR,
}


@dataclass
class WorkerServerConfig(CliConfig):
    listen: str = flag("127.0.0.1:50061", "gRPC listen address: HOST:PORT (loopback by default) or unix:PATH")
    port_file: str | None = flag(None, "write {\"port\": N} here as JSON once listening (for --listen HOST:0)")
    engine: EngineConfig = field(default_factory=EngineConfig)


def error_record(exc: BaseException) -> worker_pb2.RequestError:
    """The one place that turns a request's exception into the record the gateway maps to a status."""
    if isinstance(exc, ValidationError):
        return worker_pb2.RequestError(kind=worker_pb2.ERROR_KIND_VALIDATION, field=exc.field, message=exc.message)
    if isinstance(exc, CapacityError):
        return worker_pb2.RequestError(kind=worker_pb2.ERROR_KIND_CAPACITY, message=str(exc),
                                       retry_after_s=exc.retry_after_s)
    if isinstance(exc, BackendUnavailableError):
        return worker_pb2.RequestError(kind=worker_pb2.ERROR_KIND_UNAVAILABLE, message=str(exc))
    log.exception("request failed in the worker", exc_info=exc)
    return worker_pb2.RequestError(kind=worker_pb2.ERROR_KIND_INTERNAL, message=f"{type(exc).__name__}: {exc}")


def params_from_proto(p: worker_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
        repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, seed=p.seed if p.HasField("seed") else None,
        stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos, min_tokens=p.min_tokens,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
        cache_salt=p.cache_salt if p.HasField("cache_salt") else None, skip_prefix_cache=p.skip_prefix_cache,
    )


def delta_from_output(out: RequestOutput) -> worker_pb2.RequestDelta:
    d = worker_pb2.RequestDelta(request_id=out.request_id, new_token_ids=out.new_token_ids,
                                num_prompt_tokens=out.num_prompt_tokens, num_output_tokens=out.num_output_tokens,
                                finished=out.finished, num_cached_tokens=out.num_cached_tokens)
    if out.new_logprobs:
        for lp in out.new_logprobs:
            d.logprobs.append(worker_pb2.TokenLogprob(
                token_id=lp.token_id, logprob=lp.logprob,
                top=[worker_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]))
    if out.finished:
        d.finish_reason = _FINISH.get(out.finish_reason, worker_pb2.FINISH_REASON_UNSPECIFIED)
        if out.stop_token_id is not None:
            d.stop_token_id = out.stop_token_id
        if out.error is not None or out.finish_reason == FinishReason.ERROR:
            d.error.CopyFrom(worker_pb2.RequestError(kind=worker_pb2.ERROR_KIND_INTERNAL,
                                                     message=out.error or "the engine failed the request"))
    return d


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, config: EngineConfig, engine=None):
        self.engine = engine  # None while the model loads: calls then get UNAVAILABLE
        self._config = config
        self._open: dict[str, asyncio.Task] = {}  # request id -> task, over all streams
        self._num_streams = 0

    async def _require_engine(self, context):
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the worker is loading its model")
        return self.engine

    async def Stream(self, request_iterator, context: grpc.aio.ServicerContext):
        engine = await self._require_engine(context)
        outbox: asyncio.Queue[worker_pb2.RequestDelta] = asyncio.Queue()
        tasks: dict[str, asyncio.Task] = {}
        loop = asyncio.get_running_loop()

        async def run(start: worker_pb2.StartRequest) -> None:
            rid = start.request_id
            try:
                params = params_from_proto(start.params)
                async with contextlib.aclosing(
                    engine.generate(rid, list(start.prompt_token_ids), params)
                ) as outputs:
                    async for out in outputs:
                        outbox.put_nowait(delta_from_output(out))
            except asyncio.CancelledError:
                pass  # aborted: aclosing closed the engine iterator, which aborted the request and freed its KV
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the gateway as a record
                outbox.put_nowait(worker_pb2.RequestDelta(request_id=rid, finished=True,
                                                          finish_reason=worker_pb2.FINISH_REASON_ERROR,
                                                          error=error_record(exc)))
            finally:
                tasks.pop(rid, None)
                self._open.pop(rid, None)

        async def read_requests() -> None:
            async for msg in request_iterator:
                for rid in msg.abort:
                    task = tasks.get(rid)
                    if task is not None:
                        task.cancel()
                for start in msg.start:
                    if start.request_id in self._open:
                        outbox.put_nowait(worker_pb2.RequestDelta(
                            request_id=start.request_id, finished=True, finish_reason=worker_pb2.FINISH_REASON_ERROR,
                            error=error_record(ValidationError("request_id", "is already running"))))
                        continue
                    task = loop.create_task(run(start))
                    tasks[start.request_id] = task
                    self._open[start.request_id] = task
            # NOTE: the gateway half-closed; requests already started keep streaming until they finish.

        self._num_streams += 1
        reader = loop.create_task(read_requests())
        try:
            while True:
                first = await outbox.get()
                msg = worker_pb2.StreamResponse(deltas=[first])
                while not outbox.empty():  # NOTE: coalesce the deltas of one engine step into one message
                    msg.deltas.append(outbox.get_nowait())
                yield msg
        finally:
            # The stream is gone (gateway died, cancelled, or the server stops): abort everything it carried.
            self._num_streams -= 1
            reader.cancel()
            for task in list(tasks.values()):
                task.cancel()
            await asyncio.gather(reader, *tasks.values(), return_exceptions=True)

    async def Info(self, request, context) -> worker_pb2.InfoResponse:
        engine = await self._require_engine(context)
        mc = engine.model_config
        device = getattr(getattr(engine, "engine", None), "runner", None)
        device = str(getattr(device, "device", self._config.device))
        return worker_pb2.InfoResponse(
            model_spec=self._config.model or "", model_id=model_id(self._config.model),
            architecture=mc.architecture, vocab_size=mc.vocab_size, max_model_len=engine.max_model_len,
            eos_token_ids=mc.eos_token_ids, device=device, mode=self._config.mode,
            max_num_seqs=self._config.max_num_seqs, block_size=self._config.block_size,
        )

    async def Stats(self, request, context) -> worker_pb2.StatsResponse:
        engine = await self._require_engine(context)
        s = engine.stats()
        return worker_pb2.StatsResponse(
            num_running=s.num_running, num_waiting=s.num_waiting, num_cpu_sequences=s.num_cpu_sequences,
            gpu_kv_blocks_used=s.gpu_kv_blocks_used, gpu_kv_blocks_total=s.gpu_kv_blocks_total,
            cpu_kv_bytes_used=s.cpu_kv_bytes_used, cpu_kv_bytes_total=s.cpu_kv_bytes_total,
            num_preemptions=s.num_preemptions, num_open_requests=len(self._open), num_streams=self._num_streams,
            num_swap_outs=s.num_swap_outs, num_swap_ins=s.num_swap_ins, num_steps=s.num_steps,
            num_pipelined_steps=s.num_pipelined_steps, num_cpu_decodes=s.num_cpu_decodes, num_decodes=s.num_decodes,
            mode=s.mode, prefix_caching=self._config.enable_prefix_caching,
            prefix_cache_queried_tokens=s.prefix_cache_queried_tokens,
            prefix_cache_hit_tokens=s.prefix_cache_hit_tokens, prefix_cache_blocks=s.prefix_cache_blocks,
            prefix_cache_evictions=s.prefix_cache_evictions, offload_r=s.offload_r,
            offload_max_gain=s.offload_max_gain,
        )


# --- taking a restarted sidecar back ------------------------------------------------------------------------------

class ReattachingEngine(LLMEngine):
    """LLMEngine that can take a new sidecar client back after `_on_sidecar_failure` (or a restart it has not noticed
    yet). Any thread may `offer_sidecar()`; the engine thread swaps it in at the start of its next step, so nothing
    the step loop owns (scheduler, runner, client) is touched from another thread.

    NOTE: this lives here because the launcher's restart of the sidecar is what needs it; LLMEngine itself would be
    the better home for `_reattach` (see docs/RELIABILITY.md)."""

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self._handover_lock = threading.Lock()
        self._offered = None  # a connected, configured SidecarClient waiting for the engine thread
        self._dropped: str | None = None  # why the sidecar is known dead, until the engine thread acts on it
        self.num_reattaches = 0

    def offer_sidecar(self, client) -> None:
        with self._handover_lock:
            old, self._offered = self._offered, client
        if old is not None:
            old.close(shutdown=False)

    def drop_sidecar(self, reason: str) -> None:
        """The sidecar process is gone: fail over before the next step rather than at its next data-plane call.
        NOTE: a step that would otherwise reach a sidecar restarted at the same address would get "not configured"
        answers (a failed step, not a fail-over); dropping early closes that window."""
        with self._handover_lock:
            self._dropped = reason

    @property
    def has_offer(self) -> bool:
        return self._offered is not None

    def has_unfinished(self) -> bool:
        """NOTE: also true while a handover waits, so that the engine loop, which steps only while this is true, acts
        on a sidecar that died (or came back) while the server is idle, not at the next request: health, stats and
        placement say so when it happens. A step without requests schedules nothing."""
        with self._handover_lock:
            pending = self._offered is not None or self._dropped is not None
        return pending or super().has_unfinished()

    def step(self):
        with self._handover_lock:
            client, self._offered = self._offered, None
            dropped, self._dropped = self._dropped, None
        if dropped is not None and self.sidecar is not None:
            self._on_sidecar_failure(BackendUnavailableError(dropped))
        if client is not None:
            self._reattach(client)
        return super().step()

    def _reattach(self, client) -> None:
        if self.sidecar is not None:
            # NOTE: the old sidecar process is gone (the watcher saw a new one answer): its KV is lost, so its
            # sequences recompute on the GPU exactly as if a data-plane call had failed.
            self._on_sidecar_failure(BackendUnavailableError("the cpu_attn sidecar was restarted"))
        try:
            self.attach_sidecar(client)  # its first call (stats) fails before anything changes
        except Exception as exc:  # noqa: BLE001 - stay gpu-only; the watcher tries again
            log.warning("could not take the restarted sidecar back: %s", exc)
            client.close(shutdown=False)
            return
        self.num_reattaches += 1
        log.warning("cpu_attn sidecar (pid %s) attached again: serving in mode %s", client.pid or "?",
                    self.config.mode)

    def close(self) -> None:
        with self._handover_lock:
            client, self._offered = self._offered, None
        if client is not None:
            client.close(shutdown=False)
        super().close()


class SidecarWatcher:
    """Polls the external sidecar's health and offers the engine a new client when the sidecar it attached to was
    replaced (another pid / start time answers) or the engine dropped it after a failure.

    NOTE: identity is (pid, process start time) as the sidecar reports it, which works across pid namespaces
    (compose); the first answer after the engine attached is taken as the sidecar the engine holds."""

    def __init__(self, engine: ReattachingEngine, address: str, *, interval_s: float = 0.5,
                 min_retry_s: float = 2.0):
        self.engine = engine
        self.address = address
        self.interval_s = interval_s
        self.min_retry_s = min_retry_s
        self._attached: tuple[int, int] | None = None
        self._last_try = 0.0
        self._dropped = False

    async def _identity(self, stub) -> tuple[tuple[int, int] | None, bool, bool]:
        """(pid and start time, usable, gone): gone when nothing listens any more (not merely slow to answer)."""
        from neoserve.internal.v1 import sidecar_pb2

        try:
            h = await stub.Health(sidecar_pb2.SidecarHealthRequest(), timeout=2.0)
        except grpc.aio.AioRpcError as e:
            return None, False, e.code() == grpc.StatusCode.UNAVAILABLE
        usable = h.status in (sidecar_pb2.SidecarHealthResponse.SERVING,
                              sidecar_pb2.SidecarHealthResponse.NOT_CONFIGURED)
        return (h.pid, h.pid_start_time), usable, False

    def _connect(self):
        return self.engine.connect_sidecar(self.address)

    async def run(self) -> None:
        from neoserve.internal.v1 import sidecar_pb2_grpc

        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = sidecar_pb2_grpc.CpuAttentionServiceStub(channel)
            while True:
                try:
                    await self._check(stub)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - the watcher must outlive any one failed attempt
                    log.exception("sidecar watcher: check failed")
                await asyncio.sleep(self.interval_s)

    async def _check(self, stub) -> None:
        identity, usable, gone = await self._identity(stub)
        eng = self.engine
        if identity is None:
            if gone and eng.sidecar is not None and not self._dropped:
                log.warning("cpu_attn sidecar at %s does not answer: its sequences will recompute on the GPU",
                            self.address)
                eng.drop_sidecar("the cpu_attn sidecar stopped answering its health checks")
                self._dropped = True
            return
        if self._attached is None and eng.sidecar is not None:
            self._attached = identity  # the sidecar the engine attached to at start
            return
        holds_it = eng.sidecar is not None and identity == self._attached
        if holds_it or eng.has_offer or not usable:
            return
        if time.monotonic() - self._last_try < self.min_retry_s:
            return
        self._last_try = time.monotonic()
        log.warning("cpu_attn sidecar at %s is %s: attaching to it", self.address,
                    "a new process" if identity != self._attached else "back")
        client = await asyncio.to_thread(self._connect)
        self._attached = identity
        self._dropped = False
        eng.offer_sidecar(client)


def server_options() -> list[tuple[str, int]]:
    # NOTE: the gateway's stream lives as long as the gateway; pings from it must never count as abuse.
    return [
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]


async def serve(config: WorkerServerConfig, engine=None) -> None:
    """Runs the worker until SIGTERM/SIGINT. Health turns SERVING once the engine is loaded."""
    server = grpc.aio.server(options=server_options())
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    servicer = WorkerServicer(config.engine, engine)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(config.listen)
    await server.start()
    if config.port_file:
        tmp = Path(config.port_file + ".tmp")
        tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
        tmp.replace(config.port_file)
    log.info("worker listening on %s%s; loading the model", config.listen,
             "" if config.listen.startswith("unix:") else f" (port {port})")

    watcher_task = None
    if engine is None:
        from gpu_worker.async_engine import AsyncEngine

        # NOTE: loading takes seconds; a thread keeps the health service answering (NOT_SERVING) meanwhile.
        try:
            llm = await asyncio.to_thread(ReattachingEngine, config.engine)
        except ModelLoadError as e:
            # NOTE: no restart loads this model: say why in one line and exit EX_CONFIG, which the launcher does
            # not restart. The traceback is for --log-level DEBUG.
            log.error("cannot start: %s", e)
            log.debug("the model failed to load", exc_info=True)
            await server.stop(grace=None)
            raise SystemExit(os.EX_CONFIG) from None
        engine = AsyncEngine(llm)
        if config.engine.sidecar and config.engine.mode != "gpu-only":
            watcher_task = asyncio.get_running_loop().create_task(
                SidecarWatcher(llm, config.engine.sidecar).run(), name="sidecar-watcher")
    servicer.engine = engine
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("neoserve.internal.v1.WorkerService", health_pb2.HealthCheckResponse.SERVING)
    log.info("worker ready: %s, context %d", engine.model_config.name, engine.max_model_len)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("worker stopping")
    if watcher_task is not None:
        watcher_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher_task
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=2.0)
    await engine.shutdown()
