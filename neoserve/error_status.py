"""The one table from exceptions to the status a client sees: the gRPC code and the HTTP status.

Every transport looks an exception up here: the gateway's public gRPC API (gateway/status.py), its OpenAI HTTP API
(gateway/openai_protocol.py) and the sidecar's control service (cpu_attn/server.py). So one cause gets one status
whichever API reports it (see the table at the top of protos/neoserve/v1/inference_service.proto). The first row
whose type the exception is an instance of wins, so subclasses come before their base classes; anything not in the
table is an internal error.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from neoserve.errors import (AuthenticationError, BackendUnavailableError, CapacityError, DeadlineError,
                             FailedPreconditionError, ModelNotFoundError, RequestTooLargeError, ValidationError)


@dataclass(frozen=True)
class Status:
    grpc_code: grpc.StatusCode
    http_status: int
    http_type: str  # the "type" of an OpenAI-style error body
    http_code: str | None = None  # the "code" of an OpenAI-style error body


INTERNAL = Status(grpc.StatusCode.INTERNAL, 500, "server_error")

TABLE: tuple[tuple[type[BaseException], Status], ...] = (
    # NOTE: before ValidationError, its base class. gRPC requests name no model, so only HTTP sees this one.
    (ModelNotFoundError, Status(grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error", "model_not_found")),
    (ValidationError, Status(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error")),
    (AuthenticationError, Status(grpc.StatusCode.UNAUTHENTICATED, 401, "invalid_request_error", "invalid_api_key")),
    # NOTE: OpenAI's own 429 bodies name the kind of limit as the type ("requests", "tokens"); ours is requests.
    (CapacityError, Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "requests", "rate_limit_exceeded")),
    # NOTE: gRPC answers a message past its receive limit with RESOURCE_EXHAUSTED too.
    (RequestTooLargeError, Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 413, "invalid_request_error")),
    (FailedPreconditionError, Status(grpc.StatusCode.FAILED_PRECONDITION, 409, "invalid_request_error")),
    (BackendUnavailableError, Status(grpc.StatusCode.UNAVAILABLE, 503, "server_error", "service_unavailable")),
    # NOTE: asyncio.TimeoutError is TimeoutError since Python 3.11.
    (DeadlineError, Status(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error", "timeout")),
    (TimeoutError, Status(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error", "timeout")),
)


def status_of(exc: BaseException) -> Status:
    """The status an exception raised while serving a call is reported with."""
    for exc_type, status in TABLE:
        if isinstance(exc, exc_type):
            return status
    return INTERNAL
