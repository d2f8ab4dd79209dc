"""Python clients for the Embedder and Reranker services: blocking and asyncio, returning
numpy arrays (embeddings) and RerankResult lists (reranking)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from embedrpc.v1 import embedder_pb2 as pb
from embedrpc.v1 import embedder_pb2_grpc as pb_grpc

from .channel import DEFAULT_ATTEMPTS, channel_args
from .credentials import Pem, auth_metadata, channel_credentials
from .messages import (
    RerankResult,
    decode,
    make_request,
    make_rerank_request,
    make_tokenize_request,
    rerank_results,
)

# Large requests and responses: 1000 texts × 4096 floats is 16 MB.
DEFAULT_OPTIONS = (
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
)


@dataclass(frozen=True)
class StreamResult:
    """One EmbedStream answer: vectors, or the error of that request."""

    request_id: str
    embeddings: np.ndarray | None
    error: pb.Status | None

    def unwrap(self) -> np.ndarray:
        if self.error is not None:
            code = _STATUS_NAMES.get(self.error.code, str(self.error.code))
            raise RuntimeError(f"request {self.request_id!r} failed: {code}: "
                               f"{self.error.message}")
        assert self.embeddings is not None
        return self.embeddings


_STATUS_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


def _stream_result(response: pb.EmbedResponse) -> StreamResult:
    if response.HasField("error"):
        return StreamResult(response.request_id, None, response.error)
    return StreamResult(response.request_id, decode(response), None)


def _as_request(item: pb.EmbedRequest | Sequence[str] | str, index: int,
                kwargs: dict[str, Any]) -> pb.EmbedRequest:
    if isinstance(item, pb.EmbedRequest):
        return item
    return make_request(item, request_id=str(index), **kwargs)


def _open_channel(module: Any, target: str | Sequence[str],
                  credentials: grpc.ChannelCredentials | None,
                  options: Sequence[tuple[str, Any]], balance: bool | None, retries: int,
                  tls: bool, root_certificates: Pem | None, client_cert: Pem | None,
                  client_key: Pem | None) -> Any:
    """A channel from `module` (grpc or grpc.aio): TLS as channel_credentials() says;
    several targets / dns: balanced round_robin, UNAVAILABLE retried (see channel.py)."""
    credentials = channel_credentials(credentials, tls=tls,
                                      root_certificates=root_certificates,
                                      client_cert=client_cert, client_key=client_key)
    target, opts = channel_args(target, [*DEFAULT_OPTIONS, *options], balance=balance,
                                retries=retries)
    return (module.secure_channel(target, credentials, opts) if credentials
            else module.insecure_channel(target, opts))


class EmbedClient:
    """Blocking client. `with EmbedClient("localhost:50051") as c: c.embed(["text"])`.

    `target`: one HOST:PORT (or gRPC target URI), several replicas (a list, or
    "h1:p,h2:p"), or "dns:///name:port"; several replicas and dns: targets are balanced
    round_robin over healthy replicas. `retries`: attempts in all (1-5) for Embed,
    Tokenize and Info calls that fail with UNAVAILABLE or CANCELLED (a replica stopping
    mid-call). See embedrpc.client.channel.
    """

    def __init__(self, target: str | Sequence[str], *, timeout: float | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, Any]] = (),
                 metadata: Sequence[tuple[str, str]] = (),
                 balance: bool | None = None, retries: int = DEFAULT_ATTEMPTS,
                 api_key: str | None = None, tls: bool = False,
                 root_certificates: Pem | None = None, client_cert: Pem | None = None,
                 client_key: Pem | None = None) -> None:
        # api_key: sent as `authorization: Bearer <key>`. TLS: see channel_credentials().
        self.channel = _open_channel(grpc, target, credentials, options, balance, retries,
                                     tls, root_certificates, client_cert, client_key)
        self.stub = pb_grpc.EmbedderStub(self.channel)
        self.reranker = pb_grpc.RerankerStub(self.channel)
        self.timeout = timeout
        self.metadata = (*metadata, *auth_metadata(api_key))

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def embed_response(self, inputs: Sequence[str] | str, **kwargs: Any) -> pb.EmbedResponse:
        return self.stub.Embed(make_request(inputs, **kwargs), timeout=self.timeout,
                               metadata=self.metadata)

    def embed(self, inputs: Sequence[str] | str, **kwargs: Any) -> np.ndarray:
        """Vectors for `inputs`: [n, d]. Keywords as in make_request()."""
        return decode(self.embed_response(inputs, **kwargs))

    def stream(self, requests: Iterable[pb.EmbedRequest | Sequence[str] | str],
               **kwargs: Any) -> Iterator[StreamResult]:
        """EmbedStream: one StreamResult per request, in order. Plain lists of texts get
        request ids "0", "1", ... and the keywords of make_request()."""
        failed: list[Exception] = []

        def it() -> Iterator[pb.EmbedRequest]:
            for i, item in enumerate(requests):
                try:
                    yield _as_request(item, i, kwargs)
                except Exception as exc:  # grpc would say only "Exception iterating requests"
                    failed.append(exc)
                    raise

        try:
            for response in self.stub.EmbedStream(it(), timeout=self.timeout,
                                                  metadata=self.metadata):
                yield _stream_result(response)
        except grpc.RpcError:
            if failed:
                raise failed[0] from None
            raise

    def tokenize(self, inputs: Sequence[str] | str, *, prompt_name: str = "",
                 instruction: str = "", truncate: str = "end",
                 return_tokens: bool = False, model: str = "") -> pb.TokenizeResponse:
        request = make_tokenize_request(inputs, prompt_name=prompt_name,
                                        instruction=instruction, truncate=truncate,
                                        return_tokens=return_tokens, model=model)
        return self.stub.Tokenize(request, timeout=self.timeout, metadata=self.metadata)

    def info(self, model: str = "") -> pb.InfoResponse:
        """What the server serves; `model`: the model to describe (default: its first)."""
        return self.stub.Info(pb.InfoRequest(model=model), timeout=self.timeout,
                              metadata=self.metadata)

    def rerank_response(self, query: str, documents: Sequence[str],
                        **kwargs: Any) -> pb.RerankResponse:
        return self.reranker.Rerank(make_rerank_request(query, documents, **kwargs),
                                    timeout=self.timeout, metadata=self.metadata)

    def rerank(self, query: str, documents: Sequence[str], *, instruction: str = "",
               top_n: int = 0, return_documents: bool = False, truncate: str = "end",
               model: str = "") -> list[RerankResult]:
        """`documents` scored against `query` by a reranker, best first: RerankResult
        (index, score in (0, 1), document with return_documents). instruction: empty for
        the model's default; top_n: 0 for all; truncate: "end" or "none"; model: empty
        for the server's only reranker."""
        return rerank_results(self.rerank_response(
            query, documents, instruction=instruction, top_n=top_n,
            return_documents=return_documents, truncate=truncate, model=model))

    def rerank_batch(self, queries: Sequence[tuple[str, Sequence[str]]], *,
                     instruction: str = "", top_n: int = 0, return_documents: bool = False,
                     truncate: str = "end", model: str = "") -> list[list[RerankResult]]:
        """Several (query, documents) in one call (RerankBatch, their pairs batched
        together): one result list per query, in order. Options as for rerank()."""
        request = _batch_request(queries, instruction=instruction, top_n=top_n,
                                 return_documents=return_documents, truncate=truncate,
                                 model=model)
        response = self.reranker.RerankBatch(request, timeout=self.timeout,
                                             metadata=self.metadata)
        return [rerank_results(r) for r in response.responses]


