"""The one place that turns exceptions into gRPC status codes for the public API.

Every servicer method catches what it raised and hands it here, so clients see the same code for the same cause
whichever RPC they called (see the table at the top of protos/neoserve/v1/inference_service.proto).
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from neoserve.errors import BackendUnavailableError, CapacityError, ValidationError

log = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-ms"


class DrainingError(BackendUnavailableError):
    """The gateway is shutting down and admits no new request."""


class NotReadyError(BackendUnavailableError):
    """The gateway has not loaded its tokenizer or reached the worker yet."""


class AuthenticationError(Exception):
    """Missing or wrong API key."""


class DeadlineError(Exception):
    """The call's deadline passed while the gateway was still working on it."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(code, details, trailing metadata) for an exception raised while serving a call."""
    if isinstance(exc, ValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"{exc.field}: {exc.message}", ()
    if isinstance(exc, CapacityError):
        retry_ms = str(max(1, round(exc.retry_after_s * 1000)))
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc} (retry after {retry_ms} ms)", ((RETRY_AFTER_KEY, retry_ms),)
    if isinstance(exc, BackendUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, str(exc) or "backend unavailable", ()
    if isinstance(exc, (DeadlineError, asyncio.TimeoutError, TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded", ()
    if isinstance(exc, AuthenticationError):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc) or "missing or invalid API key", ()
    log.exception("internal error while serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", ()


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Ends the call with the status for `exc`. Never returns (context.abort raises)."""
    code, details, trailing = status_for(exc)
    if trailing:
        context.set_trailing_metadata(trailing)
    await context.abort(code, details)
