"""The Embedder and Reranker servicers: protobuf requests to the cores (server/core.py),
their answers and errors back to protobuf and gRPC status codes. `Cores` says which
model's core serves a request (its `model` field, or the only model of its kind)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
import numpy as np
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from embedrpc.v1 import embedder_pb2 as pb
from embedrpc.v1 import embedder_pb2_grpc as pb_grpc

from ..core import Cores, ModelInfo, Ranking, RerankQuery
from ..errors import EmbedError, InvalidInput, TooLarge
from ..logs import clean_request_id, current_request_id, set_request_id

log = logging.getLogger(__name__)

ENCODINGS = {
    pb.ENCODING_FLOAT: "ENCODING_FLOAT",
    pb.ENCODING_FLOAT32_BYTES: "ENCODING_FLOAT32_BYTES",
    pb.ENCODING_FLOAT16_BYTES: "ENCODING_FLOAT16_BYTES",
    pb.ENCODING_UBINARY: "ENCODING_UBINARY",
}


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request protobuf could not parse (e.g. a string field holding invalid UTF-8).

    grpc answers a request deserializer's exception with UNKNOWN and a traceback in
    the log; parsing leniently lets the servicer answer INVALID_ARGUMENT instead, and
    an EmbedStream answer that one request and go on.
    """

    message: str
    request_id: str = ""  # salvaged from the raw bytes, for EmbedStream bookkeeping


def _explain_decode_error(message_type: type[Message], data: bytes) -> Undecodable:
    """Say which field is wrong: re-read the wire format with no schema (every field
    unknown, kept as raw bytes) and check the string fields' UTF-8 ourselves."""
    name = message_type.DESCRIPTOR.full_name
    try:
        fields = UnknownFieldSet(empty_pb2.Empty.FromString(data))
    except DecodeError:
        return Undecodable(f"the request is not a valid {name}: its protobuf wire format "
                           "is corrupt")
    by_number = message_type.DESCRIPTOR.fields_by_number
    problem, request_id, seen = "", "", dict.fromkeys(by_number, 0)
    for field in fields:
        desc = by_number.get(field.field_number)
        if desc is None or field.wire_type != 2 or desc.type != desc.TYPE_STRING:
            continue
        where = f"{desc.name}[{seen[desc.number]}]" if desc.is_repeated else desc.name
        seen[desc.number] += 1
        try:
            text = field.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            text = field.data.decode("utf-8", errors="replace")
            problem = problem or (f"{where} is not valid UTF-8 ({exc.reason} at byte "
                                  f"{exc.start}); string fields must hold UTF-8 text")
        if desc.name == "request_id":
            request_id = text
    return Undecodable(f"the request is not a valid {name}: "
                       f"{problem or 'protobuf could not parse it'}", request_id)


def lenient_parser(message_type: type[Message]) -> Callable[[bytes], Any]:
    """A request deserializer that returns Undecodable instead of raising."""
    def parse(data: bytes) -> Message | Undecodable:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return _explain_decode_error(message_type, data)

    return parse


def encode_vectors(vectors: np.ndarray, encoding: int, response: pb.EmbedResponse) -> None:
    """Write [n, d] float32 vectors into the response in the requested encoding."""
    if encoding == pb.ENCODING_FLOAT:
        # .tolist() rows fill `repeated float` ~4x faster than numpy rows do.
        response.embeddings.extend(pb.Embedding(values=row) for row in vectors.tolist())
    elif encoding == pb.ENCODING_FLOAT32_BYTES:
        response.data = vectors.astype("<f4", copy=False).tobytes()
    elif encoding == pb.ENCODING_FLOAT16_BYTES:
        response.data = vectors.astype("<f2").tobytes()
    else:  # ENCODING_UBINARY, checked by validation
        response.data = np.packbits(vectors > 0, axis=1).tobytes()


