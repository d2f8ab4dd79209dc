"""The cores: the one path every front end calls, one core per model served.

    embedding:  validate → prompt → tokenize → router → truncate/normalise → vectors + usage
    reranking:  validate → the model card's pairs (rerank.py) → router → sort, top_n + usage

The gRPC servicers (frontends/grpc_service.py) and the HTTP routes (frontends/http.py)
ask `Cores` which model's core serves a request (`embedder(model)`, `reranker(model)`),
then call `EmbeddingCore.embed` / `.tokenize` or `RerankCore.rerank` / `.rerank_many`,
and `.info`; a front end only maps its wire format to these calls and the core's errors
(server/errors.py, one table for gRPC and HTTP codes) to its status codes. The messages
of those errors are written once, here, in the tokenizer and in rerank.py, and name the
request's fields as the proto does (`inputs`, `dimensions`, `documents`, `top_n`,
`model`); an InvalidInput's `field` lets a front end point at its own name for it.

A core exists from the server's start; until its workers have answered their warm-up
(`open()`), every call gets UNAVAILABLE "the model is still loading".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .config import ServiceLimits
from .errors import InvalidInput, Unavailable
from .model import ModelSpec
from .pooling import finish
from .rerank import PairEncoder
from .router import Router
from .tokenizer import TRUNCATE_END, Encoded, TextEncoder

log = logging.getLogger(__name__)

# Tokenizing more text than this per request happens off the event loop; below it the
# thread hop would cost more than the tokenizing.
INLINE_TOKENIZE_CHARS = 16_384
LOADING = "the model is still loading; retry when health says SERVING"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What is served, as the Info RPC and GET /v1/models describe it."""

    model: str
    dimensions: int
    min_dimensions: int
    max_length: int
    prompt_names: tuple[str, ...]
    pooling: str
    precision: str
    devices: tuple[str, ...]
    max_batch_tokens: int
    version: str
    max_inputs: int
    workers: int
    pooled_token: str
    pooled_token_id: int
    pooled_token_source: str
    task: str = "embed"  # or "rerank"
    default_instruction: str = ""  # rerankers: the model card's


@dataclass(frozen=True, slots=True)
class Embeddings:
    """The answer to one embed call."""

    vectors: np.ndarray  # [inputs, dimensions] float32, C-contiguous, owned by the caller
    prompt_tokens: int  # tokens embedded, after prompts and truncation
    truncated_inputs: int


class Calls:
    """Calls being served, whatever their front end and model: a graceful stop waits for
    them. Every core of a server shares one."""

    def __init__(self) -> None:
        self.active = 0

    def call(self) -> Calls:
        """Count a front end's call as in flight until the block ends (its reply sent or
        built): a graceful stop lets every such call finish within the grace period."""
        return self

    def __enter__(self) -> None:
        self.active += 1

    def __exit__(self, *exc: object) -> None:
        self.active -= 1


def client_of(keyed: bool, authorization: str | None, connection: str) -> str:
    """Who calls, for the router's fair share: the API key (its digest) when keys are
    required (`keyed`), else the connection (a client's channel, or a keep-alive HTTP
    connection). Without keys a key-like header names nothing: anyone could send a new
    one with every call."""
    if keyed and authorization:
        # As the key check reads it: the scheme in any case, the key stripped.
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            key = token.strip().encode("utf-8", "surrogateescape")
            return f"key:{hashlib.sha256(key).hexdigest()[:16]}"
    return connection


class _Core:
    """What every model's core has: its name, its router once warm, its Info, the
    server's shared call count and fair-share naming."""

    task = ""

    def __init__(self, *, name: str, limits: ServiceLimits, keyed: bool,
                 calls: Calls | None) -> None:
        """keyed: calls carry API keys (checked by the front ends), which then name the
        client for fair share."""
        self.name = name
        self.limits = limits
        self.keyed = keyed
        self.calls = calls or Calls()
        self._router: Router | None = None
        self._info: ModelInfo | None = None

    def open(self, router: Router, info: ModelInfo) -> None:
        """The workers are warm: serve calls from now on."""
        self._router = router
        self._info = info

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise Unavailable(LOADING)
        return self._info

    @property
    def active(self) -> int:
        """Calls in flight in the server (every core's: they share one count)."""
        return self.calls.active

    def call(self) -> contextlib.AbstractContextManager[None]:
        return self.calls.call()

    def client_of(self, authorization: str | None, connection: str) -> str:
        return client_of(self.keyed, authorization, connection)

    def _routed(self) -> Router:
        if self._router is None:
            raise Unavailable(LOADING)
        return self._router


