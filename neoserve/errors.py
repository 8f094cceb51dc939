"""Typed errors shared by every process. The gRPC layers map these to status codes in one place each."""

from __future__ import annotations


class NeoServeError(Exception):
    """Base class of all errors this project raises on purpose."""


class ValidationError(NeoServeError, ValueError):
    """A request field is invalid. `field` names it so the client knows what to change."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class CapacityError(NeoServeError):
    """The server is full (queue bound reached). Retry later."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelLoadError(NeoServeError):
    """A model could not be loaded. The message names the file and the field at fault."""


class BackendUnavailableError(NeoServeError):
    """A process this request depends on (worker, sidecar) is gone."""
