"""Classifies the exceptions raised while serving a request, by the one table in neoserve/error_status.py.

`classify` turns an exception into a transport-neutral `Failure`: its `Status` (gRPC code and HTTP status; the
metrics label failures with the gRPC code whichever transport served the call) and the message, field and retry
hint. `status_for` renders a Failure for gRPC; gateway/openai_protocol.py renders it as an OpenAI-style HTTP error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from neoserve.error_status import INTERNAL, Status, status_of
from neoserve.errors import AuthenticationError, BackendUnavailableError, CapacityError, DeadlineError, ValidationError

log = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-ms"


class DrainingError(BackendUnavailableError):
    """The gateway is shutting down and admits no new request."""


class NotReadyError(BackendUnavailableError):
    """The gateway has not loaded its tokenizer or reached the worker yet."""


__all__ = ["AuthenticationError", "DeadlineError", "DrainingError", "NotReadyError", "Failure", "classify",
           "status_for", "abort_with"]  # NOTE: the first two are re-exported: callers import them from here


# Messages of exceptions raised without one.
_DEFAULT_MESSAGE = {
    grpc.StatusCode.UNAVAILABLE: "backend unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline exceeded",
    grpc.StatusCode.UNAUTHENTICATED: "missing or invalid API key",
}


@dataclass(frozen=True)
class Failure:
    """What went wrong, independent of the transport that reports it."""

    status: Status
    message: str  # for people; without the field name
    field: str | None = None  # the request field at fault (INVALID_ARGUMENT)
    retry_after_s: float | None = None  # when to retry (RESOURCE_EXHAUSTED)

    @property
    def code(self) -> grpc.StatusCode:
        return self.status.grpc_code

    @property
    def details(self) -> str:
        """The message with the field in front ("top_p: must be in (0, 1]"), as gRPC clients get it."""
        return f"{self.field}: {self.message}" if self.field else self.message

    @property
    def retry_after_ms(self) -> int | None:
        return None if self.retry_after_s is None else max(1, round(self.retry_after_s * 1000))


def classify(exc: BaseException) -> Failure:
    """The Failure an exception stands for. Pure: logging an internal error is the caller's job (log_if_internal)."""
    status = status_of(exc)
    if status is INTERNAL:
        return Failure(status, f"internal error: {type(exc).__name__}: {exc}")
    if isinstance(exc, ValidationError):
        return Failure(status, exc.message, field=exc.field)
    if isinstance(exc, CapacityError):
        return Failure(status, str(exc), retry_after_s=exc.retry_after_s)
    return Failure(status, str(exc) or _DEFAULT_MESSAGE.get(status.grpc_code, status.grpc_code.name.lower()))


def log_if_internal(failure: Failure, exc: BaseException) -> None:
    if failure.code == grpc.StatusCode.INTERNAL:
        log.error("internal error while serving a request", exc_info=exc)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(code, details, trailing metadata) for an exception raised while serving a call."""
    failure = classify(exc)
    log_if_internal(failure, exc)
    if failure.retry_after_ms is not None:
        retry_ms = str(failure.retry_after_ms)
        return failure.code, f"{failure.details} (retry after {retry_ms} ms)", ((RETRY_AFTER_KEY, retry_ms),)
    return failure.code, failure.details, ()


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Ends the call with the status for `exc`. Never returns (context.abort raises)."""
    code, details, trailing = status_for(exc)
    if trailing:
        context.set_trailing_metadata(trailing)
    await context.abort(code, details)