class EmbeddingCore(_Core):
    """Validation, prompts, tokenization, routing and pooling for every front end."""

    task = "embed"

    def __init__(self, *, spec: ModelSpec, encoder: TextEncoder, limits: ServiceLimits,
                 keyed: bool = False, calls: Calls | None = None) -> None:
        super().__init__(name=spec.name, limits=limits, keyed=keyed, calls=calls)
        self.spec = spec
        self.encoder = encoder

    # -- validation ----------------------------------------------------------

    def check_inputs(self, count: int) -> None:
        most = self.limits.max_inputs
        if count == 0:
            raise InvalidInput(f"inputs is empty; send 1 to {most} texts", field="inputs")
        if count > most:
            raise InvalidInput(f"{count} inputs in one request; at most {most} are allowed "
                               "(--max-inputs): split the request", field="inputs")

    def dimensions(self, requested: int | None) -> int:
        """The vector length to return: `requested`, or all of them for None."""
        full = self.spec.hidden_size
        if requested is None:
            return full
        if not self.spec.min_dimensions <= requested <= full:
            raise InvalidInput(f"dimensions={requested} is out of range; use "
                               f"{self.spec.min_dimensions}..{full}, or leave it unset for "
                               f"all {full}", field="dimensions")
        return requested

    # -- the calls -----------------------------------------------------------

    async def tokenize(self, texts: Sequence[str], *, prompt_name: str = "",
                       instruction: str = "", truncate: int = TRUNCATE_END) -> Encoded:
        """Token ids as the model sees them (prompt, truncation and end token included)."""
        if self._router is None:
            raise Unavailable(LOADING)
        self.check_inputs(len(texts))
        return await self._tokenize(texts, prompt_name, instruction, truncate)

    async def embed(self, texts: Sequence[str], *, dimensions: int | None = None,
                    normalize: bool = True, prompt_name: str = "", instruction: str = "",
                    truncate: int = TRUNCATE_END, deadline: float | None = None,
                    client: str = "") -> Embeddings:
        """Vectors for `texts`, in order. `deadline`: time.monotonic() by which the
        vectors are no longer wanted (DEADLINE_EXCEEDED once it passes in the queue);
        `client`: who asks (client_of), for fair share."""
        router = self._router
        if router is None:
            raise Unavailable(LOADING)
        started = time.monotonic()
        self.check_inputs(len(texts))
        size = self.dimensions(dimensions)
        encoded = await self._tokenize(texts, prompt_name, instruction, truncate)
        pooled = await router.embed(encoded.ids, deadline=deadline, client=client)
        result = Embeddings(vectors=finish(pooled, size, normalize),
                            prompt_tokens=encoded.total_tokens,
                            truncated_inputs=sum(encoded.truncated))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("embed inputs=%d tokens=%d dimensions=%d %.1f ms", len(encoded.ids),
                      result.prompt_tokens, size, (time.monotonic() - started) * 1000)
        return result

    async def _tokenize(self, texts: Sequence[str], prompt_name: str, instruction: str,
                        truncate: int) -> Encoded:
        prompt = self.encoder.prompt_for(prompt_name, instruction)
        texts = texts if isinstance(texts, list) else list(texts)
        try:
            if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
                return self.encoder.encode(texts, prompt=prompt, truncate=truncate)
            return await asyncio.to_thread(self.encoder.encode, texts, prompt=prompt,
                                           truncate=truncate)
        except TypeError:
            # The tokenizer takes only text it can encode as UTF-8, which a lone surrogate
            # (what a JSON \u escape can make) is not. gRPC's strings are UTF-8 already.
            if (problem := _not_unicode(texts, instruction)) is None:
                raise
            raise problem from None


def _not_unicode(texts: list[str], instruction: str) -> InvalidInput | None:
    """Which text holds a lone surrogate, as an error; None if none does."""
    for where, text in (("instruction", instruction),
                        *((f"inputs[{i}]", t) for i, t in enumerate(texts))):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return InvalidInput(f"{where} holds a lone surrogate (U+{ord(text[exc.start]):04X} "
                                f"at character {exc.start}); text must be valid Unicode: a "
                                "\\uD800-\\uDFFF escape only as half of a pair",
                                field="instruction" if where == "instruction" else "inputs")
    return None


# -- reranking ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RerankQuery:
    """One query and its documents, as a Rerank request gives them."""

    query: str
    documents: Sequence[str]
    instruction: str = ""  # empty: the model card's default instruction
    top_n: int = 0  # 0: every document
    truncate: int = TRUNCATE_END


@dataclass(frozen=True, slots=True)
class Ranking:
    """The answer to one query."""

    order: np.ndarray  # document indices, best first: every document, or the top_n best
    scores: np.ndarray  # float32, one per document, in input order
    prompt_tokens: int  # tokens the model saw for the query's pairs
    truncated_inputs: int  # pairs cut to max_length


