"""The design at its barest: an Embedder server built as embedrpc is, with nothing else.

    python benchmarks/bare_server.py --port 50099 --model-dir DIR   # DIR/tokenizer.json

frontend_bench.py runs it beside the no-op floor and embedrpc (issue 13). It answers the
question the floor cannot: what does a server of this design (ARCHITECTURE.md: a grpc.aio
front end that tokenizes, and a device worker in a process of its own, reached over a
socket) cost at the least, before any of what makes it a product?

What it does, per call: parse the EmbedRequest (grpc), tokenize the texts with the model's
tokenizer (tokenizers' encode_batch_fast, as embedrpc does, with truncation at the model's
max length and its end token appended when the tokenizer does not add it), queue them; once
per event-loop turn, the queued requests go to the worker as one batch (at most 64 rows,
requests never split; at most two batches at the worker, as embedrpc's worker slots),
framed as raw int32 arrays. The worker process computes embedrpc's fake-backend vectors
(`fake_vectors`, the same per-batch work as `--backend fake`) and writes them back as raw
float32. The front end L2-normalises each request's rows (`pooling.finish`) and answers
with float32 bytes.

What it leaves out is everything else embedrpc does: validation and limits, prompts,
fair share between clients, length-sorted token-budget batches, deadlines and
cancellation, crash recovery, metrics, request ids, tracing, health, keys and TLS. So
its cost is a lower bound for any server of this design in Python, not a competitor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import signal
import socket
import struct
import sys
from collections import deque
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from embedrpc.client.client import DEFAULT_OPTIONS
from embedrpc.server.pooling import finish
from embedrpc.server.worker.backends import fake_vectors
from embedrpc.v1 import embedder_pb2 as pb

MAX_ROWS = 64  # per batch (embedrpc's --max-batch-size default)
IN_FLIGHT = 2  # batches at the worker at once (embedrpc's two slots per worker)
_HEADER = struct.Struct("!ii")  # request: rows, ids; reply: rows, hidden size


def _read_exactly(sock: socket.socket, n: int) -> bytearray | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            return None
        got += k
    return buf


def worker_main(sock: socket.socket, hidden: int) -> None:
    """The device worker: batches in, fake-backend vectors out, until the socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while (header := _read_exactly(sock, _HEADER.size)) is not None:
        rows, total = _HEADER.unpack(header)
        body = _read_exactly(sock, 4 * (rows + total))
        if body is None:
            return
        lengths = np.frombuffer(body, np.int32, rows)
        ids = np.frombuffer(body, np.int32, total, 4 * rows)
        vectors = fake_vectors(ids, lengths, hidden)
        sock.sendall(_HEADER.pack(rows, hidden) + vectors.tobytes())


