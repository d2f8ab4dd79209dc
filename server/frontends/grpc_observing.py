"""The gRPC interceptor that observes every call: request id, tracing span, metrics."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from embedrpc.v1 import embedder_pb2 as pb

from .. import tracing
from ..logs import clean_request_id, new_request_id, set_request_id
from ..metrics import Metrics

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


class _Call:
    """One RPC being observed: its request id, span, and outcome."""

    __slots__ = ("_span_cm", "embeddings", "method", "metrics", "request_id", "span",
                 "started", "tokens")

    def __init__(self, metrics: Metrics, model: str, method: str,
                 metadata: dict[str, str]) -> None:
        self.metrics = metrics
        self.method = method
        self.started = time.monotonic()
        self.request_id = clean_request_id(metadata.get("x-request-id", "")) or new_request_id()
        self.embeddings = 0
        self.tokens = 0
        service, _, name = method.lstrip("/").rpartition("/")
        self._span_cm = tracing.call_span(method.lstrip("/"), metadata, {
            "rpc.system": "grpc", "rpc.service": service, "rpc.method": name,
            "embedrpc.model": model})
        self.span = self._span_cm.__enter__()
        metrics.call_started(method)  # last: `end` will run only once this returns

    def begin(self, request: Any) -> None:
        if isinstance(request, pb.EmbedRequest) and (own := clean_request_id(request.request_id)):
            self.request_id = own
        set_request_id(self.request_id)
        self.span.set_attribute("embedrpc.request_id", self.request_id)
        inputs = getattr(request, "inputs", None)
        if inputs is not None:
            self.span.set_attribute("embedrpc.inputs", len(inputs))

    def response(self, response: Any) -> None:
        if isinstance(response, pb.EmbedResponse) and not response.HasField("error"):
            self.embeddings += response.count
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
                               embeddings=self.embeddings, tokens=self.tokens)
        self.span.set_attributes({"rpc.grpc.status_code": grpc.StatusCode[code].value[0],
                                  "embedrpc.embeddings": self.embeddings,
                                  "embedrpc.tokens": self.tokens})
        if code != "OK":
            self.span.set_error(code, str(context.details() or exc or ""))
        self._span_cm.__exit__(None, None, None)


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every RPC: request id in the logging context, span, request metrics.

    The request id is the EmbedRequest's `request_id`, else the `x-request-id`
    metadata, else a generated one; the servicer puts it in the response.
    """

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.metrics = metrics
        self.model = model

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        metadata = {m.key: m.value for m in handler_call_details.invocation_metadata or ()
                    if isinstance(m.value, str)}
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
        return make(wrap(behavior, method, metadata),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    def _unary_reply(self, behavior: Callable[..., Any], method: str,
                     metadata: dict[str, str]) -> Callable[..., Any]:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(self.metrics, self.model, method, metadata)
            call.begin(request)
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
                         metadata: dict[str, str]) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):  # writes with context.write() and returns
            return self._unary_reply(behavior, method, metadata)

        async def observed(request: Any, context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[Any]:
            call = _Call(self.metrics, self.model, method, metadata)
            call.begin(request)
            exc: BaseException | None = None
            try:
                async for response in behavior(request, context):
                    call.response(response)
                    yield response
            except BaseException as e:
                exc = e
                raise
            finally:
                call.end(context, exc)

        return observed
