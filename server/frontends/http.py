"""OpenAI-compatible HTTP: POST /v1/embeddings, GET /v1/models, GET /health.

A small HTTP/1.1 server on the gRPC server's event loop, so both protocols
share one router, one queue and one set of workers. Each embeddings request
becomes an EmbedRequest handled by the same servicer code as gRPC's Embed.

HTTP handling, kept strict because it faces the network: the head is at most
64 KiB, bodies come with Content-Length or chunked and at most
--max-message-bytes (413 beyond, before reading it); keep-alive and
pipelining are HTTP/1.1's defaults, `Expect: 100-continue` is answered, a
half-received request times out with 408, an idle connection closes after
75 s. When the client goes away mid-request its texts are dropped from the
queue, as for a cancelled gRPC call.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from embedrpc import __version__

from .. import tracing
from ..core import EmbeddingCore
from ..errors import STATUS, EmbedError, http_status
from ..logs import clean_request_id, new_request_id, set_request_id
from ..metrics import Metrics

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 << 10
IDLE_TIMEOUT_S = 75.0  # a kept-alive connection with no request
REQUEST_TIMEOUT_S = 120.0  # from a request's first byte to its last
# JSON work beyond this size runs in a thread, so the event loop keeps serving.
_INLINE_JSON_BYTES = 1 << 20
_INLINE_JSON_FLOATS = 1 << 16

_REQUEST_LINE = re.compile(r"([A-Z]{1,16}) (\S+) HTTP/(\d)\.(\d)")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_DIGITS = re.compile(r"[0-9]{1,18}")
_REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 413: "Content Too Large", 429: "Too Many Requests",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            501: "Not Implemented", 503: "Service Unavailable", 504: "Gateway Timeout",
            505: "HTTP Version Not Supported"}
# HTTP status → the gRPC code name recorded in metrics for it.
_CODE_OF_STATUS = {status: code for code, (status, _) in STATUS.items()} | {
    413: "INVALID_ARGUMENT"}
ROUTES = {"/v1/embeddings": ("POST",), "/v1/models": ("GET", "HEAD"),
          "/health": ("GET", "HEAD")}


class HttpError(Exception):
    """An error answered as OpenAI-style JSON: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 close: bool = False, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.close = close  # the connection cannot be reused (body not read, framing lost)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# The proto's field names (in the core's errors) → the OpenAI request's.
PARAMS = {"inputs": "input"}