class BareFrontEnd:
    def __init__(self, model_dir: Path, sock: socket.socket) -> None:
        from tokenizers import Tokenizer

        config = json.loads((model_dir / "config.json").read_text())
        self.hidden = int(config["hidden_size"])
        tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
        max_length = int(tokenizer_config.get("model_max_length")
                         or config.get("max_position_embeddings", 8192))
        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        eos = int(config.get("eos_token_id", 151643))
        self.append = [eos] if self.tok.encode("a").ids[-1:] != [eos] else []
        self.tok.enable_truncation(max_length - len(self.append))
        self.sock = sock
        sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._readable)
        self.waiting: deque[tuple[asyncio.Future[np.ndarray], list[np.ndarray]]] = deque()
        # At the worker: each batch's requests, as (future, rows).
        self.sent: deque[list[tuple[asyncio.Future[np.ndarray], int]]] = deque()
        self.scheduled = False
        self.inbuf = bytearray()

    async def embed(self, request: pb.EmbedRequest, context: Any) -> pb.EmbedResponse:
        encodings = self.tok.encode_batch_fast(list(request.inputs))
        ids = [np.array([*e.ids, *self.append], dtype=np.int32) for e in encodings]
        future = self.loop.create_future()
        self.waiting.append((future, ids))
        self._schedule()
        dims = request.dimensions or self.hidden
        vectors = finish(await future, dims, True)
        return pb.EmbedResponse(
            data=vectors.tobytes(), dimensions=dims, encoding=pb.ENCODING_FLOAT32_BYTES,
            count=len(ids), request_id=request.request_id,
            usage=pb.Usage(prompt_tokens=sum(map(len, ids))))

    def _schedule(self) -> None:
        if not self.scheduled and len(self.sent) < IN_FLIGHT:
            self.scheduled = True
            self.loop.call_soon(self._send)

    def _send(self) -> None:
        """What waits now goes to the worker as one batch."""
        self.scheduled = False
        futures: list[tuple[asyncio.Future[np.ndarray], int]] = []
        arrays: list[np.ndarray] = []
        while self.waiting and (not arrays or len(arrays) + len(self.waiting[0][1]) <= MAX_ROWS):
            future, ids = self.waiting.popleft()
            futures.append((future, len(ids)))
            arrays += ids
        if not arrays:
            return
        lengths = np.fromiter(map(len, arrays), np.int32, len(arrays))
        flat = np.concatenate(arrays)
        self.sent.append(futures)
        self.sock.setblocking(True)  # a bare server: a batch is written whole
        self.sock.sendall(_HEADER.pack(len(arrays), len(flat)) + lengths.tobytes()
                          + flat.tobytes())
        self.sock.setblocking(False)
        if self.waiting:  # more than one batch's worth
            self._schedule()

    def _readable(self) -> None:
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        if not data:
            self.loop.remove_reader(self.sock.fileno())
            return
        self.inbuf += data
        while len(self.inbuf) >= _HEADER.size:
            rows, hidden = _HEADER.unpack_from(self.inbuf)
            end = _HEADER.size + 4 * rows * hidden
            if len(self.inbuf) < end:
                return
            vectors = np.frombuffer(self.inbuf, np.float32, rows * hidden,
                                    _HEADER.size).reshape(rows, hidden).copy()
            del self.inbuf[:end]
            start = 0
            for future, n in self.sent.popleft():
                if not future.done():
                    future.set_result(vectors[start:start + n])
                start += n
            if self.waiting:
                self._schedule()


async def serve(port: int, host: str, model_dir: Path) -> None:
    front_sock, worker_sock = socket.socketpair()
    config = json.loads((model_dir / "config.json").read_text())
    worker = mp.get_context("spawn").Process(
        target=worker_main, args=(worker_sock, int(config["hidden_size"])), daemon=True)
    worker.start()
    worker_sock.close()
    front = BareFrontEnd(model_dir, front_sock)
    server = grpc.aio.server(options=(*DEFAULT_OPTIONS, ("grpc.so_reuseport", 0)))

    async def info(request: pb.InfoRequest, context: Any) -> pb.InfoResponse:
        return pb.InfoResponse(model="bare", dimensions=front.hidden)

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "embedrpc.v1.Embedder", {
            "Embed": grpc.unary_unary_rpc_method_handler(
                front.embed, request_deserializer=pb.EmbedRequest.FromString,
                response_serializer=pb.EmbedResponse.SerializeToString),
            "Info": grpc.unary_unary_rpc_method_handler(
                info, request_deserializer=pb.InfoRequest.FromString,
                response_serializer=pb.InfoResponse.SerializeToString),
        }),))
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise SystemExit(f"bare_server: cannot listen on {host}:{port}")
    await server.start()
    print(f"bare server listening on {host}:{port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        front.loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(None)
    front_sock.close()
    worker.join(5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model-dir", type=Path, required=True,
                   help="a model directory: its config.json and tokenizer.json are read")
    ns = p.parse_args(argv)
    asyncio.run(serve(ns.port, ns.host, ns.model_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
