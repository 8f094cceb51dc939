"""One table (neoserve/error_status.py) decides the status of every typed error, for each transport that reports
one: the gateway's gRPC API, its OpenAI HTTP API and the sidecar's control service."""

from __future__ import annotations

import grpc
import pytest

from gateway.openai_protocol import error_response
from gateway.status import DrainingError, NotReadyError, status_for
from neoserve.error_status import INTERNAL, TABLE, status_of
from neoserve.errors import (AuthenticationError, BackendUnavailableError, CapacityError, DeadlineError,
                             FailedPreconditionError, ModelNotFoundError, RequestTooLargeError, ValidationError)

ERRORS = [ValidationError("top_p", "must be in (0, 1]"), ModelNotFoundError("gpt-4o"), CapacityError("full", 0.5),
          RequestTooLargeError("body: too large"), BackendUnavailableError("worker gone"), DrainingError("bye"),
          NotReadyError("starting"), DeadlineError("late"), TimeoutError(), AuthenticationError("no key"),
          FailedPreconditionError("not configured"), RuntimeError("bug")]


@pytest.mark.parametrize("exc", ERRORS, ids=[type(e).__name__ for e in ERRORS])
def test_both_gateway_apis_report_the_tables_status(exc):
    status = status_of(exc)
    assert status_for(exc)[0] == status.grpc_code
    http_status, body, headers = error_response(exc)
    assert (http_status, body["error"]["type"], body["error"]["code"]) == (
        status.http_status, status.http_type, status.http_code)
    assert ("retry-after-ms" in headers) == isinstance(exc, CapacityError)


def test_table_rows():
    assert status_of(RuntimeError()) is INTERNAL and INTERNAL.http_status == 500
    assert [(status_of(e).grpc_code, status_of(e).http_status) for e in ERRORS[:4]] == [
        (grpc.StatusCode.INVALID_ARGUMENT, 400), (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429), (grpc.StatusCode.RESOURCE_EXHAUSTED, 413)]
    for i, (exc_type, _) in enumerate(TABLE):  # a subclass after its base class would never match
        assert not any(issubclass(exc_type, earlier) for earlier, _ in TABLE[:i]), exc_type


def test_the_sidecar_maps_errors_by_the_table():
    from cpu_attn import server

    assert server.FailedPreconditionError is FailedPreconditionError
    assert "status_of" in vars(server) and not hasattr(server, "_STATUS_OF")