class RerankCore(_Core):
    """Validation, the model card's pairs, routing and ranking for every front end.

    The pairs go through the same router as texts do (token-budget batches,
    length-sorted, fair share by client, sharded over the workers), so one query with a
    thousand documents spreads over every worker; their scores come back by index."""

    task = "rerank"

    def __init__(self, *, name: str, encoder: PairEncoder, limits: ServiceLimits,
                 keyed: bool = False, calls: Calls | None = None) -> None:
        super().__init__(name=name, limits=limits, keyed=keyed, calls=calls)
        self.encoder = encoder

    def check_documents(self, count: int, where: str = "") -> None:
        most = self.limits.max_inputs
        if count == 0:
            raise InvalidInput(f"{where}documents is empty; send 1 to {most} documents",
                               field="documents")
        if count > most:
            raise InvalidInput(f"{where}{count} documents in one request; at most {most} are "
                               "allowed (--max-inputs): split the request",
                               field="documents")

    def _check(self, q: RerankQuery, where: str = "") -> None:
        self.check_documents(len(q.documents), where)
        if q.top_n < 0:
            raise InvalidInput(f"{where}top_n={q.top_n} is negative; use 0 for every "
                               f"document, or 1..{len(q.documents)} for the best ones",
                               field="top_n")

    def _check_size(self, queries: Sequence[RerankQuery]) -> None:
        """Every pair repeats its query and instruction: bound the text to tokenize (and
        hold) by what one request may carry."""
        default = len(self.encoder.default_instruction)  # what an empty one means
        chars = sum(len(q.documents) * (len(q.query) + (len(q.instruction) or default))
                    + sum(map(len, q.documents)) for q in queries)
        limit = self.limits.max_message_bytes
        if chars > limit:
            raise InvalidInput(f"the pairs to score hold {chars:,} characters (the query and "
                               "instruction repeat with every document), over the server's "
                               f"limit of {limit:,} (--max-message-bytes); send a shorter "
                               "query or fewer documents per request", field="documents")

    async def rerank(self, query: str, documents: Sequence[str], *, instruction: str = "",
                     top_n: int = 0, truncate: int = TRUNCATE_END,
                     deadline: float | None = None, client: str = "") -> Ranking:
        """`documents` scored against `query`, best first. `instruction`: empty for the
        model card's default; `top_n`: 0 for all; `deadline`, `client` as for embed."""
        q = RerankQuery(query, documents, instruction, top_n, truncate)
        self._check(q)
        [ranking] = await self._score([q], deadline, client, batch=False)
        return ranking

    async def rerank_many(self, queries: Sequence[RerankQuery], *,
                          deadline: float | None = None, client: str = "") -> list[Ranking]:
        """Several queries in one call: every pair goes to the router at once (so they
        share batches); one Ranking per query, in order."""
        most = self.limits.max_inputs
        if not queries:
            raise InvalidInput(f"requests is empty; send 1 to {most} requests",
                               field="requests")
        for i, q in enumerate(queries):
            self._check(q, f"requests[{i}]: ")
        total = sum(len(q.documents) for q in queries)
        if total > most:
            raise InvalidInput(f"{total} documents in all {len(queries)} requests; at most "
                               f"{most} are allowed in one call (--max-inputs): split it",
                               field="documents")
        return await self._score(queries, deadline, client, batch=True)

    async def _score(self, queries: Sequence[RerankQuery], deadline: float | None,
                     client: str, *, batch: bool) -> list[Ranking]:
        """batch: the queries are a RerankBatch's requests (errors name which one)."""
        router = self._routed()
        started = time.monotonic()
        self._check_size(queries)
        chars = sum(sum(map(len, q.documents)) + len(q.documents) * len(q.query)
                    for q in queries)
        if chars <= INLINE_TOKENIZE_CHARS:
            encoded = self._encode(queries, batch)
        else:
            encoded = await asyncio.to_thread(self._encode, queries, batch)
        ids = [row for e in encoded for row in e.ids]
        pooled = await router.embed(ids, deadline=deadline, client=client)
        scores = np.ascontiguousarray(pooled[:, 0], dtype=np.float32)
        rankings, start = [], 0
        for q, e in zip(queries, encoded, strict=True):
            mine = scores[start:start + len(e.ids)]
            start += len(e.ids)
            # Highest first; equal scores keep their input order.
            order = np.argsort(-mine, kind="stable")
            rankings.append(Ranking(order=order[:q.top_n] if q.top_n else order,
                                    scores=mine, prompt_tokens=e.total_tokens,
                                    truncated_inputs=sum(e.truncated)))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rerank queries=%d pairs=%d tokens=%d %.1f ms", len(queries), len(ids),
                      sum(r.prompt_tokens for r in rankings),
                      (time.monotonic() - started) * 1000)
        return rankings

    def _encode(self, queries: Sequence[RerankQuery], batch: bool) -> list[Encoded]:
        out = []
        for i, q in enumerate(queries):
            where = f"requests[{i}]: " if batch else ""
            documents = q.documents if isinstance(q.documents, list) else list(q.documents)
            try:
                out.append(self.encoder.encode(q.query, documents,
                                               instruction=q.instruction or None,
                                               truncate=q.truncate))
            except InvalidInput as exc:
                if not where:
                    raise
                raise InvalidInput(f"{where}{exc}", field=exc.field) from None
            except TypeError:
                # As for embeddings: a lone surrogate (from a JSON \u escape) is no text
                # the tokenizer takes.
                if (problem := _not_unicode_pair(q, where)) is None:
                    raise
                raise problem from None
        return out