Reply = TypeVar("Reply", pb.EmbedResponse, pb.TokenizeResponse, pb.RerankResponse,
                pb.RerankBatchResponse)


def call_over(context: grpc.aio.ServicerContext) -> bool:
    """The call has ended already: its deadline passed, or the client cancelled it."""
    remaining = context.time_remaining()
    return context.done() or (remaining is not None and remaining <= 0)


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode,
                message: str) -> NoReturn:
    """End the call with `code`, or, when it has ended already (no one to answer: grpc
    would raise on the status it cannot send, log a traceback and count it UNKNOWN),
    as a cancelled call, which grpc ends quietly and the interceptor counts by its
    real cause (DEADLINE_EXCEEDED or CANCELLED)."""
    if call_over(context):
        raise asyncio.CancelledError
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise
    except Exception:  # the call ended between the check and the status (ExecuteBatchError)
        raise asyncio.CancelledError from None
    raise AssertionError("unreachable")  # abort() raises


def describe_model(info: ModelInfo) -> pb.ModelDescription:
    """One model of InfoResponse.models."""
    description = pb.ModelDescription(name=info.model, task=info.task,
                                      max_length=info.max_length, precision=info.precision)
    if info.task == "embed":
        description.dimensions = info.dimensions
    return description


def info_message(info: ModelInfo, models: list[ModelInfo] | None = None) -> pb.InfoResponse:
    """A core's ModelInfo as the Info RPC's reply; `models`: every model served."""
    reply = pb.InfoResponse(**{f.name: getattr(info, f.name)
                               for f in dataclasses.fields(info)})
    reply.models.extend(describe_model(m) for m in (models or [info]))
    return reply


def _client(cores: Cores, context: grpc.aio.ServicerContext) -> str:
    """Who calls (core.client_of): the API key, else the connection."""
    authorization = next((m.value for m in context.invocation_metadata() or ()
                          if m.key == "authorization" and isinstance(m.value, str)), None)
    return cores.client_of(authorization, context.peer())


def _fits(response: Reply, limit: int, advice: str) -> Reply:
    """gRPC fails a call whose response is over its limit (and with it a whole
    EmbedStream) with a bare "Sent message larger than max"; say so for this one
    request instead, and what would fit."""
    if (size := response.ByteSize()) > limit:
        raise TooLarge(f"the response would be {size} bytes, over the server's "
                       f"--max-message-bytes {limit}; send fewer inputs per request, "
                       f"{advice}")
    return response


