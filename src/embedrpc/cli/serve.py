"""`embedrpc serve`: its options (every field of embedrpc.server.config.ServeConfig)
and running it."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .options import ConfigFile, EnvParser, add_config_options, config_from_namespace


def add_serve_parser(sub: Any, config: ConfigFile | None = None) -> EnvParser:
    from embedrpc.server.config import ServeConfig

    p: EnvParser = sub.add_parser(
        "serve", help="run the gRPC server", config=config,
        description="Serve embedding models and rerankers over gRPC (Embedder, Reranker, "
        "health, reflection). "
        "Each option also reads EMBEDRPC_<OPTION> from the environment and <option> from "
        "the --config file; the command line wins over the environment, which wins over "
        "the file.")
    p.add_option("--config", help="TOML file of serve options, keys named like the flags "
                 "(e.g. max-batch-tokens = 16384)")
    add_config_options(p, ServeConfig)
    return p


def run_serve(ns: argparse.Namespace) -> int:
    import asyncio
    import os
    import signal

    from embedrpc.server.config import ServeConfig
    from embedrpc.server.errors import ModelError
    from embedrpc.server.logs import configure_logging

    # gRPC core's own log lines (one per failed TLS handshake, per GOAWAY, ...) bypass the
    # server's logging and its once-a-second repeat filter: only its errors, unless the
    # operator asks for more (GRPC_VERBOSITY=INFO/DEBUG).
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # A SIGHUP (reload) before the server can reload must not end it, nor the worker
    # and front-end processes it starts meanwhile (they inherit the disposition).
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        config = config_from_namespace(ServeConfig, ns)
        configure_logging(config.logging.log_level, config.logging.log_format)
        from embedrpc.server.signals import serve

        asyncio.run(serve(config))
    except (ModelError, ValueError) as exc:
        print(f"embedrpc serve: {exc}", file=sys.stderr)
        return 2
    return 0
