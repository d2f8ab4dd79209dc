"""A no-op Embedder server (`embedrpc bench --noop-server PORT`): answers at once with
zero vectors, so a run against it measures the harness's own ceiling."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import grpc

from embedrpc import __version__
from embedrpc.v1 import embedder_pb2 as pb

from ..client import DEFAULT_OPTIONS
from .options import BenchError


class NoopEmbedder:
    """Answers Embed and EmbedStream at once with zero vectors, tokenizing nothing.

    usage.prompt_tokens is an estimate (UTF-8 characters / 4 + 1 per input), so
    tokens/s figures against it are indicative only.
    """

    def __init__(self, dimensions: int = 1024, *, delay: float = 0.0) -> None:
        self.dimensions = dimensions
        self.delay = delay  # seconds before each answer (tests of the harness's timing)
        self._bodies: dict[tuple[int, int, int], bytes] = {}

    def answer(self, request: pb.EmbedRequest) -> bytes:
        n = len(request.inputs)
        d = request.dimensions or self.dimensions
        key = (n, d, request.encoding)
        body = self._bodies.get(key)
        if body is None:
            response = pb.EmbedResponse(dimensions=d, encoding=request.encoding, count=n)
            if request.encoding == pb.ENCODING_FLOAT:
                for _ in range(n):
                    response.embeddings.add().values.extend([0.0] * d)
            else:
                row = {pb.ENCODING_FLOAT16_BYTES: 2 * d,
                       pb.ENCODING_UBINARY: (d + 7) // 8}.get(request.encoding, 4 * d)
                response.data = bytes(row * n)
            body = response.SerializeToString()
            if len(self._bodies) < 4096:
                self._bodies[key] = body
        tokens = sum(len(text) for text in request.inputs) // 4 + n
        # Concatenated messages merge: the cached vectors plus this request's fields.
        return body + pb.EmbedResponse(request_id=request.request_id,
                                       usage=pb.Usage(prompt_tokens=tokens)).SerializeToString()

    async def embed(self, request: pb.EmbedRequest, context: Any) -> bytes:
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.answer(request)

    async def embed_stream(self, requests: Any, context: Any) -> Any:
        async for request in requests:
            if self.delay:
                await asyncio.sleep(self.delay)
            yield self.answer(request)

    async def info(self, request: pb.InfoRequest, context: Any) -> pb.InfoResponse:
        return pb.InfoResponse(model="noop", dimensions=self.dimensions, min_dimensions=1,
                               max_length=8192, prompt_names=["query"], pooling="none",
                               precision="float32", devices=["none"], version=__version__,
                               max_inputs=1 << 20, workers=0)

    def handler(self) -> grpc.GenericRpcHandler:
        request = pb.EmbedRequest.FromString
        return grpc.method_handlers_generic_handler("embedrpc.v1.Embedder", {
            "Embed": grpc.unary_unary_rpc_method_handler(
                self.embed, request_deserializer=request, response_serializer=None),
            "EmbedStream": grpc.stream_stream_rpc_method_handler(
                self.embed_stream, request_deserializer=request, response_serializer=None),
            "Info": grpc.unary_unary_rpc_method_handler(
                self.info, request_deserializer=pb.InfoRequest.FromString,
                response_serializer=pb.InfoResponse.SerializeToString),
        })


async def start_noop_server(port: int = 0, *, host: str = "127.0.0.1", dimensions: int = 1024,
                            delay: float = 0.0) -> tuple[grpc.aio.Server, int]:
    """Start a NoopEmbedder server; returns (server, bound port)."""
    # No SO_REUSEPORT: a second server on a busy port must fail, not share the load.
    server = grpc.aio.server(options=(*DEFAULT_OPTIONS, ("grpc.so_reuseport", 0)))
    server.add_generic_rpc_handlers((NoopEmbedder(dimensions, delay=delay).handler(),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc raises this when the address cannot be bound
        bound = 0
    if bound == 0:
        raise BenchError(f"cannot listen on {host}:{port} (port in use?)")
    await server.start()
    return server, bound


def serve_noop(port: int, *, dimensions: int = 1024) -> int:
    """`embedrpc bench --noop-server PORT`: serve until SIGINT or SIGTERM."""
    if not 0 <= port <= 65535 or dimensions < 1:
        print("embedrpc bench: --noop-server takes a port 0..65535 (0: any free port) and "
              "--noop-dimensions >= 1", file=sys.stderr)
        return 2

    async def main() -> None:
        server, bound = await start_noop_server(port, dimensions=dimensions)
        print(f"no-op Embedder listening on 127.0.0.1:{bound} ({dimensions} dims); "
              "Ctrl-C stops it", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(None)

    try:
        asyncio.run(main())
    except BenchError as exc:
        print(f"embedrpc bench: {exc}", file=sys.stderr)
        return 1
    return 0