def error_from_embed(exc: EmbedError) -> HttpError:
    status, kind = http_status(exc.code)
    param = PARAMS.get(exc.field, exc.field) if exc.field else None
    return HttpError(status, str(exc), type=kind, code=exc.code.lower(), param=param,
                     headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


def tls_context(cert_file: str, key_file: str, client_ca: bytes | None = None
                ) -> ssl.SSLContext:
    """HTTPS with the gRPC port's certificate; with `client_ca` (PEM), mutual TLS."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    if client_ca is not None:
        context.load_verify_locations(cadata=client_ca.decode("ascii"))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass(slots=True)
class Request:
    method: str
    target: str
    path: str
    version: tuple[int, int]
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "
    body: bytes = b""
    keep_alive: bool = True


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False


def json_response(status: int, payload: Any, **headers: str) -> Response:
    return Response(status, json.dumps(payload, separators=(",", ":")).encode(),
                    headers=headers)


# -- parsing -------------------------------------------------------------------------


def parse_head(head: bytes) -> Request:
    """The request line and header fields (without the final blank line)."""
    text = head.decode("latin-1")  # field values may hold any octet (RFC 9110 obs-text)
    line, *fields = text.split("\r\n")
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise HttpError(400, f"malformed request line {line[:100]!r}; expected "
                        "'METHOD /path HTTP/1.1'", close=True)
    method, target = match.group(1), match.group(2)
    version = (int(match.group(3)), int(match.group(4)))
    if version not in ((1, 0), (1, 1)):
        raise HttpError(505, f"HTTP/{version[0]}.{version[1]} is not supported; use HTTP/1.1",
                        close=True)
    headers: dict[str, str] = {}
    for raw in fields:
        name, sep, value = raw.partition(":")
        if not sep or not _TOKEN.fullmatch(name):  # also folded lines and space before ':'
            raise HttpError(400, f"malformed header field {raw[:100]!r}", close=True)
        name, value = name.lower(), value.strip(" \t")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    path = urlsplit(target).path if not target.startswith("/") else target.split("?", 1)[0]
    if not path.startswith("/"):
        raise HttpError(400, f"request target {target[:100]!r} is not a path", close=True)
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in connection if version == (1, 1) else "keep-alive" in connection
    return Request(method, target, path, version, headers, keep_alive=keep_alive)


class _ChunkedBody:
    """Decodes a chunked body incrementally from a growing buffer."""

    def __init__(self, start: int, limit: int) -> None:
        self.pos = start
        self.limit = limit
        self.size = 0
        self.parts: list[bytes] = []
        self.state = "size"
        self.chunk = 0

    def feed(self, buf: bytearray) -> int | None:
        """The offset just past the body once it is complete; None while incomplete."""
        while True:
            if self.state == "data":
                end = self.pos + self.chunk
                if len(buf) < end + 2:
                    return None
                if buf[end:end + 2] != b"\r\n":
                    raise HttpError(400, "malformed chunked body (chunk without CRLF)",
                                    close=True)
                self.parts.append(bytes(buf[self.pos:end]))
                self.pos, self.state = end + 2, "size"
                continue
            end = buf.find(b"\r\n", self.pos)
            if end < 0:
                if len(buf) - self.pos > 4096:
                    raise HttpError(400, "malformed chunked body (line too long)", close=True)
                return None
            line = bytes(buf[self.pos:end])
            self.pos = end + 2
            if self.state == "trailer":
                if not line:
                    return self.pos
                continue
            size = line.split(b";", 1)[0].strip(b" \t")
            if not _HEX.fullmatch(size):
                raise HttpError(400, f"malformed chunk size {size[:20]!r}", close=True)
            self.chunk = int(size, 16)
            if self.chunk == 0:
                self.state = "trailer"
                continue
            self.size += self.chunk
            if self.size > self.limit:
                raise _too_large(self.limit)
            self.state = "data"

    def body(self) -> bytes:
        return b"".join(self.parts)


def _too_large(limit: int) -> HttpError:
    return HttpError(413, f"the request body is larger than {limit} bytes (--max-message-bytes);"
                     " send fewer texts per request", code="request_too_large", close=True)


# -- the connection ------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One client connection: reads requests, one at a time, and writes responses."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.request: Request | None = None  # head parsed, body still arriving
        self.body_start = self.body_end = 0  # Content-Length framing: the body's offsets
        self.chunked: _ChunkedBody | None = None
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.peer_closed = False
        self.paused = False  # reading paused while a request is served
        self.lingering = False  # answered an error; reading and discarding until closed
        self.writable = asyncio.Event()
        self.writable.set()

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections.add(self)
        self._arm(IDLE_TIMEOUT_S)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # an error was answered and the connection is closing: discard
        if not self.buffer and self.request is None and self.task is None:
            self._arm(REQUEST_TIMEOUT_S)  # a new request starts arriving
        self.buffer += data
        if self.task is None:
            self._advance()
        elif len(self.buffer) > MAX_HEAD_BYTES and not self.paused:
            # Pipelined requests pile up behind the one being served: wait for it. Reading
            # goes on below this size, so a client that goes away is noticed at once.
            self.paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.peer_closed = True
        if self.lingering:
            return False
        if self.task is not None:
            if self.task.get_name() == "http-embeddings":
                self.task.cancel()  # the client gave up: drop its texts from the queue
                return False
            return True  # a cheap request: answer it, then close
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()
        self.transport = None
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # request framing

    def _arm(self, seconds: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(seconds, self._timed_out)

    def _timed_out(self) -> None:
        if self.task is not None or self.transport is None:
            return
        if self.lingering:
            self._close()
        elif self.buffer or self.request is not None:
            self._fail(HttpError(408, "the request did not arrive in time", close=True))
        else:
            self._close()

    def _advance(self) -> None:
        """Parse what the buffer holds; start handling the next complete request."""
        try:
            request = self._complete_request()
        except HttpError as exc:
            self._fail(exc)
            return
        if request is None:
            if self.peer_closed:
                self._close()
            return
        if self.timer is not None:
            self.timer.cancel()
        name = "http-embeddings" if request.path == "/v1/embeddings" else "http-request"
        self.task = self.loop.create_task(self._serve(request), name=name)

    def _complete_request(self) -> Request | None:
        if self.request is None:
            while self.buffer[:2] == b"\r\n":  # stray line ends between requests
                del self.buffer[:2]
            end = self.buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
            if end < 0:
                if len(self.buffer) > MAX_HEAD_BYTES:
                    raise HttpError(431, f"the request head is larger than {MAX_HEAD_BYTES} "
                                    "bytes", close=True)
                return None
            request = parse_head(bytes(self.buffer[:end]))
            start = end + 4
            self._frame(request, start)
            self.request = request
            if (request.headers.get("expect", "").lower() == "100-continue"
                    and len(self.buffer) <= start and (self.chunked or self.body_end > start)):
                self._send(Response(100), head_only=True)
        request = self.request
        if self.chunked is not None:
            end = self.chunked.feed(self.buffer)
            if end is None:
                return None
            request.body = self.chunked.body()
            self.chunked = None
        else:
            end = self.body_end
            if len(self.buffer) < end:
                return None
            request.body = bytes(self.buffer[self.body_start:end])
        del self.buffer[:end]
        self.request = None
        return request

    def _frame(self, request: Request, start: int) -> None:
        """Decide where the body ends (RFC 9112 section 6), refusing what is ambiguous."""
        limit = self.server.max_body_bytes
        self.body_start = self.body_end = start
        coding = request.headers.get("transfer-encoding")
        length = request.headers.get("content-length")
        if coding is not None:
            if length is not None:
                raise HttpError(400, "both Transfer-Encoding and Content-Length are set",
                                close=True)
            if coding.lower() != "chunked":
                raise HttpError(501, f"Transfer-Encoding {coding!r} is not supported; use "
                                "chunked or Content-Length", close=True)
            self.chunked = _ChunkedBody(start, limit)
            return
        if length is None:
            return
        if not _DIGITS.fullmatch(length):
            raise HttpError(400, f"Content-Length {length[:30]!r} is not a number",
                            close=True)
        if int(length) > limit:
            raise _too_large(limit)
        self.body_end = start + int(length)

    # responses

    async def _serve(self, request: Request) -> None:
        try:
            response = await self.server.handle(request)
        except asyncio.CancelledError:
            self._close()
            raise
        close = (not request.keep_alive or response.close or self.peer_closed
                 or self.server.closing)
        self._send(response, head_request=request.method == "HEAD", close=close)
        await self.writable.wait()  # the client reads slowly: read no more requests meanwhile
        self.task = None
        if close or self.transport is None:
            self._close()
            return
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        self._arm(IDLE_TIMEOUT_S)
        if self.buffer:
            self._arm(REQUEST_TIMEOUT_S)
            self._advance()

    def _send(self, response: Response, *, head_only: bool = False,
              head_request: bool = False, close: bool = False) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        lines = [f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}"]
        if not head_only:
            lines += [f"Date: {formatdate(usegmt=True)}", f"Server: embedrpc/{__version__}",
                      f"Content-Type: {response.content_type}",
                      f"Content-Length: {len(response.body)}"]
            lines += [f"{k}: {v}" for k, v in response.headers.items()]
            if close or response.close:
                lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        body = b"" if head_only or head_request else response.body
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)

    def _fail(self, exc: HttpError) -> None:
        """Answer a request that cannot be read further, then close the connection.

        The client may still be sending its body: closing with unread data makes the
        kernel reset the connection, and the client would see that instead of our
        answer. So shut down our side, and read and discard for a while first.
        """
        self._send(_error_response(exc), close=True)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.lingering = True
        self.buffer.clear()
        if self.paused:
            self.paused = False
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
            self._arm(2.0)
        else:
            self._close()

    def _close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # after what is buffered has been written


def _error_response(exc: HttpError) -> Response:
    response = json_response(exc.status, exc.body(), **exc.headers)
    response.close = exc.close
    return response


# -- the server ----------------------------------------------------------------------


class HttpServer:
    """Serves the OpenAI-compatible routes from the embedding core."""

    def __init__(self, *, core: EmbeddingCore, model: str, metrics: Metrics,
                 serving: Callable[[], bool], max_body_bytes: int,
                 authorize: Callable[[str | None], None] | None = None,
                 auth_health: bool = False) -> None:
        self.core = core
        self.metrics = metrics
        self.serving = serving
        self.max_body_bytes = max_body_bytes
        # authorize(authorization header or None) raises EmbedError (UNAUTHENTICATED) to
        # refuse. It guards every route; /health only with auth_health (probes need none).
        self.authorize = authorize
        self.auth_health = auth_health
        self.model = model
        self.created = int(time.time())
        self.connections: set[_Connection] = set()
        self.closing = False
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int, *, tls: ssl.SSLContext | None = None) -> int:
        """Listen (HTTPS with `tls`); return the port (port 0: any free one)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port,
                                                ssl=tls)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace: float) -> None:
        """Stop listening, let requests in flight finish within `grace`, close the rest."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.task is None:
                conn._close()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(c.task for c in self.connections):
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.task is not None:
                conn.task.cancel()
            conn._close()
        if self._server is not None:
            await self._server.wait_closed()

    # -- routing -----------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        methods = ROUTES.get(request.path)
        if methods is None:
            return _error_response(HttpError(404, f"no route {request.path!r}; this server "
                                             f"has {', '.join(sorted(ROUTES))}",
                                             code="not_found"))
        if request.method not in methods:
            return _error_response(HttpError(
                405, f"{request.method} {request.path} is not allowed; use "
                f"{' or '.join(methods)}", code="method_not_allowed",
                headers={"Allow": ", ".join(methods)}))
        route = f"{'GET' if request.method == 'HEAD' else request.method} {request.path}"
        request_id = (clean_request_id(request.headers.get("x-request-id", ""))
                      or new_request_id())
        set_request_id(request_id)
        started = time.monotonic()
        self.metrics.call_started(route)
        counts = [0, 0]  # embeddings, tokens
        with tracing.call_span(route, request.headers, {
                "http.request.method": request.method, "url.path": request.path,
                "embedrpc.model": self.model, "embedrpc.request_id": request_id}) as span:
            try:
                if self.authorize is not None and (request.path != "/health"
                                                   or self.auth_health):
                    self.authorize(request.headers.get("authorization"))
                if request.path == "/v1/embeddings":
                    response = await self._embeddings(request, counts, span)
                elif request.path == "/health":
                    response = self._health()
                else:
                    response = self._models()
            except HttpError as exc:
                response = _error_response(exc)
            except EmbedError as exc:
                response = _error_response(error_from_embed(exc))
            except asyncio.CancelledError:
                self.metrics.call_done(route, "CANCELLED", time.monotonic() - started)
                raise
            except Exception as exc:
                log.exception("HTTP %s failed", route)
                response = _error_response(HttpError(500, f"internal error: {exc}"))
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 400:
                span.set_error(str(response.status), response.body[:200].decode(errors="replace"))
        code = _CODE_OF_STATUS.get(response.status, "INTERNAL")
        if request.path == "/health" and response.status == 503:
            code = "OK"  # the probe was answered; NOT_SERVING is its content
        self.metrics.call_done(route, code, time.monotonic() - started,
                               embeddings=counts[0], tokens=counts[1])
        response.headers.setdefault("x-request-id", request_id)
        return response

    def _health(self) -> Response:
        if self.serving():
            return json_response(200, {"status": "SERVING"})
        return json_response(503, {"status": "NOT_SERVING"})

    def _models(self) -> Response:
        return json_response(200, {"object": "list", "data": [self._model_card()]})

    def _model_card(self) -> dict[str, Any]:
        info = self.core.info
        return {"id": self.model, "object": "model", "created": self.created,
                "owned_by": "embedrpc", "dimensions": info.dimensions,
                "min_dimensions": info.min_dimensions, "max_length": info.max_length}

    # -- POST /v1/embeddings ------------------------------------------------------

    async def _embeddings(self, request: Request, counts: list[int], span: Any) -> Response:
        payload = await parse_json(request.body)
        texts, options, encoding_format = parse_embeddings(payload)
        span.set_attribute("embedrpc.inputs", len(texts))
        with self.core.call():
            result = await self.core.embed(texts, **options)
        vectors = result.vectors
        counts[:] = [len(vectors), result.prompt_tokens]
        span.set_attributes({"embedrpc.embeddings": len(vectors),
                             "embedrpc.tokens": result.prompt_tokens})
        body = embeddings_body(vectors, result.prompt_tokens, self.model, encoding_format)
        if encoding_format == "float" and vectors.size > _INLINE_JSON_FLOATS:
            return Response(200, await asyncio.to_thread(body))
        return Response(200, body())


# -- the OpenAI request and response bodies -------------------------------------------


async def parse_json(body: bytes) -> Any:
    """The request body as JSON; HttpError 400 when it is not."""
    try:
        return (json.loads(body) if len(body) <= _INLINE_JSON_BYTES
                else await asyncio.to_thread(json.loads, body))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HttpError(400, f"the body is not valid JSON: {exc}",
                        code="invalid_json") from exc


def parse_embeddings(payload: Any) -> tuple[list[str], dict[str, Any], str]:
    """An OpenAI embeddings request → (texts, the core's options, encoding_format).

    Only the JSON shapes are checked here; counts, ranges and prompts are the core's."""
    if not isinstance(payload, dict):
        raise HttpError(400, "the body must be a JSON object such as "
                        '{"input": ["text", ...]}')
    if "input" not in payload:
        raise HttpError(400, "'input' is required: a string or a list of strings",
                        param="input")
    texts = payload["input"]
    if isinstance(texts, str):
        texts = [texts]
    elif not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        token_ids = isinstance(texts, list) and texts and all(
            isinstance(t, int) or (isinstance(t, list) and all(isinstance(i, int) for i in t))
            for t in texts)
        raise HttpError(400, "token-id arrays are not accepted; send text (a string or a "
                        "list of strings)" if token_ids else
                        "'input' must be a string or a list of strings", param="input")
    dimensions = payload.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int)
                                   or isinstance(dimensions, bool)):
        raise HttpError(400, "'dimensions' must be an integer", param="dimensions")
    encoding_format = payload.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise HttpError(400, f"'encoding_format' {encoding_format!r} is not supported; "
                        "use 'float' or 'base64'", param="encoding_format")
    for key in ("model", "user", "prompt_name", "instruction"):
        if payload.get(key) is not None and not isinstance(payload[key], str):
            raise HttpError(400, f"'{key}' must be a string", param=key)
    options = {"dimensions": dimensions, "prompt_name": payload.get("prompt_name") or "",
               "instruction": payload.get("instruction") or ""}
    return texts, options, encoding_format


def embeddings_body(vectors: np.ndarray, tokens: int, model: str,
                    encoding_format: str) -> Callable[[], bytes]:
    """The reply's JSON, built when called (in a thread when it is large)."""
    def build() -> bytes:
        if encoding_format == "base64":
            data = [{"object": "embedding", "index": i,
                     "embedding": base64.b64encode(row.tobytes()).decode("ascii")}
                    for i, row in enumerate(vectors)]
        else:
            data = [{"object": "embedding", "index": i, "embedding": row}
                    for i, row in enumerate(vectors.tolist())]
        return json.dumps({"object": "list", "data": data, "model": model,
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                          separators=(",", ":")).encode()

    return build
