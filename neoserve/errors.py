"""Typed errors shared by every process. neoserve/error_status.py maps each to its gRPC and HTTP status."""

from __future__ import annotations


class NeoServeError(Exception):
    """Base class of all errors this project raises on purpose."""


class ValidationError(NeoServeError, ValueError):
    """A request field is invalid. `field` names it so the client knows what to change."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelNotFoundError(ValidationError):
    """The request names a model this server does not serve."""

    def __init__(self, name: str):
        super().__init__("model", f"the model '{name}' does not exist")


class CapacityError(NeoServeError):
    """The server is full (queue bound reached). Retry later."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTooLargeError(NeoServeError):
    """A request is larger than the server accepts. The message says the limit and the flag that sets it."""


class ModelLoadError(NeoServeError):
    """A model could not be loaded. The message names the file and the field at fault."""


class BackendUnavailableError(NeoServeError):
    """A process this request depends on (worker, sidecar) is gone."""


class FailedPreconditionError(NeoServeError):
    """The call is valid but not in the current state (e.g. reconfigure while sequences exist)."""


class AuthenticationError(NeoServeError):
    """Missing or wrong API key."""


class DeadlineError(NeoServeError):
    """The call's deadline passed while the server was still working on it."""
