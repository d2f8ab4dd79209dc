"""The requests a run sends: its texts (a corpus file or generated), and those texts
serialised into EmbedRequests (or RerankRequests, --rerank) before the run starts, so the
load engine spends its time on gRPC only."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..messages import make_request, make_rerank_request
from .options import BenchConfig
from .texts import LengthSpec, TextGenerator, load_corpus

REQUEST_POOL = 1024  # distinct pre-serialised requests per process, sent in turn
# A pool entry: one serialised EmbedRequest and how many inputs it carries.
Pool = list[tuple[bytes, int]]


@dataclass(frozen=True)
class Workload:
    """Texts to send; `queries` go with prompt_name "query"."""

    documents: list[str]
    queries: list[str]
    source: str


def make_workload(config: BenchConfig) -> Workload:
    if config.corpus is not None:
        texts = load_corpus(config.corpus)
        return Workload(texts, texts, f"corpus {config.corpus} ({len(texts)} texts)")
    generator = TextGenerator(locales=config.locales, seed=config.seed)
    n_queries = round(config.texts * config.query_fraction)
    if config.query_fraction > 0:
        n_queries = max(1, n_queries)
    n_docs = config.texts - n_queries if config.query_fraction < 1 else 0
    if config.query_fraction < 1:
        n_docs = max(1, n_docs)
    if config.rerank:  # a query against several documents: both are needed
        n_queries = max(1, config.texts // 4)
        n_docs = max(1, config.texts - n_queries)
    docs = generator.texts(n_docs, LengthSpec.parse(config.lengths))
    queries = generator.texts(n_queries, LengthSpec.parse(config.query_lengths), query=True)
    words = "Faker" if generator.faker else "built-in word lists"
    return Workload(docs, queries, f"generated: {n_docs} documents ({config.lengths} words), "
                    f"{n_queries} queries ({config.query_lengths}), {len(generator.locales)} "
                    f"locales, {words}")


def request_pool(config: BenchConfig, workload: Workload, seed: int | Sequence[int],
                 size: int = REQUEST_POOL) -> list[tuple[bytes, int]]:
    """Serialised EmbedRequests and their input counts; queries with the given share.
    With --rerank: RerankRequests of a query and --documents documents (the count)."""
    rng = np.random.default_rng(seed)
    pool = []
    if config.rerank:
        for _ in range(size):
            query = workload.queries[int(rng.integers(0, len(workload.queries)))]
            picks = rng.integers(0, len(workload.documents), size=config.documents)
            request = make_rerank_request(query, [workload.documents[i] for i in
                                                  picks.tolist()], model=config.model)
            pool.append((request.SerializeToString(), config.documents))
        return pool
    for _ in range(size):
        query = bool(workload.queries) and (not workload.documents
                                            or rng.random() < config.query_fraction)
        texts = workload.queries if query else workload.documents
        picks = rng.integers(0, len(texts), size=config.batch)
        request = make_request([texts[i] for i in picks.tolist()],
                               prompt_name="query" if query else "",
                               dimensions=config.dimensions, encoding=config.encoding,
                               model=config.model)
        pool.append((request.SerializeToString(), config.batch))
    return pool


def pool_from_texts(requests: Iterable[Sequence[str]], **options: Any) -> Pool:
    """These requests, serialised in this order (the engine sends them in turn);
    `options` as for `make_request` (encoding, prompt_name, dimensions, ...)."""
    return [(make_request(list(texts), **options).SerializeToString(), len(texts))
            for texts in requests]
