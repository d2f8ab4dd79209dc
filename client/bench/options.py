"""What one load test is: `BenchConfig`, the `embedrpc bench` flags that fill it, and
`BenchError`, for a run that cannot go on."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any

from embedrpc.cli.options import parse_bool

from ..credentials import auth_metadata
from ..messages import ENCODINGS
from .texts import DEFAULT_DOC_LENGTHS, DEFAULT_QUERY_LENGTHS, LengthSpec

OPEN_LOOP_IN_FLIGHT = 1000  # default cap on outstanding open-loop requests


class BenchError(Exception):
    """The run cannot go on (target unreachable, server lacks what the workload needs)."""


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """One load test. See `embedrpc bench --help` for each field."""

    target: str = "localhost:50051"
    concurrency: int | None = None  # closed loop: clients (default 8); open: max in flight
    duration: float | None = None  # measured seconds (default 10 unless requests is set)
    requests: int | None = None  # or: measure this many requests
    rate: float | None = None  # open loop: requests/s, Poisson arrivals
    batch: int = 1
    stream: bool = False
    rerank: bool = False  # unary Rerank calls: a query and `documents` documents each
    documents: int = 16
    model: str = ""  # the served model to load (default: the only one of its kind)
    streams: int = 1  # EmbedStream calls per process
    processes: int = 1
    corpus: str | None = None
    lengths: str = DEFAULT_DOC_LENGTHS
    query_lengths: str = DEFAULT_QUERY_LENGTHS
    query_fraction: float = 0.5
    texts: int = 4096
    locales: tuple[str, ...] | None = None
    seed: int = 0
    warmup: float = 1.0
    encoding: str = "float32"
    dimensions: int = 0
    timeout: float = 30.0
    time_limit: float = 600.0
    json_path: str | None = None
    plot_path: str | None = None
    progress: bool = True
    # Connection: API key (never written to the report) and TLS, as for EmbedClient.
    api_key: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return auth_metadata(self.api_key)

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(bool(self.target.strip()), "--target must be HOST:PORT")
        need(self.concurrency is None or self.concurrency >= 1, "--concurrency must be >= 1")
        need(self.duration is None or self.duration > 0, "--duration must be > 0 seconds")
        need(self.requests is None or self.requests >= 1, "--requests must be >= 1")
        need(self.rate is None or (self.rate > 0 and math.isfinite(self.rate)),
             "--rate must be > 0 requests/s")
        need(self.batch >= 1, "--batch must be >= 1 texts per request")
        need(self.streams >= 1, "--streams must be >= 1")
        need(self.processes >= 1, "--processes must be >= 1")
        need(self.processes <= self.in_flight, f"--processes ({self.processes}) must not "
             f"exceed --concurrency ({self.in_flight}): each process needs a client")
        need(self.stream or self.streams == 1, "--streams needs --stream")
        need(self.documents >= 1, "--documents must be >= 1 per query")
        need(not (self.rerank and self.stream), "--rerank sends unary Rerank calls; "
             "--stream is for EmbedStream")
        need(not self.rerank or self.batch == 1, "--batch is texts per Embed; with --rerank, "
             "--documents sets the documents per query")
        need(0.0 <= self.query_fraction <= 1.0, "--query-fraction must be in 0..1")
        need(self.texts >= 1, "--texts must be >= 1")
        need(self.warmup >= 0, "--warmup must be >= 0 seconds")
        need(self.encoding in ENCODINGS, f"--encoding must be one of {', '.join(ENCODINGS)}")
        need(self.dimensions >= 0, "--dimensions must be >= 0 (0: the model's full size)")
        need(self.timeout > 0, "--timeout must be > 0 seconds")
        need(self.time_limit > 0, "--time-limit must be > 0 seconds")
        need(self.warmup + (self.duration or 0) <= self.time_limit,
             f"--warmup + --duration ({self.warmup + (self.duration or 0):g} s) exceeds "
             f"--time-limit ({self.time_limit:g} s)")
        LengthSpec.parse(self.lengths)
        LengthSpec.parse(self.query_lengths)

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    @property
    def in_flight(self) -> int:
        """Closed loop: the number of clients; open loop: the cap on outstanding requests."""
        if self.concurrency is not None:
            return self.concurrency
        return OPEN_LOOP_IN_FLIGHT if self.open_loop else 8

    @property
    def measure_seconds(self) -> float | None:
        """The measured window, or None when the run counts requests instead."""
        if self.duration is not None:
            return self.duration
        return None if self.requests is not None else 10.0


def add_bench_arguments(p: Any) -> None:
    """The `embedrpc bench` flags, on cli.py's parser (each also reads EMBEDRPC_<FLAG>)."""
    opt = p.add_option
    opt("--target", default="localhost:50051",
        help="server address HOST:PORT; several replicas as HOST:PORT,HOST:PORT or "
             "dns:///NAME:PORT (round_robin across them)")
    opt("--concurrency", type=int, help="closed loop: concurrent clients (default 8); "
        f"open loop: most requests in flight (default {OPEN_LOOP_IN_FLIGHT})")
    opt("--duration", type=float, help="measured seconds, after the warm-up (default 10 "
        "unless --requests is given)")
    opt("--requests", type=int, help="measure this many requests instead of a duration")
    opt("--rate", type=float, help="open loop: send this many requests/s (Poisson arrivals); "
        "latency counts from each request's intended send time")
    opt("--batch", type=int, default=1, help="texts per request")
    opt("--rerank", type=parse_bool, default=False, nargs="?", const=True, metavar="BOOL",
        help="load the server's reranker: unary Rerank calls, each a query and --documents "
             "documents (queries as long as --query-lengths, documents as --lengths); "
             "reports pairs/s")
    opt("--documents", type=int, default=16, help="with --rerank: documents per query")
    # Its own variable: EMBEDRPC_MODEL is the server's --model.
    opt("--model", dest="client_model", default="", help="which served model to load "
        "(default: the only embedding model, or with --rerank the only reranker)")
    opt("--stream", type=parse_bool, default=False, nargs="?", const=True, metavar="BOOL",
        help="send requests over EmbedStream instead of unary Embed")
    opt("--streams", type=int, default=1, help="with --stream: EmbedStream calls per process")
    opt("--processes", type=int, default=1, help="load-generating processes (clients and rate "
        "are split between them)")
    opt("--corpus", help="texts: a file with one per line, or JSON Lines with a \"text\" "
        "field (default: generated multilingual text)")
    opt("--lengths", default=DEFAULT_DOC_LENGTHS, help="generated documents' length in words: "
        "fixed:N, uniform:MIN:MAX or lognormal:MEDIAN:SIGMA[:MIN:MAX]")
    opt("--query-lengths", default=DEFAULT_QUERY_LENGTHS,
        help="generated queries' length in words (same forms as --lengths)")
    opt("--query-fraction", type=float, default=0.5,
        help="share of requests sent as queries (prompt_name \"query\"); the rest are documents")
    opt("--texts", type=int, default=4096, help="how many texts to generate")
    opt("--locales", help="comma-separated Faker locales for generated text "
        "(default: 12 languages with Faker, 8 built-in without)")
    opt("--seed", type=int, default=0, help="seed of the generated workload and arrivals")
    opt("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    opt("--encoding", default="float32", choices=tuple(ENCODINGS), help="response encoding")
    opt("--dimensions", type=int, default=0, help="Matryoshka size requested (0: full)")
    opt("--timeout", type=float, default=30.0, help="deadline of each request, seconds")
    opt("--time-limit", type=float, default=600.0,
        help="stop sending after this many seconds whatever else is set")
    opt("--json", help="write the report as JSON to this file")
    opt("--plot", help="write a PNG of latency over time and its distribution "
        "(needs matplotlib: pip install 'embedrpc[bench]')")
    opt("--progress", type=parse_bool, default=True, metavar="BOOL",
        help="print a progress line each second on stderr")
    opt("--api-key", secret=True, help="API key, sent as 'authorization: Bearer KEY'")
    opt("--tls", type=parse_bool, default=False, metavar="BOOL",
        help="true: connect with TLS, trusting the system's root certificates")
    opt("--tls-ca", help="PEM CA certificate(s) to trust (implies --tls)")
    opt("--tls-cert", dest="client_tls_cert",
        help="PEM client certificate, for mutual TLS (with --tls-key; implies --tls)")
    opt("--tls-key", dest="client_tls_key", help="PEM private key of --tls-cert")
    opt("--noop-server", type=int, metavar="PORT", help="instead of a load test: serve a "
        "no-op Embedder on 127.0.0.1:PORT (answers at once with zero vectors) to measure "
        "the harness's own ceiling")
    opt("--noop-dimensions", type=int, default=1024, help="vector size of the no-op server")


def config_from_namespace(ns: argparse.Namespace) -> BenchConfig:
    locales = tuple(x.strip() for x in ns.locales.split(",") if x.strip()) if ns.locales \
        else None
    return BenchConfig(
        target=ns.target, concurrency=ns.concurrency, duration=ns.duration,
        requests=ns.requests, rate=ns.rate, batch=ns.batch, stream=ns.stream,
        rerank=ns.rerank, documents=ns.documents, model=ns.client_model,
        streams=ns.streams, processes=ns.processes, corpus=ns.corpus, lengths=ns.lengths,
        query_lengths=ns.query_lengths, query_fraction=ns.query_fraction, texts=ns.texts,
        locales=locales, seed=ns.seed, warmup=ns.warmup, encoding=ns.encoding,
        dimensions=ns.dimensions, timeout=ns.timeout, time_limit=ns.time_limit,
        json_path=ns.json, plot_path=ns.plot, progress=ns.progress, api_key=ns.api_key,
        tls=ns.tls, tls_ca=ns.tls_ca, tls_cert=ns.client_tls_cert, tls_key=ns.client_tls_key)
