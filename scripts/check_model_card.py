"""The Qwen3-Embedding model card's own example, served by embedrpc, against its numbers.

    python scripts/check_model_card.py --model /models/Qwen3-Embedding-0.6B
    python scripts/check_model_card.py --model Qwen/Qwen3-Embedding-0.6B      # hub id
    python scripts/check_model_card.py --target localhost:50051                # a running server

Embeds the card's two queries (with the model's `query` prompt) and two documents,
prints the 2 × 2 cosine similarity matrix beside the one the card publishes for
sentence-transformers, and exits 1 when any entry is off by more than --tolerance
(0.002). With --model it starts a server in this process (any layout `embedrpc serve`
takes: a checkpoint is prepared into the cache first, fp32 on the CPU); with --target
it asks a running one. The published matrices are picked by the served model's
dimensions (1024: 0.6B, 2560: 4B, 4096: 8B); --expect gives another.

This needs the real weights, which cannot be downloaded where embedrpc is built; run
it on a machine with the hub (or a local copy of the model) and report the table.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

QUERIES = ["What is the capital of China?", "Explain gravity"]
DOCUMENTS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other. It gives weight to "
    "physical objects and is responsible for the movement of planets around the sun.",
]
# model.similarity(query_embeddings, document_embeddings) as each model card prints it.
PUBLISHED = {
    1024: ("Qwen3-Embedding-0.6B", [[0.7646, 0.1414], [0.1355, 0.6000]]),
    2560: ("Qwen3-Embedding-4B", [[0.7534, 0.1147], [0.0320, 0.6258]]),
    4096: ("Qwen3-Embedding-8B", [[0.7493, 0.0751], [0.0880, 0.6318]]),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="what `embedrpc serve --model` takes")
    where.add_argument("--target", help="a running server, HOST:PORT")
    parser.add_argument("--device", default="cpu", help="with --model (default cpu)")
    parser.add_argument("--precision", default="auto", help="with --model, for a checkpoint")
    parser.add_argument("--cache-dir", help="with --model: where a checkpoint is prepared")
    parser.add_argument("--document", action="append", dest="documents",
                        help="replace the card's documents (give two)")
    parser.add_argument("--expect", type=float, nargs=4, metavar="X",
                        help="the expected matrix, row by row (default: the card's)")
    parser.add_argument("--tolerance", type=float, default=0.002)
    return parser.parse_args(argv)


@contextmanager
def server_for(ns: argparse.Namespace) -> Iterator[str]:
    """A target: the given one, or a server started here on a free loopback port."""
    if ns.target:
        yield ns.target
        return
    from embedrpc.server import EmbedServer, ServeConfig
    from embedrpc.server.logs import configure_logging

    configure_logging("INFO", "text")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = EmbedServer(ServeConfig.of(model=ns.model, device=ns.device, precision=ns.precision,
                                     cache_dir=ns.cache_dir, host="127.0.0.1", port=0))
    try:
        port = asyncio.run_coroutine_threadsafe(server.start(), loop).result()
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def main(argv: Sequence[str] | None = None) -> int:
    from embedrpc.client import EmbedClient

    ns = parse_args(argv)
    documents = ns.documents or DOCUMENTS
    if len(documents) != 2:
        print("give exactly two --document", file=sys.stderr)
        return 2
    with server_for(ns) as target, EmbedClient(target, timeout=600) as client:
        info = client.info()
        queries = client.embed(QUERIES, prompt_name="query")
        docs = client.embed(documents)
    similarity = (queries @ docs.T).astype(np.float64)  # unit vectors: cosine
    if ns.expect:
        name, expected = "--expect", [ns.expect[:2], ns.expect[2:]]
    elif info.dimensions in PUBLISHED:
        name, expected = PUBLISHED[info.dimensions]
    else:
        print(f"no published matrix for a {info.dimensions}-dimensional model; give --expect",
              file=sys.stderr)
        return 2
    expected_array = np.asarray(expected, dtype=np.float64)
    worst = float(np.abs(similarity - expected_array).max())
    print(f"model {info.model} ({info.dimensions} dimensions, {info.precision}, pooled token "
          f"{info.pooled_token!r} appended by the {info.pooled_token_source}); "
          f"expected: {name}")
    print(f"{'':10s} {'document 1':>22s} {'document 2':>22s}")
    for i, label in enumerate(("query 1", "query 2")):
        cells = [f"{similarity[i, j]:.4f} (card {expected_array[i, j]:.4f})" for j in range(2)]
        print(f"{label:10s} {cells[0]:>22s} {cells[1]:>22s}")
    ok = worst <= ns.tolerance
    print(f"largest difference {worst:.4f}: {'OK' if ok else 'FAIL'} (tolerance "
          f"{ns.tolerance})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
