"""The few error types of embedrpc and their one mapping to gRPC status codes."""

from __future__ import annotations

import grpc


class EmbedError(Exception):
    """Base class: an error the client sees with a status code and a message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(EmbedError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Overloaded(EmbedError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(EmbedError):
    """No healthy worker, or the server is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(EmbedError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(EmbedError):
    """No API key, or a wrong one (the message never repeats what was sent)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class TooLarge(EmbedError):
    """A response bigger than the server's --max-message-bytes."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class WorkerFailed(EmbedError):
    """A worker raised on a batch or died with it (after retries)."""

    code = grpc.StatusCode.INTERNAL


class ModelError(Exception):
    """A model directory or graph embedrpc cannot serve; raised at start-up."""
