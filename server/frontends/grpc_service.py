"""The Embedder servicer: validate → prompt → tokenize → router → encode the response."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from embedrpc.v1 import embedder_pb2 as pb
from embedrpc.v1 import embedder_pb2_grpc as pb_grpc

from ..config import ServiceLimits
from ..errors import EmbedError, InvalidInput, TooLarge
from ..logs import current_request_id, set_request_id
from ..model import ModelSpec
from ..pooling import finish
from ..router import Router
from ..tokenizer import Encoded, TextEncoder

log = logging.getLogger(__name__)

# Tokenizing more text than this per request happens off the event loop.
_INLINE_TOKENIZE_CHARS = 16_384
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


class EmbedderService(pb_grpc.EmbedderServicer):
    def __init__(self, *, spec: ModelSpec, encoder: TextEncoder, router: Router,
                 limits: ServiceLimits, info: pb.InfoResponse) -> None:
        self.spec = spec
        self.encoder = encoder
        self.router = router
        self.limits = limits
        self.info = info
        self.active = 0  # embed requests being served (graceful shutdown waits for them)

    # -- validation and tokenization ---------------------------------------

    def _check_inputs(self, inputs: Sequence[str]) -> None:
        n = len(inputs)
        if n == 0:
            raise InvalidInput(f"inputs is empty; send 1 to {self.limits.max_inputs} texts")
        if n > self.limits.max_inputs:
            raise InvalidInput(f"{n} inputs in one request; at most {self.limits.max_inputs} "
                               "are allowed (split the request, or use EmbedStream)")

    def _dimensions(self, requested: int) -> int:
        full = self.spec.hidden_size
        if requested == 0:
            return full
        if not self.spec.min_dimensions <= requested <= full:
            raise InvalidInput(f"dimensions={requested} is out of range; use 0 (full, {full}) "
                               f"or {self.spec.min_dimensions}..{full}")
        return requested

    async def _tokenize(self, inputs: list[str], prompt_name: str, instruction: str,
                        truncate: int) -> Encoded:
        prompt = self.encoder.prompt_for(prompt_name, instruction)
        texts = list(inputs)
        if sum(map(len, texts)) <= _INLINE_TOKENIZE_CHARS:
            return self.encoder.encode(texts, prompt=prompt, truncate=truncate)
        return await asyncio.to_thread(self.encoder.encode, texts, prompt=prompt,
                                       truncate=truncate)

    async def embed(self, request: pb.EmbedRequest | Undecodable,
                    time_remaining: float | None) -> pb.EmbedResponse:
        """One EmbedRequest → EmbedResponse; raises EmbedError."""
        if isinstance(request, Undecodable):
            raise InvalidInput(request.message)
        self.active += 1
        try:
            return await self._embed(request, time_remaining)
        finally:
            self.active -= 1

    async def _embed(self, request: pb.EmbedRequest,
                     time_remaining: float | None) -> pb.EmbedResponse:
        started = time.monotonic()
        deadline = None if time_remaining is None else started + time_remaining
        # The request's own id, else the call's (x-request-id metadata, or generated).
        request_id = request.request_id or current_request_id()
        set_request_id(request_id)  # for every log record of this request
        self._check_inputs(request.inputs)
        dimensions = self._dimensions(request.dimensions)
        if request.encoding not in ENCODINGS:
            raise InvalidInput(f"encoding={request.encoding} is unknown; use one of "
                               f"{', '.join(f'{v} ({k})' for k, v in ENCODINGS.items())}")
        normalize = request.normalize if request.HasField("normalize") else True
        encoded = await self._tokenize(request.inputs, request.prompt_name,
                                       request.instruction, request.truncate)
        vectors = await self.router.embed(encoded.ids, deadline=deadline)
        response = pb.EmbedResponse(
            request_id=request_id,
            dimensions=dimensions,
            encoding=request.encoding,
            count=len(encoded.ids),
            usage=pb.Usage(prompt_tokens=encoded.total_tokens,
                           truncated_inputs=sum(encoded.truncated)),
        )
        encode_vectors(finish(vectors, dimensions, normalize), request.encoding, response)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("embed inputs=%d tokens=%d dimensions=%d %.1f ms",
                      len(encoded.ids), encoded.total_tokens, dimensions,
                      (time.monotonic() - started) * 1000)
        return response

    def _fits(self, response: pb.EmbedResponse) -> pb.EmbedResponse:
        """gRPC fails a call whose response is over its limit, and with it a whole
        EmbedStream; say so for this one request instead, and what would fit."""
        if (size := response.ByteSize()) > self.limits.max_message_bytes:
            raise TooLarge(f"the response would be {size} bytes, over the server's "
                           f"--max-message-bytes {self.limits.max_message_bytes}; send fewer "
                           "inputs per request, ask for fewer dimensions, or use a byte encoding")
        return response

    # -- RPCs --------------------------------------------------------------

    async def Embed(self, request: pb.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        try:
            return self._fits(await self.embed(request, context.time_remaining()))
        except EmbedError as exc:
            await context.abort(exc.grpc_code, str(exc))
        except Exception as exc:
            log.exception("Embed failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
        raise AssertionError("unreachable")  # abort() raises

    async def _embed_or_error(self, request: pb.EmbedRequest | Undecodable,
                              time_remaining: float | None) -> pb.EmbedResponse:
        try:
            return self._fits(await self.embed(request, time_remaining))
        except EmbedError as exc:
            code, message = exc.grpc_code, str(exc)
        except Exception as exc:
            log.exception("EmbedStream request failed")
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {exc}"
        return pb.EmbedResponse(request_id=request.request_id or current_request_id(),
                                encoding=getattr(request, "encoding", pb.ENCODING_FLOAT),
                                error=pb.Status(code=code.value[0], message=message))

    async def EmbedStream(self, request_iterator: AsyncIterator[pb.EmbedRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.EmbedResponse]:
        # Requests run concurrently; responses leave in request order. The bounded
        # queue is the flow control: when the client stops reading, we stop reading too.
        window = asyncio.Semaphore(self.limits.stream_window)
        pending: asyncio.Queue[asyncio.Task[pb.EmbedResponse] | None] = asyncio.Queue()
        tasks: set[asyncio.Task[pb.EmbedResponse]] = set()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()  # a slot frees when its response is sent
                    task = asyncio.create_task(
                        self._embed_or_error(request, context.time_remaining()))
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
        try:
            if isinstance(request, Undecodable):
                raise InvalidInput(request.message)
            self._check_inputs(request.inputs)
            encoded = await self._tokenize(request.inputs, request.prompt_name,
                                           request.instruction, request.truncate)
        except EmbedError as exc:
            await context.abort(exc.grpc_code, str(exc))
            raise AssertionError("unreachable") from exc
        response = pb.TokenizeResponse(usage=pb.Usage(
            prompt_tokens=encoded.total_tokens, truncated_inputs=sum(encoded.truncated)))
        for ids, truncated in zip(encoded.ids, encoded.truncated, strict=True):
            item = response.inputs.add(ids=ids.tolist(), truncated=truncated)
            if request.return_tokens:
                item.tokens.extend(self.encoder.tokens(ids))
        return response

    async def Info(self, request: pb.InfoRequest,
                   context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return self.info


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
