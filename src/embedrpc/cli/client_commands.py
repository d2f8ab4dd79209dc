"""The client commands: `embedrpc embed`, `tokenize`, `info` (and the options `health`
shares). Each prints JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .options import EnvParser, parse_bool


def client_options(p: EnvParser) -> None:
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


def request_options(p: EnvParser) -> None:
    p.add_argument("texts", nargs="*", help="texts (none or '-': one per line from stdin)")
    p.add_option("--prompt-name", default="", help="a named prompt of the model, e.g. query")
    p.add_option("--instruction", default="", help="a task instruction for queries")
    p.add_option("--truncate", default="end", choices=("end", "start", "none"),
                 help="how to cut inputs longer than max_length")


def _texts(given: Sequence[str]) -> list[str]:
    if not given or list(given) == ["-"]:
        return [line.rstrip("\n") for line in sys.stdin]
    return list(given)


def run_client(ns: argparse.Namespace) -> int:
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
