"""embedrpc.server: the gRPC Embedder service, its router and worker processes.

Request path: service.py → tokenizer.py → router.py → workers.py → worker.py.
"""

from .app import EmbedServer, ServeConfig, serve

__all__ = ["EmbedServer", "ServeConfig", "serve"]
