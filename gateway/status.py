"""The one place that classifies the exceptions raised while serving a request.

`classify` turns an exception into a transport-neutral `Failure` (a gRPC status code is the neutral vocabulary:
the metrics label failures with it whichever transport served the call). `status_for` renders a Failure for gRPC;
gateway/openai_protocol.py renders it as an OpenAI-style HTTP error. So clients see the same outcome for the same
cause whichever API they called (see the table at the top of protos/neoserve/v1/inference_service.proto).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Failure:
    """What went wrong, independent of the transport that reports it."""

    code: grpc.StatusCode
    message: str  # for people; without the field name
    field: str | None = None  # the request field at fault (INVALID_ARGUMENT)
    retry_after_s: float | None = None  # when to retry (RESOURCE_EXHAUSTED)

    @property
    def details(self) -> str:
        """The message with the field in front ("top_p: must be in (0, 1]"), as gRPC clients get it."""
        return f"{self.field}: {self.message}" if self.field else self.message

    @property
    def retry_after_ms(self) -> int | None:
        return None if self.retry_after_s is None else max(1, round(self.retry_after_s * 1000))


def classify(exc: BaseException) -> Failure:
    """The Failure an exception stands for. Pure: logging an internal error is the caller's job (log_if_internal)."""
    if isinstance(exc, ValidationError):
        return Failure(grpc.StatusCode.INVALID_ARGUMENT, exc.message, field=exc.field)
    if isinstance(exc, CapacityError):
        return Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), retry_after_s=exc.retry_after_s)
    if isinstance(exc, BackendUnavailableError):
        return Failure(grpc.StatusCode.UNAVAILABLE, str(exc) or "backend unavailable")
    if isinstance(exc, (DeadlineError, asyncio.TimeoutError, TimeoutError)):
        return Failure(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded")
    if isinstance(exc, AuthenticationError):
        return Failure(grpc.StatusCode.UNAUTHENTICATED, str(exc) or "missing or invalid API key")
    return Failure(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def log_if_internal(failure: Failure, exc: BaseException) -> None:
    if failure.code == grpc.StatusCode.INTERNAL:
        log.error("internal error while serving a request", exc_info=exc)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(code, details, trailing metadata) for an exception raised while serving a call."""
    failure = classify(exc)
    log_if_internal(failure, exc)
    if failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_ms = str(failure.retry_after_ms)
        return failure.code, f"{failure.details} (retry after {retry_ms} ms)", ((RETRY_AFTER_KEY, retry_ms),)
    return failure.code, failure.details, ()


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Ends the call with the status for `exc`. Never returns (context.abort raises)."""
    code, details, trailing = status_for(exc)
    if trailing:
        context.set_trailing_metadata(trailing)
    await context.abort(code, details)
