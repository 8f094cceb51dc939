"""Optional API-key check on every public call except health checks, for both transports.

The key travels in gRPC metadata or HTTP headers as "authorization: Bearer KEY" or "x-api-key: KEY". NOTE:
hmac.compare_digest makes the comparison constant-time, so response timing does not leak how much of a guessed key
was right.
"""

from __future__ import annotations

import hmac

import grpc

# Health checks stay open so load balancers and compose healthchecks need no secret.
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


def key_from_metadata(metadata) -> str | None:
    """The key in (name, value) pairs with lower-case names (gRPC metadata; HTTP headers lower-cased)."""
    for key, value in metadata or ():
        if key == "x-api-key":
            return value
        if key == "authorization" and value.lower().startswith("bearer "):
            return value[7:].strip()
    return None


class ApiKeyCheck:
    """Whether the (name, value) pairs of a call carry the configured key."""

    def __init__(self, api_key: str):
        self._key = api_key.encode()

    def allowed(self, metadata) -> bool:
        given = key_from_metadata(metadata)
        return given is not None and hmac.compare_digest(given.encode(), self._key)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str):
        self._allowed = ApiKeyCheck(api_key).allowed

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(EXEMPT_PREFIXES) or self._allowed(
            handler_call_details.invocation_metadata
        ):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _denying_handler(handler)


def _denying_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""
    message = "missing or invalid API key (send metadata 'authorization: Bearer KEY')"

    async def deny_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny_unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny_unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)
