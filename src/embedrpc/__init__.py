"""embedrpc: a gRPC inference server for text embeddings."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("embedrpc")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
