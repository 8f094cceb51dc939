"""OpenAI-compatible HTTP endpoint of the gateway (aiohttp, in the gateway's event loop beside grpc.aio).

    POST /v1/chat/completions   POST /v1/completions    (stream: server-sent events ending with "data: [DONE]")
    GET  /v1/models             GET  /v1/models/{name}
    GET  /health                (open: no API key, like the gRPC health service)
    GET  /metrics               (needs the API key when one is set: the counters describe the server's traffic)

Every request goes through gateway/generation.py, the same code path as gRPC Generate: same admission queue
(429 + Retry-After when full, 503 while draining), same validation, same metrics, same API key
(Authorization: Bearer KEY). Wire-format mapping is in gateway/openai_protocol.py.

Cancellation: the runner cancels a handler whose client disconnected (handler_cancellation), also while it waits
in the queue or for its first token; the cancelled handler closes the generation, which aborts the request in the
worker and frees its KV cache. A write to a gone client ends the stream the same way.

Status codes: errors found before the first token (validation, a full queue, draining, worker errors) get their
HTTP status. A stream that fails after its 200 header was sent ends with one `data: {"error": {...}}` event and
`data: [DONE]`, as vLLM does; the OpenAI SDKs raise it as an APIError. A stream the drain timeout cuts ends that
way too, with a 503 error saying the server is shutting down.

Bodies: at most `max_body_bytes` each (413 beyond it, refused before reading when Content-Length says so), and at
most twice that read and parsed at once (gateway/body_budget.py), so a burst of large requests cannot run the
gateway out of memory. A body is dropped once its request is tokenized.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import time
from typing import Any, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from neoserve.errors import AuthenticationError, ModelNotFoundError, RequestTooLargeError

from gateway import openai_protocol as protocol
from gateway.auth import ApiKeyCheck
from gateway.body_budget import BodyBudget
from gateway.generation import Finished, GenerationService, TextDelta

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 2**20  # gateway/config.py's --http-max-body-mib says why
BODIES_AT_ONCE = 2  # NOTE: the body budget holds this many maximum-size bodies; smaller ones share it
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}  # NOTE: tells nginx-style proxies not to buffer the stream
OPEN_PATHS = ("/health",)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=_json(body), content_type="application/json", headers=headers)


def _sse(obj: Any) -> bytes:
    return b"data: " + _json(obj) + b"\n\n"


class OpenAIServer:
    def __init__(self, service: GenerationService, *, api_key: str | None = None,
                 served_model_name: str | None = None, serving: Callable[[], bool] = lambda: True,
                 degraded: Callable[[], bool] = lambda: False,
                 registry: CollectorRegistry | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self._service = service
        self._max_body = max_body_bytes
        self._bodies = BodyBudget(BODIES_AT_ONCE * max_body_bytes)
        self._auth = ApiKeyCheck(api_key) if api_key else None
        self._served_name = served_model_name
        self._serving = serving
        self._degraded = degraded
        self._registry = registry
        self._started = int(time.time())
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors_and_auth], client_max_size=self._max_body)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{name:.+}", self._model)
        app.router.add_get("/health", self._health)
        if self._registry is not None:
            app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listens on host:port (0: a free port); returns the bound port."""
        # NOTE: handler_cancellation: a client that disconnects cancels its handler, which aborts its request.
        # access_log off: like the gRPC port, requests are not logged one by one (--log-prompts logs them).
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)
        site = web.SockSite(self._runner, sock, ssl_context=ssl_context)
        await site.start()
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- middleware -------------------------------------------------------------------------------------------------

    @web.middleware
    async def _errors_and_auth(self, request: web.Request, handler) -> web.StreamResponse:
        if self._auth is not None and request.path not in OPEN_PATHS and not self._auth.allowed(
                (k.lower(), v) for k, v in request.headers.items()):
            return _error(*protocol.error_response(AuthenticationError(
                "missing or invalid API key (send the header 'Authorization: Bearer KEY')")))
        try:
            return await handler(request)
        except web.HTTPException as exc:  # unknown path, wrong method, body too large: OpenAI-shaped too
            if exc.status < 400:
                raise
            message = f"{exc.reason} ({request.method} {request.path})"
            return _error(exc.status, protocol.error_body(message, "invalid_request_error"))

    def _model_names(self, model) -> tuple[str, ...]:
        return protocol.accepted_model_names(self._served_name, model)

    # --- routes -------------------------------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        serving = self._serving()
        # NOTE: degraded (serving without CPU offload, the sidecar down) still answers 200: requests are served.
        status = ("degraded" if self._degraded() else "serving") if serving else "not_serving"
        return web.json_response({"status": status}, status=200 if serving else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _models(self, request: web.Request) -> web.Response:
        try:
            model = self._service.require_ready()
        except Exception as exc:  # noqa: BLE001 - the status mapping decides
            return _error(*protocol.error_response(exc))
        name = protocol.served_model_name(self._served_name, model)
        return web.json_response({"object": "list", "data": [protocol.model_card(name, model, self._started)]})

    async def _model(self, request: web.Request) -> web.Response:
        try:
            model = self._service.require_ready()
            if request.match_info["name"] not in self._model_names(model):
                raise ModelNotFoundError(request.match_info["name"])
        except Exception as exc:  # noqa: BLE001
            return _error(*protocol.error_response(exc))
        name = protocol.served_model_name(self._served_name, model)
        return web.json_response(protocol.model_card(name, model, self._started))

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, protocol.parse_chat)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, protocol.parse_completion)

    # --- generation ---------------------------------------------------------------------------------------------------

    async def _generate(self, request: web.Request, parse) -> web.StreamResponse:
        arrival = time.perf_counter()
        service = self._service
        try:
            req, logged = await self._parse(request, parse)
        except Exception as exc:  # noqa: BLE001 - the status mapping decides
            return _error(*protocol.error_response(exc))
        rid = service.new_request_id()
        fmt = protocol.response_format(req, rid, service.model.tokenizer)
        events = service.generate(rid, req.prepared, arrival=arrival, label=request.headers.get("X-Request-Id", ""),
                                  raw=logged)
        # NOTE: aclosing: however the handler ends (done, client gone, cancelled), the generation is closed, which
        # aborts an unfinished request in the worker.
        async with contextlib.aclosing(events):
            try:
                first = await anext(events)  # errors before the first token still get their own HTTP status
                if not req.stream:
                    deltas = [first]
                    while not isinstance(deltas[-1], Finished):
                        deltas.append(await anext(events))
                    return web.Response(body=_json(fmt.full(deltas[:-1], deltas[-1])),
                                        content_type="application/json")
            except Exception as exc:  # noqa: BLE001
                return _error(*protocol.error_response(exc))
            return await self._stream(request, fmt, first, events)

    async def _parse(self, request: web.Request, parse) -> tuple[protocol.OpenAIRequest, bytes | None]:
        """The parsed request, and its body when --log-prompts wants it logged (else None: the body is dropped
        here, so a long generation does not keep megabytes of JSON alive)."""
        length = request.content_length
        if length is not None and length > self._max_body:
            raise self._too_large(length)  # NOTE: before reading: the bytes never enter the gateway
        async with self._bodies.hold(self._max_body if length is None else length):
            raw = await self._read_body(request)
            req = await self._service.prepare(
                lambda model: parse(protocol.load_body(raw), model, self._model_names(model)))
        return req, (bytes(raw) if self._service.log_prompts else None)

    async def _read_body(self, request: web.Request) -> bytearray:
        # NOTE: not request.read(): that keeps the bytes on the request object for as long as the handler runs.
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > self._max_body:
                raise self._too_large(None)
        return body

    def _too_large(self, length: int | None) -> RequestTooLargeError:
        size = "" if length is None else f" ({length / 2**20:.1f} MiB)"
        return RequestTooLargeError(
            f"body: the request body{size} is larger than this server's limit of {self._max_body / 2**20:g} MiB; "
            "send a shorter prompt (the limit is the gateway's --http-max-body-mib)")

    async def _stream(self, request: web.Request, fmt: protocol.ResponseFormat, first: TextDelta | Finished,
                      events) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        try:
            for chunk in fmt.stream_start():
                await response.write(_sse(chunk))
            event = first
            while not isinstance(event, Finished):
                chunk = fmt.stream_delta(event)
                if chunk is not None:
                    await response.write(_sse(chunk))
                event = await anext(events)
            for chunk in fmt.stream_end(event):
                await response.write(_sse(chunk))
        except ConnectionError:  # the client is gone: the caller's aclosing aborts the request
            return response
        except Exception as exc:  # noqa: BLE001 - the 200 header is out: report it in the stream
            _, body, _ = protocol.error_response(exc)
            with contextlib.suppress(ConnectionError):
                await response.write(_sse(body))
        with contextlib.suppress(ConnectionError):
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        return response
