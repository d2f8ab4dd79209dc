"""embedrpc.server: the gRPC Embedder service, its router and worker processes.

Request path: service.py (gRPC) and http.py (HTTP) → tokenizer.py → router.py →
worker/handle.py → worker/process.py. Options: config.py; assembly and lifecycle:
app.py; `embedrpc serve`: signals.py.

Nothing is imported here eagerly: a worker process imports embedrpc.server.worker
without loading grpc, prometheus or the HTTP server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import EmbedServer
    from .config import ServeConfig
    from .signals import serve

__all__ = ["EmbedServer", "ServeConfig", "serve"]
_WHERE = {"EmbedServer": "app", "ServeConfig": "config", "serve": "signals"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
