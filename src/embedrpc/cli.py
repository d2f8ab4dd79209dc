"""The `embedrpc` command: serve, embed, tokenize, info.

Every flag can also be set by an environment variable EMBEDRPC_<FLAG>
(e.g. EMBEDRPC_MODEL, EMBEDRPC_MAX_BATCH_TOKENS); a flag on the command
line wins. This is the only place that parses flags or environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from embedrpc import __version__

ENV_PREFIX = "EMBEDRPC_"


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _EnvParser(argparse.ArgumentParser):
    """add_option() reads its default from EMBEDRPC_<DEST> and says so in --help."""

    def add_option(self, *flags: str, type: Callable[[str], Any] = str, default: Any = None,
                   help: str = "", **kwargs: Any) -> None:
        dest = kwargs.pop("dest", None) or flags[0].lstrip("-").replace("-", "_")
        env = ENV_PREFIX + dest.upper()
        if env in os.environ:
            try:
                default = type(os.environ[env])
            except (ValueError, argparse.ArgumentTypeError) as exc:
                self.error(f"{env}={os.environ[env]!r}: {exc}")
        shown = "" if default is None else f"default: {default}; "
        self.add_argument(*flags, dest=dest, type=type, default=default,
                          help=f"{help} ({shown}env {env})", **kwargs)


def _serve_parser(sub: Any) -> None:
    p: _EnvParser = sub.add_parser(
        "serve", help="run the gRPC server",
        description="Serve an embedding model over gRPC (Embedder, health, reflection).")
    p.add_option("--model", default="demo",
                 help="'demo' (bundled tiny model), a model directory, or a Hugging Face id")
    p.add_option("--onnx-file", help="ONNX file name in the model directory (model.onnx)")
    p.add_option("--device", default="auto", help="cpu, auto (GPUs if any, else CPU), cuda, "
                 "or cuda:0,1,...")
    p.add_option("--workers", type=int, default=1, help="worker processes per device")
    p.add_option("--host", default="0.0.0.0", help="address to listen on")
    p.add_option("--port", type=int, default=50051, help="port (0: any free port)")
    p.add_option("--max-length", type=int,
                 help="longest input in tokens (default: the model's own limit, capped at 8192)")
    p.add_option("--max-batch-tokens", type=int,
                 help="padded tokens per batch (default: 8192 on CPU, 32768 on GPU, "
                      "at least max-length)")
    p.add_option("--max-batch-size", type=int, default=64, help="texts per batch")
    p.add_option("--max-wait-ms", type=float, default=0.0,
                 help="wait up to this long for a fuller batch while workers are idle")
    p.add_option("--batch-overhead-tokens", type=int,
                 help="a batch's fixed cost in tokens: length-sorted texts are split into "
                      "another batch where padding would cost more (default: 64 on CPU, "
                      "2048 on GPU)")
    p.add_option("--max-queue-tokens", type=int,
                 help="queued tokens beyond which requests get RESOURCE_EXHAUSTED "
                      "(default: 64 batches)")
    p.add_option("--max-inputs", type=int, default=2048, help="texts per request")
    p.add_option("--max-message-bytes", type=int, default=64 << 20,
                 help="largest gRPC message received or sent")
    p.add_option("--grace-seconds", type=float, default=10.0,
                 help="on SIGTERM/SIGINT, time for in-flight calls to finish")
    p.add_option("--backend", default="onnx", choices=("onnx", "fake"),
                 help="'fake' returns deterministic vectors without running the model "
                      "(for testing clients and load balancers)")
    p.add_option("--fake-delay-ms", type=float, default=0.0,
                 help="with --backend fake: simulated inference time per batch")
    p.add_option("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def _client_options(p: _EnvParser) -> None:
    p.add_option("--target", default="localhost:50051", help="server address HOST:PORT")
    p.add_option("--timeout", type=float, default=60.0, help="seconds before giving up")


def _request_options(p: _EnvParser) -> None:
    p.add_argument("texts", nargs="*", help="texts (none or '-': one per line from stdin)")
    p.add_option("--prompt-name", default="", help="a named prompt of the model, e.g. query")
    p.add_option("--instruction", default="", help="a task instruction for queries")
    p.add_option("--truncate", default="end", choices=("end", "start", "none"),
                 help="how to cut inputs longer than max_length")


def build_parser() -> argparse.ArgumentParser:
    parser = _EnvParser(prog="embedrpc", description="gRPC inference server for text "
                        "embeddings. Every flag also reads EMBEDRPC_<FLAG> from the environment.")
    parser.add_argument("--version", action="version", version=f"embedrpc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_EnvParser)
    _serve_parser(sub)

    embed = sub.add_parser("embed", help="embed texts with a running server; prints JSON")
    _client_options(embed)
    _request_options(embed)
    embed.add_option("--dimensions", type=int, default=0, help="Matryoshka size (0: full)")
    embed.add_option("--normalize", type=_bool, default=True, help="L2-normalise vectors")
    embed.add_option("--encoding", default="float32",
                     choices=("float", "float32", "float16", "ubinary"), help="wire encoding")

    tok = sub.add_parser("tokenize", help="token ids the model would see; prints JSON")
    _client_options(tok)
    _request_options(tok)

    info = sub.add_parser("info", help="what a running server serves; prints JSON")
    _client_options(info)
    return parser


def _texts(given: Sequence[str]) -> list[str]:
    if not given or list(given) == ["-"]:
        return [line.rstrip("\n") for line in sys.stdin]
    return list(given)


def _run_serve(ns: argparse.Namespace) -> int:
    import asyncio

    from embedrpc.server import ServeConfig, serve
    from embedrpc.server.errors import ModelError

    logging.basicConfig(level=ns.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = ServeConfig(
            model=ns.model, onnx_file=ns.onnx_file, device=ns.device, workers=ns.workers,
            host=ns.host, port=ns.port, max_length=ns.max_length,
            max_batch_tokens=ns.max_batch_tokens, max_batch_size=ns.max_batch_size,
            max_wait_ms=ns.max_wait_ms, batch_overhead_tokens=ns.batch_overhead_tokens,
            max_queue_tokens=ns.max_queue_tokens,
            max_inputs=ns.max_inputs, max_message_bytes=ns.max_message_bytes,
            grace_seconds=ns.grace_seconds, backend=ns.backend,
            fake_delay_ms=ns.fake_delay_ms, log_level=ns.log_level.upper(),
        )
        asyncio.run(serve(config))
    except (ModelError, ValueError) as exc:
        print(f"embedrpc serve: {exc}", file=sys.stderr)
        return 2
    return 0


def _run_client(ns: argparse.Namespace) -> int:
    import grpc

    from embedrpc.client import EmbedClient

    try:
        with EmbedClient(ns.target, timeout=ns.timeout) as client:
            if ns.command == "info":
                r = client.info()
                out: dict[str, Any] = {
                    "model": r.model, "dimensions": r.dimensions,
                    "min_dimensions": r.min_dimensions, "max_length": r.max_length,
                    "prompt_names": list(r.prompt_names), "pooling": r.pooling,
                    "precision": r.precision, "devices": list(r.devices),
                    "max_batch_tokens": r.max_batch_tokens, "max_inputs": r.max_inputs,
                    "workers": r.workers, "version": r.version,
                }
            elif ns.command == "tokenize":
                t = client.tokenize(_texts(ns.texts), prompt_name=ns.prompt_name,
                                    instruction=ns.instruction, truncate=ns.truncate,
                                    return_tokens=True)
                out = {"inputs": [{"ids": list(i.ids), "tokens": list(i.tokens),
                                   "truncated": i.truncated} for i in t.inputs],
                       "usage": {"prompt_tokens": t.usage.prompt_tokens,
                                 "truncated_inputs": t.usage.truncated_inputs}}
            else:
                from embedrpc.client import decode

                response = client.embed_response(
                    _texts(ns.texts), prompt_name=ns.prompt_name, instruction=ns.instruction,
                    dimensions=ns.dimensions, normalize=ns.normalize, truncate=ns.truncate,
                    encoding=ns.encoding)
                out = {"dimensions": response.dimensions, "encoding": ns.encoding,
                       "embeddings": decode(response).tolist(),
                       "usage": {"prompt_tokens": response.usage.prompt_tokens,
                                 "truncated_inputs": response.usage.truncated_inputs}}
    except grpc.RpcError as exc:
        print(f"embedrpc {ns.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "serve":
        return _run_serve(ns)
    return _run_client(ns)


if __name__ == "__main__":
    sys.exit(main())
