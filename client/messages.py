"""Request and response messages, without grpc: encodings, building requests, decoding
vectors (the command line and the load tester use them before any channel exists)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np

from embedrpc.v1 import embedder_pb2 as pb

ENCODINGS = {
    "float": pb.ENCODING_FLOAT,
    "float32": pb.ENCODING_FLOAT32_BYTES,
    "float16": pb.ENCODING_FLOAT16_BYTES,
    "ubinary": pb.ENCODING_UBINARY,
}
TRUNCATES = {"end": pb.TRUNCATE_END, "start": pb.TRUNCATE_START, "none": pb.TRUNCATE_NONE}
# What a rerank request may say (the model card cuts a pair only at its end).
RERANK_TRUNCATES = {"end": pb.TRUNCATE_END, "none": pb.TRUNCATE_NONE}


@dataclass(frozen=True, slots=True)
class RerankResult:
    """One scored document: its position in the request, its score in (0, 1), and its
    text when return_documents was set."""

    index: int
    score: float
    document: str | None = None


def decode(response: pb.EmbedResponse) -> np.ndarray:
    """The response's vectors as an array.

    float and float32 bytes → float32 [n, d]; float16 bytes → float16 [n, d];
    ubinary → uint8 [n, ceil(d / 8)], bits packed most significant first
    (np.unpackbits(..., axis=1)[:, :d] recovers the 0/1 matrix).
    """
    d = response.dimensions
    if response.encoding == pb.ENCODING_FLOAT:
        if not response.embeddings:
            return np.zeros((0, d), dtype=np.float32)
        return np.array([e.values for e in response.embeddings], dtype=np.float32)
    if response.encoding == pb.ENCODING_FLOAT32_BYTES:
        return np.frombuffer(response.data, dtype="<f4").reshape(-1, d).astype(np.float32)
    if response.encoding == pb.ENCODING_FLOAT16_BYTES:
        return np.frombuffer(response.data, dtype="<f2").reshape(-1, d).astype(np.float16)
    if response.encoding == pb.ENCODING_UBINARY:
        return np.frombuffer(response.data, dtype=np.uint8).reshape(-1, (d + 7) // 8).copy()
    raise ValueError(f"unknown encoding {response.encoding}")


def make_request(inputs: Sequence[str] | str, *, prompt_name: str = "", instruction: str = "",
                 dimensions: int = 0, normalize: bool | None = None, truncate: str = "end",
                 encoding: str = "float32", request_id: str = "",
                 model: str = "") -> pb.EmbedRequest:
    """Build an EmbedRequest from friendly arguments (names checked here, values by the server)."""
    if isinstance(inputs, str):
        inputs = [inputs]
    elif isinstance(inputs, (Mapping, AbstractSet)):  # iterating them gives keys, unordered
        raise TypeError(f"inputs must be a text or a list of texts, not a "
                        f"{type(inputs).__name__}; for a request with its own options, "
                        "pass make_request(texts, request_id=..., ...) or an EmbedRequest")
    try:
        enc = ENCODINGS[encoding]
        trunc = TRUNCATES[truncate]
    except KeyError as exc:
        raise ValueError(f"unknown option {exc.args[0]!r}: encoding is one of "
                         f"{sorted(ENCODINGS)}, truncate one of {sorted(TRUNCATES)}") from None
    request = pb.EmbedRequest(inputs=list(inputs), prompt_name=prompt_name,
                              instruction=instruction, dimensions=dimensions, truncate=trunc,
                              encoding=enc, request_id=request_id, model=model)
    if normalize is not None:
        request.normalize = normalize
    return request


def make_tokenize_request(inputs: Sequence[str] | str, *, prompt_name: str = "",
                          instruction: str = "", truncate: str = "end",
                          return_tokens: bool = False, model: str = "") -> pb.TokenizeRequest:
    if truncate not in TRUNCATES:
        raise ValueError(f"unknown truncate {truncate!r}: one of {sorted(TRUNCATES)}")
    return pb.TokenizeRequest(inputs=[inputs] if isinstance(inputs, str) else list(inputs),
                              prompt_name=prompt_name, instruction=instruction,
                              truncate=TRUNCATES[truncate], return_tokens=return_tokens,
                              model=model)


def make_rerank_request(query: str, documents: Sequence[str], *, instruction: str = "",
                        top_n: int = 0, return_documents: bool = False,
                        truncate: str = "end", model: str = "",
                        request_id: str = "") -> pb.RerankRequest:
    """A RerankRequest from friendly arguments: `instruction` empty for the model's
    default, `top_n` 0 for every document, `truncate` "end" (the card's) or "none"."""
    if isinstance(documents, str):
        raise ValueError("documents must be a list of strings, not one string")
    if truncate not in RERANK_TRUNCATES:
        raise ValueError(f"unknown truncate {truncate!r} for reranking: one of "
                         f"{sorted(RERANK_TRUNCATES)} (the model card cuts a pair at its end)")
    return pb.RerankRequest(query=query, documents=list(documents), instruction=instruction,
                            top_n=top_n, return_documents=return_documents,
                            truncate=RERANK_TRUNCATES[truncate], model=model,
                            request_id=request_id)


def rerank_results(response: pb.RerankResponse) -> list[RerankResult]:
    """The response's results, best first, as RerankResult."""
    return [RerankResult(r.index, r.score, r.document if r.HasField("document") else None)
            for r in response.results]
