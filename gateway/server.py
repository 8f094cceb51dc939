"""Assembles the gateway process: public gRPC server (inference, health, reflection), the optional OpenAI HTTP
endpoint (same request path, see gateway/generation.py), the backends and the router between them, metrics,
drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from neoserve.v1 import inference_service_pb2 as pb
from neoserve.v1 import inference_service_pb2_grpc as pb_grpc

from gateway.admission import Admission
from gateway.auth import ApiKeyInterceptor
from gateway.decode_guard import DecodeErrorInterceptor
from gateway.backend_pool import BackendPool
from gateway.backends import NOT_SERVING, PUBLIC_SERVICE, BackendMonitor
from gateway.config import GatewayConfig
from gateway.generation import GenerationService, ModelState
from gateway.metrics import GatewayMetrics
from gateway.openai_http import OpenAIServer
from gateway.servicer import InferenceServicer
from gateway.discovery import DnsDiscovery
from gateway.router import Router
from gateway.status import DrainingError

log = logging.getLogger(__name__)

CUT_GRACE_S = 2.0  # after the drain timeout: how long cut requests get to send their error to their clients


def server_options(config: GatewayConfig) -> list[tuple[str, int]]:
    # NOTE: long streams (a slow prompt, a long reply) must survive idle NATs and proxies: the server pings every
    # keepalive_time_s and accepts client pings as often as every 5 s without calling them abuse.
    return [
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.so_reuseport", 0),
    ]


def server_credentials(config: GatewayConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None:
        return None
    key = Path(config.tls_key).read_bytes()
    chain = Path(config.tls_cert).read_bytes()
    root = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=root,
                                       require_client_auth=root is not None)


def http_ssl_context(config: GatewayConfig) -> ssl.SSLContext | None:
    """The HTTP port serves TLS with the same certificate (and client CA) as the gRPC port, or neither does."""
    if config.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca:
        context.load_verify_locations(config.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class Gateway:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.metrics = GatewayMetrics()
        self.admission = Admission(config.max_inflight, config.max_queued, config.retry_after_s)
        static = config.backend_specs()
        self.pool = BackendPool(static)
        self.router = Router(self.pool, policy=config.routing, max_attempts=config.max_attempts)
        self.discovery = (DnsDiscovery(config.backend_dns, self.pool, interval_s=config.discovery_interval_s,
                                       static={spec.address for spec in static}) if config.backend_dns else None)
        self.metrics.watch_backends(self.pool.all)
        self.model = ModelState()
        self.health = health.aio.HealthServicer()
        self.monitor = BackendMonitor(
            pool=self.pool, router=self.router, model=self.model, model_spec=config.model,
            health_servicer=self.health, metrics=self.metrics, admission=self.admission,
            interval_s=config.health_interval_s,
        )
        # NOTE: the API key is checked first: an unauthenticated caller learns nothing about its payload.
        interceptors = [ApiKeyInterceptor(config.api_key)] if config.api_key else []
        interceptors.append(DecodeErrorInterceptor())
        self.server = grpc.aio.server(options=server_options(config), interceptors=interceptors)
        # NOTE: the router stands in for one worker link (same generate/cut_all), whatever the number of backends.
        self.service = GenerationService(self.model, self.router, self.admission, self.metrics,
                                         log_prompts=config.log_prompts)
        pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(self.service), self.server)
        self.http: OpenAIServer | None = None
        if config.http_port >= 0:
            self.http = OpenAIServer(self.service, api_key=config.api_key, served_model_name=config.served_model_name,
                                     serving=lambda: self.monitor.serving,
                                     degraded=lambda: self.monitor.degraded, registry=self.metrics.registry,
                                     max_body_bytes=int(config.http_max_body_mib * 2**20))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [pb.DESCRIPTOR.services_by_name["InferenceService"].full_name, health.SERVICE_NAME,
             reflection.SERVICE_NAME], self.server)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._monitor_task: asyncio.Task | None = None
        self._discovery_task: asyncio.Task | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        creds = server_credentials(self.config)
        if creds is None:
            self.port = self.server.add_insecure_port(self.config.listen_address)
        else:
            self.port = self.server.add_secure_port(self.config.listen_address, creds)
        for service in ("", PUBLIC_SERVICE):
            await self.health.set(service, NOT_SERVING)
        await self.server.start()
        if self.http is not None:
            self.http_port = await self.http.start(self.config.host, self.config.http_port,
                                                   http_ssl_context(self.config))
        if self.config.metrics_port >= 0:
            self.metrics_port = self.metrics.serve_http(self.config.metrics_host, self.config.metrics_port)
        self.pool.start()
        if self.discovery is not None:
            await self.discovery.refresh()  # NOTE: the first backends before the first health round
            self._discovery_task = asyncio.get_running_loop().create_task(self.discovery.run(), name="discovery")
        self._monitor_task = asyncio.get_running_loop().create_task(self.monitor.run(), name="backend-monitor")
        self._monitor_task.add_done_callback(self._on_monitor_done)
        if self.config.port_file:
            tmp = Path(self.config.port_file + ".tmp")
            tmp.write_text(json.dumps({"port": self.port, "metrics_port": self.metrics_port,
                                       "http_port": self.http_port, "pid": os.getpid()}))
            tmp.replace(self.config.port_file)  # NOTE: atomic, so a reader never sees half a file
        log.info("gateway listening on %s:%d (OpenAI HTTP port %s, metrics port %s)", self.config.host, self.port,
                 self.http_port, self.metrics_port)

    def _on_monitor_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and self.monitor.fatal_error is not None:
            # NOTE: the model cannot be served at all: stop now, so the launcher reports the cause at start-up.
            self._fatal_stop = asyncio.get_running_loop().create_task(self.drain_and_stop())

    async def drain_and_stop(self) -> None:
        """Refuses new requests (UNAVAILABLE), lets running streams finish for drain_timeout_s, then stops."""
        if self._stopped.is_set():
            return
        log.info("draining: %d requests in flight", self.admission.inflight)
        self.admission.start_draining()
        for task in (self._monitor_task, self._discovery_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.monitor.set_serving(False)
        if not await self.admission.wait_idle(self.config.drain_timeout_s):
            log.warning("drain timeout: cutting %d streams", self.admission.inflight)
            # NOTE: each cut request ends through its own transport's error path, so its client is told why:
            # gRPC UNAVAILABLE with this message, HTTP a 503 or (mid-stream) an error event and [DONE].
            self.router.cut_all(DrainingError(
                f"the server is shutting down: this request was still running when the drain timeout "
                f"({self.config.drain_timeout_s:g} s) ended; retry it on another server"))
            await self.admission.wait_idle(CUT_GRACE_S)
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace=1.0)
        await self.monitor.close()
        self.metrics.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(config: GatewayConfig) -> None:
    gateway = Gateway(config)
    await gateway.start()
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task] = []

    def on_signal() -> None:
        if not stopping:
            stopping.append(loop.create_task(gateway.drain_and_stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await gateway.wait_stopped()
    if gateway.monitor.fatal_error is not None:
        raise SystemExit(f"gateway: cannot serve: {gateway.monitor.fatal_error}")
