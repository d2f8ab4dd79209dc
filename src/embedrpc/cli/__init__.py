"""The `embedrpc` command: serve, embed, rerank, tokenize, info, bench.

Every flag can also be set by an environment variable EMBEDRPC_<FLAG>
(e.g. EMBEDRPC_MODEL, EMBEDRPC_MAX_BATCH_TOKENS), and every serve flag in a
TOML file named by `serve --config FILE` (keys are flag names). Precedence:
command line > environment > config file > built-in default. This is the only
place that parses flags, environment or config files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from embedrpc import __version__

from .client_commands import (
    client_options,
    model_option,
    request_options,
    rerank_options,
    run_client,
)
from .options import ConfigFile, EnvParser, config_path, load_config, parse_bool
from .serve import add_serve_parser, run_serve

__all__ = ["build_parser", "main", "parse_args", "parse_bool"]


def build_parser(config: ConfigFile | None = None) -> argparse.ArgumentParser:
    parser = EnvParser(prog="embedrpc", description="gRPC inference server for text "
                        "embeddings. Every flag also reads EMBEDRPC_<FLAG> from the environment.")
    parser.add_argument("--version", action="version", version=f"embedrpc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=EnvParser)
    serve = add_serve_parser(sub, config)

    embed = sub.add_parser("embed", help="embed texts with a running server; prints JSON")
    client_options(embed)
    request_options(embed)
    embed.add_option("--dimensions", type=int, default=0, help="Matryoshka size (0: full)")
    embed.add_option("--normalize", type=parse_bool, default=True, help="L2-normalise vectors")
    embed.add_option("--encoding", default="float32",
                     choices=("float", "float32", "float16", "ubinary"), help="wire encoding")

    rerank = sub.add_parser("rerank", help="score documents against a query with a "
                            "running server's reranker, best first; prints JSON")
    client_options(rerank)
    rerank_options(rerank)

    tok = sub.add_parser("tokenize", help="token ids the model would see; prints JSON")
    client_options(tok)
    request_options(tok)

    info = sub.add_parser("info", help="what a running server serves; prints JSON")
    client_options(info)
    model_option(info, "the model to describe (default: the server's first)")

    from embedrpc.client.health import add_health_arguments

    health = sub.add_parser("health", help="a server's gRPC health status; exit 0 when "
                            "SERVING (for container health checks)")
    client_options(health)
    add_health_arguments(health)

    from embedrpc.client.bench.options import add_bench_arguments

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
        return run_serve(ns)
    if ns.command == "bench":
        from embedrpc.client.bench.runner import run_bench

        return run_bench(ns)
    if ns.command == "health":
        from embedrpc.client.health import run_health

        return run_health(ns)
    if ns.command == "prepare":
        from embedrpc.prepare import run_prepare

        return run_prepare(ns)
    return run_client(ns)


if __name__ == "__main__":
    sys.exit(main())