class EmbedderService(pb_grpc.EmbedderServicer):
    """The Embedder RPCs: each maps its protobuf request to a model's core and back."""

    def __init__(self, cores: Cores) -> None:
        self.cores = cores
        self.limits = cores.first.limits
        self._infos: dict[str, pb.InfoResponse] | None = None  # once every model is warm

    @property
    def infos(self) -> dict[str, pb.InfoResponse]:
        """Each model's Info reply; UNAVAILABLE ("still loading") during the warm-up."""
        if self._infos is None:
            models = [c.info for c in self.cores.cores]
            self._infos = {c.name: info_message(c.info, models) for c in self.cores.cores}
        return self._infos

    @property
    def active(self) -> int:
        """Calls in flight in the cores (this front end's and HTTP's)."""
        return self.cores.active

    def client(self, context: grpc.aio.ServicerContext) -> str:
        return _client(self.cores, context)

    async def embed(self, request: pb.EmbedRequest | Undecodable,
                    time_remaining: float | None, client: str = "") -> pb.EmbedResponse:
        """One EmbedRequest → EmbedResponse; raises EmbedError."""
        if isinstance(request, Undecodable):
            raise InvalidInput(request.message)
        with self.cores.call():
            # The request's own id if it is plain (like the x-request-id header: it goes
            # into logs), else the call's (x-request-id metadata, or generated).
            request_id = clean_request_id(request.request_id) or current_request_id()
            set_request_id(request_id)  # for every log record of this request
            core = self.cores.embedder(request.model)
            if request.encoding not in ENCODINGS:
                raise InvalidInput(f"encoding={request.encoding} is unknown; use one of "
                                   f"{', '.join(f'{v} ({k})' for k, v in ENCODINGS.items())}")
            deadline = None if time_remaining is None else time.monotonic() + time_remaining
            result = await core.embed(
                request.inputs, dimensions=request.dimensions or None,  # proto3: 0 is unset
                normalize=request.normalize if request.HasField("normalize") else True,
                prompt_name=request.prompt_name, instruction=request.instruction,
                truncate=request.truncate, deadline=deadline, client=client)
            response = pb.EmbedResponse(
                request_id=request_id, dimensions=result.vectors.shape[1],
                encoding=request.encoding, count=len(result.vectors),
                usage=pb.Usage(prompt_tokens=result.prompt_tokens,
                               truncated_inputs=result.truncated_inputs), model=core.name)
            encode_vectors(result.vectors, request.encoding, response)
            return response

    def _fits(self, response: Reply, advice: str = "ask for fewer dimensions, or use a "
              "byte encoding") -> Reply:
        return _fits(response, self.limits.max_message_bytes, advice)

    # -- RPCs --------------------------------------------------------------

    async def Embed(self, request: pb.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        try:
            return self._fits(await self.embed(request, context.time_remaining(),
                                               self.client(context)))
        except EmbedError as exc:
            await abort(context, exc.grpc_code, str(exc))
        except Exception as exc:
            log.exception("Embed failed")
            await abort(context, grpc.StatusCode.INTERNAL, f"internal error: {exc}")
        raise AssertionError("unreachable")  # abort() raises

    async def _embed_or_error(self, request: pb.EmbedRequest | Undecodable,
                              time_remaining: float | None, client: str) -> pb.EmbedResponse:
        try:
            return self._fits(await self.embed(request, time_remaining, client))
        except EmbedError as exc:
            code, message = exc.grpc_code, str(exc)
        except Exception as exc:
            log.exception("EmbedStream request failed")
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {exc}"
        return pb.EmbedResponse(request_id=clean_request_id(request.request_id)
                                or current_request_id(),
                                encoding=getattr(request, "encoding", pb.ENCODING_FLOAT),
                                error=pb.Status(code=code.value[0], message=message))

    async def EmbedStream(self, request_iterator: AsyncIterator[pb.EmbedRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.EmbedResponse]:
        # Requests run concurrently; responses leave in request order. The bounded
        # queue is the flow control: when the client stops reading, we stop reading too.
        window = asyncio.Semaphore(self.limits.stream_window)
        pending: asyncio.Queue[asyncio.Task[pb.EmbedResponse] | None] = asyncio.Queue()
        tasks: set[asyncio.Task[pb.EmbedResponse]] = set()
        client = self.client(context)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()  # a slot frees when its response is sent
                    task = asyncio.create_task(
                        self._embed_or_error(request, context.time_remaining(), client))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    pending.put_nowait(task)
            finally:
                pending.put_nowait(None)  # never blocks, even when cancelled

        reader = asyncio.create_task(read())
        try:
            while (task := await pending.get()) is not None:
                yield await task
                window.release()
            await reader  # re-raises a failed read (e.g. the client broke the stream)
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def Tokenize(self, request: pb.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        with self.cores.call():  # in flight until its reply is built: a stop waits for it
            try:
                if isinstance(request, Undecodable):
                    raise InvalidInput(request.message)
                core = self.cores.embedder(request.model)
                encoded = await core.tokenize(
                    request.inputs, prompt_name=request.prompt_name,
                    instruction=request.instruction, truncate=request.truncate)
                response = pb.TokenizeResponse(usage=pb.Usage(
                    prompt_tokens=encoded.total_tokens,
                    truncated_inputs=sum(encoded.truncated)))
                for ids, truncated in zip(encoded.ids, encoded.truncated, strict=True):
                    item = response.inputs.add(ids=ids.tolist(), truncated=truncated)
                    if request.return_tokens:
                        item.tokens.extend(core.encoder.tokens(ids))
                return self._fits(response, "or leave return_tokens off")
            except EmbedError as exc:
                await abort(context, exc.grpc_code, str(exc))
                raise AssertionError("unreachable") from exc

    async def Info(self, request: pb.InfoRequest,
                   context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        if isinstance(request, Undecodable):
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            return self.infos[self.cores.named(request.model).name]
        except EmbedError as exc:
            await abort(context, exc.grpc_code, str(exc))
            raise AssertionError("unreachable") from exc


def add_embedder_to_server(service: EmbedderService, server: grpc.aio.Server) -> None:
    """Register the servicer as the generated add_EmbedderServicer_to_server does, but
    with lenient_parser: an undecodable request gets INVALID_ARGUMENT, not UNKNOWN."""
    embed_in, embed_out = lenient_parser(pb.EmbedRequest), pb.EmbedResponse.SerializeToString
    handlers = {
        "Embed": grpc.unary_unary_rpc_method_handler(
            service.Embed, request_deserializer=embed_in, response_serializer=embed_out),
        "EmbedStream": grpc.stream_stream_rpc_method_handler(
            service.EmbedStream, request_deserializer=embed_in, response_serializer=embed_out),
        "Tokenize": grpc.unary_unary_rpc_method_handler(
            service.Tokenize, request_deserializer=lenient_parser(pb.TokenizeRequest),
            response_serializer=pb.TokenizeResponse.SerializeToString),
        "Info": grpc.unary_unary_rpc_method_handler(
            service.Info, request_deserializer=lenient_parser(pb.InfoRequest),
            response_serializer=pb.InfoResponse.SerializeToString),
    }
    descriptor = pb.DESCRIPTOR.services_by_name["Embedder"]
    if set(handlers) != set(descriptor.methods_by_name):  # the proto gained an RPC
        raise RuntimeError(f"add_embedder_to_server serves {sorted(handlers)}; "
                           f"the proto has {sorted(descriptor.methods_by_name)}")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
    server.add_registered_method_handlers(descriptor.full_name, handlers)


# -- Reranker -----------------------------------------------------------------------


def ranking_message(ranking: Ranking, documents: Any, *, return_documents: bool,
                    request_id: str, model: str) -> pb.RerankResponse:
    """A core's Ranking as a RerankResponse: results best first."""
    response = pb.RerankResponse(request_id=request_id, model=model, usage=pb.Usage(
        prompt_tokens=ranking.prompt_tokens, truncated_inputs=ranking.truncated_inputs))
    order = ranking.order.tolist()
    scores = ranking.scores[ranking.order].tolist()
    if return_documents:
        response.results.extend(pb.RerankResult(index=i, score=s, document=documents[i])
                                for i, s in zip(order, scores, strict=True))
    else:
        response.results.extend(pb.RerankResult(index=i, score=s)
                                for i, s in zip(order, scores, strict=True))
    return response


def rerank_query(request: pb.RerankRequest) -> RerankQuery:
    return RerankQuery(query=request.query, documents=request.documents,
                       instruction=request.instruction, top_n=request.top_n,
                       truncate=request.truncate)


class RerankerService(pb_grpc.RerankerServicer):
    """The Reranker RPCs: each maps its protobuf request to a reranker's core and back."""

    def __init__(self, cores: Cores) -> None:
        self.cores = cores
        self.limits = cores.first.limits

    async def Rerank(self, request: pb.RerankRequest | Undecodable,
                     context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        try:
            if isinstance(request, Undecodable):
                raise InvalidInput(request.message)
            with self.cores.call():
                request_id = clean_request_id(request.request_id) or current_request_id()
                set_request_id(request_id)
                core = self.cores.reranker(request.model)
                remaining = context.time_remaining()
                ranking = await core.rerank(
                    request.query, request.documents, instruction=request.instruction,
                    top_n=request.top_n, truncate=request.truncate,
                    deadline=None if remaining is None else time.monotonic() + remaining,
                    client=_client(self.cores, context))
                return _fits(ranking_message(ranking, request.documents,
                                             return_documents=request.return_documents,
                                             request_id=request_id, model=core.name),
                             self.limits.max_message_bytes, "or leave return_documents off")
        except EmbedError as exc:
            await abort(context, exc.grpc_code, str(exc))
        except Exception as exc:
            log.exception("Rerank failed")
            await abort(context, grpc.StatusCode.INTERNAL, f"internal error: {exc}")
        raise AssertionError("unreachable")  # abort() raises

    async def RerankBatch(self, request: pb.RerankBatchRequest | Undecodable,
                          context: grpc.aio.ServicerContext) -> pb.RerankBatchResponse:
        try:
            if isinstance(request, Undecodable):
                raise InvalidInput(request.message)
            with self.cores.call():
                request_id = clean_request_id(request.request_id) or current_request_id()
                set_request_id(request_id)
                names = {r.model for r in request.requests}
                if len(names) > 1:
                    raise InvalidInput(
                        "the requests of one RerankBatch name different models ("
                        f"{', '.join(repr(n[:100]) for n in sorted(names))}); give them all "
                        "the same model, or send one batch per model", field="model")
                core = self.cores.reranker(names.pop() if names else "")
                remaining = context.time_remaining()
                rankings = await core.rerank_many(
                    [rerank_query(r) for r in request.requests],
                    deadline=None if remaining is None else time.monotonic() + remaining,
                    client=_client(self.cores, context))
                response = pb.RerankBatchResponse(request_id=request_id, model=core.name,
                                                  usage=pb.Usage(
                    prompt_tokens=sum(r.prompt_tokens for r in rankings),
                    truncated_inputs=sum(r.truncated_inputs for r in rankings)))
                response.responses.extend(
                    ranking_message(ranking, r.documents, return_documents=r.return_documents,
                                    request_id=clean_request_id(r.request_id),
                                    model=core.name)
                    for r, ranking in zip(request.requests, rankings, strict=True))
                return _fits(response, self.limits.max_message_bytes,
                             "or leave return_documents off")
        except EmbedError as exc:
            await abort(context, exc.grpc_code, str(exc))
        except Exception as exc:
            log.exception("RerankBatch failed")
            await abort(context, grpc.StatusCode.INTERNAL, f"internal error: {exc}")
        raise AssertionError("unreachable")  # abort() raises


def add_reranker_to_server(service: RerankerService, server: grpc.aio.Server) -> None:
    """Register the servicer as the generated add_RerankerServicer_to_server does, with
    lenient_parser (an undecodable request gets INVALID_ARGUMENT, not UNKNOWN)."""
    handlers = {
        "Rerank": grpc.unary_unary_rpc_method_handler(
            service.Rerank, request_deserializer=lenient_parser(pb.RerankRequest),
            response_serializer=pb.RerankResponse.SerializeToString),
        "RerankBatch": grpc.unary_unary_rpc_method_handler(
            service.RerankBatch, request_deserializer=lenient_parser(pb.RerankBatchRequest),
            response_serializer=pb.RerankBatchResponse.SerializeToString),
    }
    descriptor = pb.DESCRIPTOR.services_by_name["Reranker"]
    if set(handlers) != set(descriptor.methods_by_name):  # the proto gained an RPC
        raise RuntimeError(f"add_reranker_to_server serves {sorted(handlers)}; "
                           f"the proto has {sorted(descriptor.methods_by_name)}")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
    server.add_registered_method_handlers(descriptor.full_name, handlers)
