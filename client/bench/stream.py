"""EmbedStream for the load engine: requests from many clients over one long-lived
stream, answers matched to them by request_id, the stream reopened if it breaks."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any

import grpc

from embedrpc.v1 import embedder_pb2 as pb

STREAM_METHOD = "/embedrpc.v1.Embedder/EmbedStream"


class CallFailed(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class _StreamSession:
    """One EmbedStream call: requests written under a lock, answers matched by request_id."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.pending: dict[str, asyncio.Future[pb.EmbedResponse]] = {}
        self.lock = asyncio.Lock()
        self.broken: str | None = None
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        code = "UNKNOWN"  # the stream ended with requests unanswered
        try:
            while (response := await self.call.read()) is not grpc.aio.EOF:
                future = self.pending.pop(response.request_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        finally:
            self.broken = code
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(CallFailed(code))
            self.pending.clear()


class StreamCaller:
    """Sends requests over one long-lived EmbedStream, reopening it if it breaks."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.method = functools.partial(
            channel.stream_stream(STREAM_METHOD, request_serializer=None,
                                  response_deserializer=pb.EmbedResponse.FromString),
            metadata=metadata)
        self.timeout = timeout
        self.session: _StreamSession | None = None
        self.sessions: list[_StreamSession] = []
        self.next_id = 0

    async def __call__(self, body: bytes) -> pb.EmbedResponse:
        session = self.session
        if session is None or session.broken is not None:
            session = self.session = _StreamSession(self.method())
            self.sessions.append(session)
        self.next_id += 1
        request_id = format(self.next_id, "x")
        future: asyncio.Future[pb.EmbedResponse] = asyncio.get_running_loop().create_future()
        session.pending[request_id] = future
        try:
            async with session.lock:
                # Serialised messages concatenate field-wise (protobuf's merge rule),
                # so appending the request_id field sets it without re-encoding.
                await session.call.write(
                    body + pb.EmbedRequest(request_id=request_id).SerializeToString())
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            raise CallFailed("DEADLINE_EXCEEDED") from None
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(exc.code().name) from None
        except asyncio.InvalidStateError:  # written after the stream ended
            raise CallFailed(session.broken or "UNKNOWN") from None
        finally:
            session.pending.pop(request_id, None)

    async def close(self) -> None:
        for session in self.sessions:
            if session.broken is None:
                with contextlib.suppress(Exception):
                    await session.call.done_writing()
            session.call.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await session.reader
