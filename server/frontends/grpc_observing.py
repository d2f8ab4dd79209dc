"""The gRPC interceptor that observes every call: request id, tracing span, metrics."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import grpc

from embedrpc.v1 import embedder_pb2 as pb

from .. import tracing
from ..logs import clean_request_id, new_request_id, set_request_id
from ..metrics import Metrics

log = logging.getLogger(__name__)

# A client whose deadline passes cancels its call; our copy of the deadline runs behind
# the client's by the time the call took to reach us (more under load), so a call
# cancelled this close to its deadline is counted as the deadline passing.
DEADLINE_SLACK_S = 0.5


def _code_name(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for member in grpc.StatusCode:
            if member.value[0] == code:
                return member.name
    return "UNKNOWN"


# Requests whose own request_id names the call (else x-request-id, else a new one).
_OWN_REQUEST_ID = (pb.EmbedRequest, pb.RerankRequest, pb.RerankBatchRequest)


class _Call:
    """One RPC being observed: its request id, span, model, and outcome."""

    __slots__ = ("_span_cm", "documents", "embeddings", "method", "metrics", "model",
                 "pairs", "request_id", "span", "started", "tokens", "traced")

    def __init__(self, metrics: Metrics, method: str, names: dict[str, str],
                 metadata: dict[str, str]) -> None:
        """`names`: the span's name and rpc.* attributes (Method.names)."""
        self.metrics = metrics
        self.method = method
        self.started = time.monotonic()
        self.request_id = clean_request_id(metadata.get("x-request-id", "")) or new_request_id()
        self.model = ""
        self.embeddings = 0
        self.tokens = 0
        self.pairs = 0
        self.documents = 0  # of a Rerank or RerankBatch request: the pairs it scores
        self._span_cm = tracing.call_span(names["rpc.full"], metadata, names["attributes"])
        self.span = self._span_cm.__enter__()
        self.traced = self.span is not tracing.NO_SPAN  # else attributes go nowhere
        metrics.call_started(method)  # last: `end` will run only once this returns

    def begin(self, request: Any, model: str) -> None:
        """The call's request (a message, or a stream's iterator) and the model it is
        about ("" for none)."""
        if isinstance(request, _OWN_REQUEST_ID) and \
                (own := clean_request_id(request.request_id)):
            self.request_id = own
        set_request_id(self.request_id)
        self.model = model
        if isinstance(request, pb.RerankRequest):
            self.documents = len(request.documents)
        elif isinstance(request, pb.RerankBatchRequest):
            self.documents = sum(len(r.documents) for r in request.requests)
        if not self.traced:
            return
        self.span.set_attributes({"embedrpc.request_id": self.request_id,
                                  "embedrpc.model": model})
        inputs = getattr(request, "inputs", None)
        if inputs is not None:
            self.span.set_attribute("embedrpc.inputs", len(inputs))
        elif self.documents:
            self.span.set_attribute("embedrpc.inputs", self.documents)

    def response(self, response: Any) -> None:
        if isinstance(response, pb.EmbedResponse) and not response.HasField("error"):
            self.embeddings += response.count
            self.tokens += response.usage.prompt_tokens
        elif isinstance(response, pb.RerankResponse | pb.RerankBatchResponse):
            self.pairs += self.documents
            self.tokens += response.usage.prompt_tokens

    def end(self, context: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
        if isinstance(exc, asyncio.CancelledError):  # the client went away, or its deadline
            remaining = context.time_remaining()
            code = "DEADLINE_EXCEEDED" if remaining is not None \
                and remaining <= DEADLINE_SLACK_S else "CANCELLED"
        elif exc is not None and not isinstance(exc, grpc.aio.AbortError):
            code = "UNKNOWN"  # what gRPC reports for an unhandled exception
        else:  # returned, or aborted: the code the servicer set, if any
            code = "OK" if context.code() is None else _code_name(context.code())
        self.metrics.call_done(self.method, code, time.monotonic() - self.started,
                               embeddings=self.embeddings, tokens=self.tokens,
                               pairs=self.pairs, model=self.model)
        if not self.traced:
            return
        self.span.set_attributes({"rpc.grpc.status_code": grpc.StatusCode[code].value[0],
                                  "embedrpc.embeddings": self.embeddings,
                                  "embedrpc.tokens": self.tokens})
        if self.pairs:
            self.span.set_attribute("embedrpc.pairs", self.pairs)
        if code != "OK":
            self.span.set_error(code, str(context.details() or exc or ""))
        self._span_cm.__exit__(None, None, None)


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every RPC: request id in the logging context, span, request metrics.

    The request id is the EmbedRequest's (or RerankRequest's) `request_id`, else the
    `x-request-id` metadata, else a generated one; the servicer puts it in the response.
    `model_of(method, request)` names the model a call is about (for the span and the
    metrics' model label): a model this server serves, or "".
    """

    def __init__(self, metrics: Metrics, model_of: Callable[[str, Any], str]) -> None:
        self.metrics = metrics
        self.model_of = model_of
        # By method: the handler last wrapped and its wrapping. A servicer's handler is
        # the same object every call, so a call costs a lookup, not a new handler (the
        # key check's refusals are new each time; they are wrapped anew).
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(handler, method)
        if known is not None or len(self._wrapped) < MAX_METHODS:  # methods served: a few
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.request_streaming and handler.response_streaming:
            wrap, make = self._streaming_reply, grpc.stream_stream_rpc_method_handler
            behavior = handler.stream_stream
        elif handler.request_streaming:
            wrap, make = self._unary_reply, grpc.stream_unary_rpc_method_handler
            behavior = handler.stream_unary
        elif handler.response_streaming:
            wrap, make = self._streaming_reply, grpc.unary_stream_rpc_method_handler
            behavior = handler.unary_stream
        else:
            wrap, make = self._unary_reply, grpc.unary_unary_rpc_method_handler
            behavior = handler.unary_unary
        return make(wrap(behavior, method, _names(method)),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    def _unary_reply(self, behavior: Callable[..., Any], method: str,
                     names: dict[str, Any]) -> Callable[..., Any]:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(self.metrics, method, names, _metadata(context))
            call.begin(request, self.model_of(method, request))
            exc: BaseException | None = None
            try:
                response = await behavior(request, context)
                call.response(response)
                return response
            except BaseException as e:
                exc = e
                raise
            finally:
                call.end(context, exc)

        return observed

    def _streaming_reply(self, behavior: Callable[..., Any], method: str,
                         names: dict[str, Any]) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):  # writes with context.write() and returns
            return self._unary_reply(behavior, method, names)

        # The servicer's responses are written here, not by gRPC: a write that fails
        # because the call ended under it (the client cancelled, or its deadline passed,
        # before gRPC heard of it) raises gRPC's ExecuteBatchError, which gRPC, writing
        # them itself, logs as an ERROR with a traceback. Here it ends the call as
        # cancelled, quietly, and is counted by its real cause.
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> None:
            call = _Call(self.metrics, method, names, _metadata(context))
            call.begin(request, self.model_of(method, request))
            exc: BaseException | None = None
            responses: AsyncGenerator[Any, None] = behavior(request, context)
            try:
                async for response in responses:
                    call.response(response)
                    try:
                        await context.write(response)
                    except (asyncio.CancelledError, grpc.aio.AbortError):
                        raise
                    except Exception as e:
                        log.debug("%s: the call ended under a write (%s)", method, e)
                        raise asyncio.CancelledError from e
            except BaseException as e:
                exc = e
                raise
            finally:
                try:
                    await responses.aclose()  # its own clean-up runs now, not at collection
                finally:
                    call.end(context, exc)

        return observed


# Methods whose wrapped handler is kept (every method the server registers fits).
MAX_METHODS = 256


def _names(method: str) -> dict[str, Any]:
    """A method's span name and rpc.* span attributes, worked out once."""
    full = method.lstrip("/")
    service, _, name = full.rpartition("/")
    return {"rpc.full": full, "attributes": {"rpc.system": "grpc", "rpc.service": service,
                                             "rpc.method": name}}


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's text metadata (binary values left out)."""
    return {m.key: m.value for m in context.invocation_metadata() or ()
            if isinstance(m.value, str)}
