"""embedrpc.client: call an embedrpc server from Python (blocking or asyncio).

The names below load on first use, so importing a submodule (the command line's
options, the load tester's) does not load grpc.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import AsyncEmbedClient, EmbedClient, StreamResult
    from .messages import (
        ENCODINGS,
        TRUNCATES,
        RerankResult,
        decode,
        make_request,
        make_rerank_request,
    )

__all__ = [
    "ENCODINGS",
    "TRUNCATES",
    "AsyncEmbedClient",
    "EmbedClient",
    "RerankResult",
    "StreamResult",
    "decode",
    "make_request",
    "make_rerank_request",
]
_WHERE = {"AsyncEmbedClient": "client", "EmbedClient": "client", "StreamResult": "client",
          "ENCODINGS": "messages", "TRUNCATES": "messages", "decode": "messages",
          "make_request": "messages", "make_rerank_request": "messages",
          "RerankResult": "messages"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