class AsyncEmbedClient:
    """asyncio client. `async with AsyncEmbedClient(target) as c: await c.embed([...])`."""

    def __init__(self, target: str | Sequence[str], *, timeout: float | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, Any]] = (),
                 metadata: Sequence[tuple[str, str]] = (),
                 balance: bool | None = None, retries: int = DEFAULT_ATTEMPTS,
                 api_key: str | None = None, tls: bool = False,
                 root_certificates: Pem | None = None, client_cert: Pem | None = None,
                 client_key: Pem | None = None) -> None:
        self.channel = _open_channel(grpc.aio, target, credentials, options, balance,
                                     retries, tls, root_certificates, client_cert, client_key)
        self.stub = pb_grpc.EmbedderStub(self.channel)
        self.reranker = pb_grpc.RerankerStub(self.channel)
        self.timeout = timeout
        self.metadata = (*metadata, *auth_metadata(api_key))

    async def __aenter__(self) -> AsyncEmbedClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def embed_response(self, inputs: Sequence[str] | str,
                             **kwargs: Any) -> pb.EmbedResponse:
        return await self.stub.Embed(make_request(inputs, **kwargs), timeout=self.timeout,
                                     metadata=self.metadata)

    async def embed(self, inputs: Sequence[str] | str, **kwargs: Any) -> np.ndarray:
        return decode(await self.embed_response(inputs, **kwargs))

    async def stream(self, requests: AsyncIterable[pb.EmbedRequest | Sequence[str] | str]
                     | Iterable[pb.EmbedRequest | Sequence[str] | str],
                     **kwargs: Any) -> AsyncIterator[StreamResult]:
        failed: list[Exception] = []

        def request(item: pb.EmbedRequest | Sequence[str] | str, i: int) -> pb.EmbedRequest:
            try:
                return _as_request(item, i, kwargs)
            except Exception as exc:  # grpc would say only that iterating failed
                failed.append(exc)
                raise

        async def gen() -> AsyncIterator[pb.EmbedRequest]:
            if isinstance(requests, AsyncIterable):
                i = 0
                async for item in requests:
                    yield request(item, i)
                    i += 1
            else:
                for i, item in enumerate(requests):
                    yield request(item, i)

        call = self.stub.EmbedStream(gen(), timeout=self.timeout, metadata=self.metadata)
        try:
            async for response in call:
                yield _stream_result(response)
        except (grpc.RpcError, asyncio.CancelledError):
            if failed:
                raise failed[0] from None
            raise

    async def tokenize(self, inputs: Sequence[str] | str, *, prompt_name: str = "",
                       instruction: str = "", truncate: str = "end",
                       return_tokens: bool = False, model: str = "") -> pb.TokenizeResponse:
        request = make_tokenize_request(inputs, prompt_name=prompt_name,
                                        instruction=instruction, truncate=truncate,
                                        return_tokens=return_tokens, model=model)
        return await self.stub.Tokenize(request, timeout=self.timeout, metadata=self.metadata)

    async def info(self, model: str = "") -> pb.InfoResponse:
        return await self.stub.Info(pb.InfoRequest(model=model), timeout=self.timeout,
                                    metadata=self.metadata)

    async def rerank_response(self, query: str, documents: Sequence[str],
                              **kwargs: Any) -> pb.RerankResponse:
        return await self.reranker.Rerank(make_rerank_request(query, documents, **kwargs),
                                          timeout=self.timeout, metadata=self.metadata)

    async def rerank(self, query: str, documents: Sequence[str], *, instruction: str = "",
                     top_n: int = 0, return_documents: bool = False, truncate: str = "end",
                     model: str = "") -> list[RerankResult]:
        """As EmbedClient.rerank."""
        return rerank_results(await self.rerank_response(
            query, documents, instruction=instruction, top_n=top_n,
            return_documents=return_documents, truncate=truncate, model=model))

    async def rerank_batch(self, queries: Sequence[tuple[str, Sequence[str]]], *,
                           instruction: str = "", top_n: int = 0,
                           return_documents: bool = False, truncate: str = "end",
                           model: str = "") -> list[list[RerankResult]]:
        """As EmbedClient.rerank_batch."""
        request = _batch_request(queries, instruction=instruction, top_n=top_n,
                                 return_documents=return_documents, truncate=truncate,
                                 model=model)
        response = await self.reranker.RerankBatch(request, timeout=self.timeout,
                                                   metadata=self.metadata)
        return [rerank_results(r) for r in response.responses]


def _batch_request(queries: Sequence[tuple[str, Sequence[str]]],
                   **options: Any) -> pb.RerankBatchRequest:
    return pb.RerankBatchRequest(requests=[
        make_rerank_request(query, documents, request_id=str(i), **options)
        for i, (query, documents) in enumerate(queries)])
