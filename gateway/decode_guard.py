"""Answers requests whose bytes do not parse as their protobuf message with INVALID_ARGUMENT.

grpc answers a request deserializer's exception with UNKNOWN, which is outside our documented status set and says
nothing useful to the client. This interceptor swaps in a deserializer that returns a marker instead of raising, and
a behaviour that aborts with INVALID_ARGUMENT when it sees the marker.
"""

from __future__ import annotations

import grpc

PUBLIC_PREFIX = "/neoserve.v1."
MESSAGE = ("request: the message could not be parsed (truncated, not protobuf, or a string field that is not "
           "valid UTF-8); send a well-formed {name}")


class _Undecodable:
    pass


def _safe(deserializer):
    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - any parse failure is the client's malformed request
            return _Undecodable()
    return parse


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(PUBLIC_PREFIX) or handler.request_deserializer is None:
            return handler
        message = MESSAGE.format(name=method.rsplit("/", 1)[-1] + "Request")
        deserializer = _safe(handler.request_deserializer)
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
                return await inner_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=deserializer,
                                                       response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
                async for response in inner_stream(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=deserializer,
                                                        response_serializer=handler.response_serializer)
        return handler
