"""The `embedrpc` command: serve, embed, tokenize, info, bench.

Every flag can also be set by an environment variable EMBEDRPC_<FLAG>
(e.g. EMBEDRPC_MODEL, EMBEDRPC_MAX_BATCH_TOKENS), and every serve flag in a
TOML file named by `serve --config FILE` (keys are flag names). Precedence:
command line > environment > config file > built-in default. This is the only
place that parses flags, environment or config files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from embedrpc import __version__

from .options import (
    ConfigFile,
    EnvParser,
    ExtendKeys,
    config_path,
    key_list,
    load_config,
    parse_bool,
)

__all__ = ["build_parser", "main", "parse_args", "parse_bool"]


def _serve_parser(sub: Any, config: ConfigFile | None = None) -> EnvParser:
    p: EnvParser = sub.add_parser(
        "serve", help="run the gRPC server", config=config,
        description="Serve an embedding model over gRPC (Embedder, health, reflection). "
        "Each option also reads EMBEDRPC_<OPTION> from the environment and <option> from "
        "the --config file; the command line wins over the environment, which wins over "
        "the file.")
    p.add_option("--config", help="TOML file of serve options, keys named like the flags "
                 "(e.g. max-batch-tokens = 16384)")
    p.add_option("--model", default="demo",
                 help="'demo' (bundled tiny model), a model directory, or a Hugging Face id")
    p.add_option("--onnx-file", help="ONNX file name in the model directory (model.onnx)")
    p.add_option("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16", "int8"),
                 help="for a checkpoint (safetensors, no ONNX graph): the precision it is "
                      "prepared in on first start (auto: fp16 on a GPU, fp32 on the CPU); "
                      "ignored for ONNX directories")
    p.add_option("--cache-dir", help="where prepared checkpoints are kept and found again "
                 "(default: $XDG_CACHE_HOME/embedrpc or ~/.cache/embedrpc)")
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
    p.add_option("--cuda-graphs", type=parse_bool, nargs="?", const=True, default=False,
                 help="replay short batches as CUDA graphs: batches are padded up to "
                      "(rows, length) buckets, each captured once and checked against the "
                      "ordinary path on first use. Needs a prepared model (embedrpc "
                      "prepare) and a CUDA device")
    p.add_option("--cuda-graph-max-tokens", type=int, default=4096,
                 help="with --cuda-graphs: batches of up to this many padded tokens are "
                      "replayed; larger ones run with their exact shape")
    p.add_option("--attention-kernel", default="auto",
                 help="CUDA: the attention kernels ONNX Runtime may use (its sdpa_kernel "
                      "option): auto (its choice), or flash, efficient, cudnn, math, several "
                      "joined by commas")
    p.add_option("--backend", default="onnx", choices=("onnx", "fake"),
                 help="'fake' returns deterministic vectors without running the model "
                      "(for testing clients and load balancers)")
    p.add_option("--fake-delay-ms", type=float, default=0.0,
                 help="with --backend fake: simulated inference time per batch")
    p.add_option("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    p.add_option("--log-format", default="text", choices=("text", "json"),
                 help="'json': one JSON object per line (ts, level, logger, message, "
                      "request_id)")
    p.add_option("--metrics-port", type=int, default=0,
                 help="serve Prometheus metrics at /metrics on this port (0: off)")
    p.add_option("--metrics-host", help="address for --metrics-port (default: --host)")
    p.add_option("--http-port", type=int, default=0,
                 help="serve the OpenAI-compatible HTTP API (POST /v1/embeddings, "
                      "GET /v1/models, GET /health) on this port (0: off)")
    p.add_option("--tls-cert", help="PEM certificate (chain) of the server: the port speaks "
                 "TLS only (needs --tls-key)")
    p.add_option("--tls-key", help="PEM private key (unencrypted) of --tls-cert")
    p.add_option("--tls-client-ca", help="PEM CA certificate(s): mutual TLS, every client "
                 "must present a certificate signed by one (health included)")
    p.add_option("--api-key", type=key_list, action=ExtendKeys, default=[], secret=True,
                 help="require the metadata 'authorization: Bearer KEY' on every call; "
                      "repeat or comma-separate for several keys. Flags show in ps: prefer "
                      "the environment variable or --api-keys-file")
    p.add_option("--api-keys-file", help="file of API keys, one per line ('#' starts a "
                 "comment line); read at start and on SIGHUP (with the TLS files), added "
                 "to --api-key")
    p.add_option("--auth-health", type=parse_bool, nargs="?", const=True, default=False,
                 help="health checks need an API key too (by default they stay open "
                      "for probes and load balancers)")
    p.add_option("--auth-reflection", type=parse_bool, nargs="?", const=True, default=False,
                 help="server reflection needs an API key too (by default it stays open)")
    return p


def _client_options(p: EnvParser) -> None:
    p.add_option("--target", default="localhost:50051", help="server address HOST:PORT")
    p.add_option("--timeout", type=float, default=60.0, help="seconds before giving up")
    p.add_option("--api-key", secret=True, help="API key, sent as 'authorization: Bearer KEY'")
    # A value is required (--tls true): a bare flag would swallow the first text.
    p.add_option("--tls", type=parse_bool, default=False,
                 help="true: connect with TLS, trusting the system's root certificates")
    p.add_option("--tls-ca", help="PEM CA certificate(s) to trust (implies --tls)")
    p.add_option("--tls-cert", dest="client_tls_cert",
                 help="PEM client certificate, for mutual TLS (with --tls-key; implies --tls)")
    p.add_option("--tls-key", dest="client_tls_key",
                 help="PEM private key of --tls-cert")


def _request_options(p: EnvParser) -> None:
    p.add_argument("texts", nargs="*", help="texts (none or '-': one per line from stdin)")
    p.add_option("--prompt-name", default="", help="a named prompt of the model, e.g. query")
    p.add_option("--instruction", default="", help="a task instruction for queries")
    p.add_option("--truncate", default="end", choices=("end", "start", "none"),
                 help="how to cut inputs longer than max_length")


def build_parser(config: ConfigFile | None = None) -> argparse.ArgumentParser:
    parser = EnvParser(prog="embedrpc", description="gRPC inference server for text "
                        "embeddings. Every flag also reads EMBEDRPC_<FLAG> from the environment.")
    parser.add_argument("--version", action="version", version=f"embedrpc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=EnvParser)
    serve = _serve_parser(sub, config)

    embed = sub.add_parser("embed", help="embed texts with a running server; prints JSON")
    _client_options(embed)
    _request_options(embed)
    embed.add_option("--dimensions", type=int, default=0, help="Matryoshka size (0: full)")
    embed.add_option("--normalize", type=parse_bool, default=True, help="L2-normalise vectors")
    embed.add_option("--encoding", default="float32",
                     choices=("float", "float32", "float16", "ubinary"), help="wire encoding")

    tok = sub.add_parser("tokenize", help="token ids the model would see; prints JSON")
    _client_options(tok)
    _request_options(tok)

    info = sub.add_parser("info", help="what a running server serves; prints JSON")
    _client_options(info)

    from embedrpc.client.health import add_health_arguments

    health = sub.add_parser("health", help="a server's gRPC health status; exit 0 when "
                            "SERVING (for container health checks)")
    _client_options(health)
    add_health_arguments(health)

    from embedrpc.client.bench import add_bench_arguments

    add_bench_arguments(sub.add_parser(
        "bench", help="load-test a running server; prints a report",
        description="Load-test an embedrpc server: closed loop (--concurrency) or open loop "
                    "(--rate), unary Embed or EmbedStream; reports throughput, latency "
                    "percentiles and errors."))

    from embedrpc.prepare import add_prepare_parser

    add_prepare_parser(sub)
    if serve.config.values:  # keys no option took
        serve.error(f"{serve.config.name}: unknown option(s) "
                    f"{', '.join(sorted(k.replace('_', '-') for k in serve.config.values))}; "
                    "the keys are the long flag names of 'embedrpc serve'")
    return parser


def _texts(given: Sequence[str]) -> list[str]:
    if not given or list(given) == ["-"]:
        return [line.rstrip("\n") for line in sys.stdin]
    return list(given)


def _run_serve(ns: argparse.Namespace) -> int:
    import asyncio

    from embedrpc.server import ServeConfig, serve
    from embedrpc.server.errors import ModelError
    from embedrpc.server.logs import configure_logging

    try:
        configure_logging(ns.log_level, ns.log_format)
        config = ServeConfig(
            model=ns.model, onnx_file=ns.onnx_file, precision=ns.precision,
            cache_dir=ns.cache_dir, device=ns.device, workers=ns.workers,
            host=ns.host, port=ns.port, max_length=ns.max_length,
            max_batch_tokens=ns.max_batch_tokens, max_batch_size=ns.max_batch_size,
            max_wait_ms=ns.max_wait_ms, batch_overhead_tokens=ns.batch_overhead_tokens,
            max_queue_tokens=ns.max_queue_tokens,
            max_inputs=ns.max_inputs, max_message_bytes=ns.max_message_bytes,
            grace_seconds=ns.grace_seconds, backend=ns.backend,
            cuda_graphs=ns.cuda_graphs, cuda_graph_max_tokens=ns.cuda_graph_max_tokens,
            attention_kernel=ns.attention_kernel,
            fake_delay_ms=ns.fake_delay_ms, log_level=ns.log_level.upper(),
            log_format=ns.log_format, metrics_port=ns.metrics_port or None,
            metrics_host=ns.metrics_host, http_port=ns.http_port or None,
            tls_cert=ns.tls_cert or None, tls_key=ns.tls_key or None,
            tls_client_ca=ns.tls_client_ca or None, api_keys=tuple(ns.api_key),
            api_keys_file=ns.api_keys_file or None, auth_health=ns.auth_health,
            auth_reflection=ns.auth_reflection,
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
        if ns.api_key and "," in ns.api_key:
            raise ValueError("--api-key: give one key, not a comma-separated list")
        with EmbedClient(ns.target, timeout=ns.timeout, api_key=ns.api_key or None,
                         tls=ns.tls, root_certificates=ns.tls_ca or None,
                         client_cert=ns.client_tls_cert or None,
                         client_key=ns.client_tls_key or None) as client:
            if ns.command == "info":
                r = client.info()
                out: dict[str, Any] = {
                    "model": r.model, "dimensions": r.dimensions,
                    "min_dimensions": r.min_dimensions, "max_length": r.max_length,
                    "prompt_names": list(r.prompt_names), "pooling": r.pooling,
                    "pooled_token": r.pooled_token, "pooled_token_id": r.pooled_token_id,
                    "pooled_token_source": r.pooled_token_source,
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
    except ValueError as exc:
        print(f"embedrpc {ns.command}: {exc}", file=sys.stderr)
        return 2
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Flags, then environment, then the serve --config file; exits 2 on a bad value."""
    config = None
    if path := config_path(argv):
        try:
            config = load_config(path)
        except ValueError as exc:
            print(f"embedrpc serve: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from exc
    return build_parser(config).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(list(sys.argv[1:] if argv is None else argv))
    if ns.command == "serve":
        return _run_serve(ns)
    if ns.command == "bench":
        from embedrpc.client.bench import run_bench

        return run_bench(ns)
    if ns.command == "health":
        from embedrpc.client.health import run_health

        return run_health(ns)
    if ns.command == "prepare":
        from embedrpc.prepare import run_prepare

        return run_prepare(ns)
    return _run_client(ns)


if __name__ == "__main__":
    sys.exit(main())
