"""The few error types of embedrpc and their one mapping to gRPC and HTTP status codes.

Each error names its gRPC status code; STATUS says what that code is over HTTP
(status and OpenAI's error type). The gRPC front end aborts with `exc.grpc_code`,
the HTTP one answers `http_status(code)`. grpc itself is imported only when a
gRPC code object is asked for, so worker processes never load it.
"""

from __future__ import annotations

from typing import Any

# gRPC status code name → (HTTP status, OpenAI error type).
STATUS: dict[str, tuple[int, str]] = {
    "OK": (200, ""),
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "server_error"),
    "DEADLINE_EXCEEDED": (504, "server_error"),
    "CANCELLED": (499, "server_error"),
    "INTERNAL": (500, "server_error"),
}


def http_status(code: str) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) of a gRPC status code name."""
    return STATUS.get(code, (500, "server_error"))


class EmbedError(Exception):
    """Base class: an error the client sees with a status code and a message.

    `field`: the request field at fault, by its proto name ("inputs", "dimensions"), so
    a front end can name its own spelling of it (OpenAI's `param`)."""

    code: str = "INTERNAL"  # a grpc.StatusCode name

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    @property
    def grpc_code(self) -> Any:
        import grpc

        return grpc.StatusCode[self.code]


class InvalidInput(EmbedError):
    code = "INVALID_ARGUMENT"


class Overloaded(EmbedError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(EmbedError):
    """No healthy worker, or the server is shutting down."""

    code = "UNAVAILABLE"


class DeadlineExceeded(EmbedError):
    code = "DEADLINE_EXCEEDED"


class Unauthenticated(EmbedError):
    """No API key, or a wrong one (the message never repeats what was sent)."""

    code = "UNAUTHENTICATED"


class TooLarge(EmbedError):
    """A response bigger than the server's --max-message-bytes."""

    code = "RESOURCE_EXHAUSTED"


class WorkerFailed(EmbedError):
    """A worker raised on a batch or died with it (after retries)."""

    code = "INTERNAL"


class ModelError(Exception):
    """A model directory or graph embedrpc cannot serve; raised at start-up."""