def _not_unicode_pair(q: RerankQuery, where: str) -> InvalidInput | None:
    """Which of a query's texts holds a lone surrogate, as an error; None if none does."""
    texts = [("query", q.query), ("instruction", q.instruction),
             *((f"documents[{i}]", d) for i, d in enumerate(q.documents))]
    for name, text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return InvalidInput(f"{where}{name} holds a lone surrogate "
                                f"(U+{ord(text[exc.start]):04X} at character {exc.start}); "
                                "text must be valid Unicode: a \\uD800-\\uDFFF escape only "
                                "as half of a pair", field=name.split("[")[0])
    return None


# -- every model, by name ---------------------------------------------------------

Core = EmbeddingCore | RerankCore
_KIND = {"embed": "an embedding model", "rerank": "a reranker"}
_KINDS = {"embed": "embedding models", "rerank": "rerankers"}
_ONE = {"embed": "embedding model", "rerank": "reranker"}


class Cores:
    """The cores of every model served, in --model order: which one serves a request.

    A request names its model, or leaves it empty for the only model of its kind.
    `lenient` (the HTTP routes, whose clients always send some name, as the OpenAI and
    Cohere SDKs do): a name this server does not serve means the only model of the kind,
    when there is one, as before several models could be served."""

    def __init__(self, cores: Sequence[Core], *, calls: Calls) -> None:
        self.cores = list(cores)
        self.by_name = {c.name: c for c in self.cores}
        self.calls = calls

    @property
    def first(self) -> Core:
        return self.cores[0]

    @property
    def active(self) -> int:
        return self.calls.active

    def call(self) -> contextlib.AbstractContextManager[None]:
        return self.calls.call()

    def client_of(self, authorization: str | None, connection: str) -> str:
        return self.first.client_of(authorization, connection)

    def listing(self) -> str:
        """'demo (embed), demo-reranker (rerank)': what errors offer."""
        return ", ".join(f"{c.name} ({c.task})" for c in self.cores)

    def named(self, model: str = "") -> Core:
        """The model `model` names, of any kind; empty: the first one."""
        if not model:
            return self.first
        core = self.by_name.get(model)
        if core is None:
            raise InvalidInput(f"model {model[:100]!r} is not served here; this server "
                               f"serves {self.listing()}", field="model")
        return core

    def embedder(self, model: str = "", *, lenient: bool = False) -> EmbeddingCore:
        core = self._of("embed", model, lenient)
        assert isinstance(core, EmbeddingCore)
        return core

    def reranker(self, model: str = "", *, lenient: bool = False) -> RerankCore:
        core = self._of("rerank", model, lenient)
        assert isinstance(core, RerankCore)
        return core

    def _of(self, task: str, model: str, lenient: bool) -> Core:
        kind = [c for c in self.cores if c.task == task]
        core = self.by_name.get(model) if model else None
        if core is not None:
            if core.task != task:
                raise InvalidInput(
                    f"model {model!r} is {_KIND[core.task]}, not {_KIND[task]}; "
                    f"{_KINDS[task]} served here: "
                    f"{', '.join(c.name for c in kind) or 'none'}", field="model")
            return core
        if model and not (lenient and len(kind) == 1):
            raise InvalidInput(f"model {model[:100]!r} is not served here; this server "
                               f"serves {self.listing()}", field="model")
        if not kind:
            raise InvalidInput(f"no {_ONE[task]} is served here; this server serves "
                               f"{self.listing()}", field="model")
        if len(kind) > 1:
            raise InvalidInput(f"this server serves several {_KINDS[task]} "
                               f"({', '.join(c.name for c in kind)}); name one in `model`",
                               field="model")
        return kind[0]
