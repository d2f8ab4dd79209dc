"""The embedding core: the one path every front end calls.

    validate → prompt → tokenize → router → truncate/normalise → vectors + usage

The gRPC servicer (frontends/grpc_service.py) and the OpenAI-compatible HTTP routes
(frontends/http.py) both call `EmbeddingCore.embed` / `.tokenize` / `.info`; a front
end only maps its wire format to these calls and the core's errors (server/errors.py,
one table for gRPC and HTTP codes) to its status codes. The messages of those errors
are written once, here and in the tokenizer, and name the request's fields as the
proto does (`inputs`, `dimensions`); an InvalidInput's `field` lets a front end point
at its own name for it.

The core exists from the server's start; until the workers have answered their
warm-up (`open()`), every call gets UNAVAILABLE "the model is still loading".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .config import ServiceLimits
from .errors import InvalidInput, Unavailable
from .model import ModelSpec
from .pooling import finish
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


@dataclass(frozen=True, slots=True)
class Embeddings:
    """The answer to one embed call."""

    vectors: np.ndarray  # [inputs, dimensions] float32, C-contiguous, owned by the caller
    prompt_tokens: int  # tokens embedded, after prompts and truncation
    truncated_inputs: int


class EmbeddingCore:
    """Validation, prompts, tokenization, routing and pooling for every front end."""

    def __init__(self, *, spec: ModelSpec, encoder: TextEncoder, limits: ServiceLimits,
                 keyed: bool = False) -> None:
        """keyed: calls carry API keys (checked by the front ends), which then name the
        client for fair share."""
        self.spec = spec
        self.encoder = encoder
        self.limits = limits
        self.keyed = keyed
        self._router: Router | None = None
        self._info: ModelInfo | None = None
        # Calls being served, whatever their front end: a graceful stop waits for them.
        self.active = 0

    def open(self, router: Router, info: ModelInfo) -> None:
        """The workers are warm: serve calls from now on."""
        self._router = router
        self._info = info

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise Unavailable(LOADING)
        return self._info

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Count a front end's call as in flight until the block ends (its reply sent or
        built): a graceful stop lets every such call finish within the grace period."""
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    def client_of(self, authorization: str | None, connection: str) -> str:
        """Who calls, for the router's fair share: the API key (its digest) when keys are
        required, else the connection (a client's channel, or a keep-alive HTTP
        connection). Without keys a key-like header names nothing: anyone could send a new
        one with every call."""
        if self.keyed and authorization and authorization.startswith("Bearer "):
            digest = hashlib.sha256(authorization[7:].strip().encode()).hexdigest()
            return f"key:{digest[:16]}"
        return connection

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
