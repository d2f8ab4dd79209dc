"""The client commands: `embedrpc embed`, `rerank`, `tokenize`, `info` (and the options
`health` shares). Each prints JSON."""

from __future__ import annotations

import argparse
import json
import os
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


def model_option(p: EnvParser, help: str = "which served model (default: the only one "
                 "of its kind)") -> None:
    # Its own variable: EMBEDRPC_MODEL is the server's --model.
    p.add_option("--model", dest="client_model", default="", help=help)


def request_options(p: EnvParser) -> None:
    p.add_argument("texts", nargs="*", help="texts (none or '-': one per line from stdin)")
    p.add_option("--prompt-name", default="", help="a named prompt of the model, e.g. query")
    p.add_option("--instruction", default="", help="a task instruction for queries")
    p.add_option("--truncate", default="end", choices=("end", "start", "none"),
                 help="how to cut inputs longer than max_length")
    model_option(p, "which served embedding model (default: the only one)")


def rerank_options(p: EnvParser) -> None:
    p.add_argument("texts", nargs="*", metavar="DOCUMENT",
                   help="documents (none or '-': one per line from stdin)")
    p.add_option("--query", help="the query the documents are scored against; required")
    p.add_option("--instruction", default="", help="the task instruction in each pair "
                 "(default: the model's, the card's web-search one)")
    p.add_option("--top-n", type=int, default=0, help="return only the best N (0: all)")
    # A value is required (--return-documents true), as for --tls.
    p.add_option("--return-documents", type=parse_bool, default=False, metavar="BOOL",
                 help="true: put each document's text in its result")
    p.add_option("--truncate", default="end", choices=("end", "none"),
                 help="pairs longer than max_length: cut at the end (the model card's) or "
                      "refuse")
    model_option(p, "which served reranker (default: the only one)")


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
                r = client.info(ns.client_model)
                vectors = r.task != "rerank"  # a reranker has no dimensions: null
                out: dict[str, Any] = {
                    "model": r.model, "task": r.task,
                    "dimensions": r.dimensions if vectors else None,
                    "min_dimensions": r.min_dimensions if vectors else None,
                    "max_length": r.max_length,
                    "prompt_names": list(r.prompt_names), "pooling": r.pooling,
                    "pooled_token": r.pooled_token, "pooled_token_id": r.pooled_token_id,
                    "pooled_token_source": r.pooled_token_source,
                    "precision": r.precision, "devices": list(r.devices),
                    "max_batch_tokens": r.max_batch_tokens, "max_inputs": r.max_inputs,
                    "workers": r.workers, "version": r.version,
                    "default_instruction": r.default_instruction,
                    "models": [{"name": m.name, "task": m.task,
                                "dimensions": m.dimensions if m.HasField("dimensions")
                                else None, "max_length": m.max_length,
                                "precision": m.precision} for m in r.models],
                }
            elif ns.command == "rerank":
                if ns.query is None:
                    raise ValueError("--query is required")
                rr = client.rerank_response(
                    ns.query, _texts(ns.texts), instruction=ns.instruction, top_n=ns.top_n,
                    return_documents=ns.return_documents, truncate=ns.truncate,
                    model=ns.client_model)
                out = {"model": rr.model,
                       "results": [{"index": x.index, "score": x.score,
                                    **({"document": x.document} if x.HasField("document")
                                       else {})} for x in rr.results],
                       "usage": {"prompt_tokens": rr.usage.prompt_tokens,
                                 "truncated_inputs": rr.usage.truncated_inputs}}
            elif ns.command == "tokenize":
                t = client.tokenize(_texts(ns.texts), prompt_name=ns.prompt_name,
                                    instruction=ns.instruction, truncate=ns.truncate,
                                    return_tokens=True, model=ns.client_model)
                out = {"inputs": [{"ids": list(i.ids), "tokens": list(i.tokens),
                                   "truncated": i.truncated} for i in t.inputs],
                       "usage": {"prompt_tokens": t.usage.prompt_tokens,
                                 "truncated_inputs": t.usage.truncated_inputs}}
            else:
                from embedrpc.client import decode

                response = client.embed_response(
                    _texts(ns.texts), prompt_name=ns.prompt_name, instruction=ns.instruction,
                    dimensions=ns.dimensions, normalize=ns.normalize, truncate=ns.truncate,
                    encoding=ns.encoding, model=ns.client_model)
                out = {"model": response.model, "dimensions": response.dimensions,
                       "encoding": ns.encoding,
                       "embeddings": decode(response).tolist(),
                       "usage": {"prompt_tokens": response.usage.prompt_tokens,
                                 "truncated_inputs": response.usage.truncated_inputs}}
    except grpc.RpcError as exc:
        print(f"embedrpc {ns.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"embedrpc {ns.command}: {exc}", file=sys.stderr)
        return 2
    try:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `| head` closed the pipe: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0
