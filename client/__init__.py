"""embedrpc.client: call an embedrpc server from Python (blocking or asyncio)."""

from .client import (
    ENCODINGS,
    TRUNCATES,
    AsyncEmbedClient,
    EmbedClient,
    StreamResult,
    decode,
    make_request,
)

__all__ = [
    "ENCODINGS",
    "TRUNCATES",
    "AsyncEmbedClient",
    "EmbedClient",
    "StreamResult",
    "decode",
    "make_request",
]
