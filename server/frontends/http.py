"""HTTP: POST /v1/embeddings (OpenAI's shape), POST /v1/rerank (Cohere's and Jina's
shape), GET /v1/models, GET /health.

aiohttp's web server on the gRPC server's event loop, so both protocols share the
cores, routers, queues and workers of every model. HTTP/1.1 framing
(Content-Length and chunked bodies, keep-alive, pipelining) and TLS are aiohttp's and
the ssl module's; this module starts at the request object: routes, API keys, the
body limit, the OpenAI JSON shapes, request ids, metrics and spans.

- The POST routes need `Content-Type: application/json` (415 otherwise).
- A request's "model" names a served model of the route's kind; a name this server
  does not serve means the only model of that kind, when there is one (OpenAI and
  Cohere clients always send some name), else 400 listing the models.
- A body over --max-message-bytes gets 413 before it is read (from Content-Length,
  or as soon as a chunked body passes the limit), and `Expect: 100-continue` is
  answered 413 instead of 100; the connection then closes.
- At most --max-http-connections connections are open at once: beyond it a new
  connection is closed as soon as it is accepted (one WARNING line a second at most,
  with a count). A connection with no request under way closes after
  --http-idle-seconds; a body that does not arrive within BODY_TIMEOUT_S gets 408.
- When the client goes away mid-request its texts are dropped from the queue, as
  for a cancelled gRPC call (aiohttp cancels the handler).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    LineTooLong,
)

from embedrpc import __version__

from .. import tracing
from ..core import Cores, Ranking
from ..errors import STATUS, EmbedError, http_status
from ..logs import clean_request_id, new_request_id, set_request_id
from ..metrics import Metrics

log = logging.getLogger(__name__)

BODY_TIMEOUT_S = 120.0  # from a request's head to its body's last byte
LINGER_S = 2.0  # after an early error answer: read and discard the body this long, then close
HANDSHAKE_TIMEOUT_S = 10.0  # a TLS handshake not done by then is dropped
# JSON work beyond this size runs in a thread, so the event loop keeps serving.
_INLINE_JSON_BYTES = 1 << 20
_INLINE_JSON_FLOATS = 1 << 16
SERVER = f"embedrpc/{__version__}"
JSON = "application/json"
# HTTP status → the gRPC code name recorded in metrics for it.
_CODE_OF_STATUS = {status: code for code, (status, _) in STATUS.items()} | {
    408: "DEADLINE_EXCEEDED", 413: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT"}
ROUTES = {"/v1/embeddings": ("POST",), "/v1/rerank": ("POST",),
          "/v1/models": ("GET", "HEAD"), "/health": ("GET", "HEAD")}
# The proto's field names (in the core's errors) → the OpenAI request's.
PARAMS = {"inputs": "input"}


class HttpError(Exception):
    """An error answered as OpenAI-style JSON: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 close: bool = False, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        # A request this server cannot take as it is: gRPC's INVALID_ARGUMENT, named so
        # where no more precise code (invalid_json, bad_request) is given.
        self.code = "invalid_argument" if code is None and status == 400 else code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.close = close  # the connection cannot be reused (the body was not read)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> web.Response:
        response = json_response(self.status, self.body(), **self.headers)
        if self.close:
            response.force_close()
        return response


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


def json_response(status: int, payload: Any, **headers: str) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload, separators=(",", ":")).encode(),
                        content_type=JSON, headers={"Server": SERVER, **headers})


def _too_large(limit: int) -> HttpError:
    return HttpError(413, f"the request body is larger than {limit} bytes (--max-message-bytes);"
                     " send fewer texts per request", code="request_too_large", close=True)


class _ConnectionGate:
    """Counts open connections; refuses new ones beyond `limit`. With `tls`, each
    connection's TLS handshake is run here (_TlsHandshake), so that one that fails, times
    out or is closed by the peer gives its place back at once."""

    def __init__(self, limit: int, factory: Callable[[], asyncio.Protocol], *,
                 tls: ssl.SSLContext | None) -> None:
        self.limit = limit
        self.open = 0
        self._factory = factory
        self._tls = tls

    def __call__(self) -> asyncio.Protocol:
        """The protocol for a connection just accepted (asyncio's protocol factory)."""
        if self.open >= self.limit:
            log.warning("HTTP: refused a connection: %d are open, the most "
                        "--max-http-connections allows", self.limit)
            return _Refused()
        self.open += 1
        counted = _Counted(self._factory(), self)
        return counted if self._tls is None else _TlsHandshake(counted, self._tls)


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted by the gate while it lives."""

    __slots__ = ("_gate", "_inner", "_made")

    def __init__(self, inner: asyncio.Protocol, gate: _ConnectionGate | None) -> None:
        self._inner = inner
        self._gate = gate
        self._made = False  # aiohttp's protocol has its transport

    def _release(self) -> None:
        if self._gate is not None:
            self._gate.open -= 1
            self._gate = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._made = True
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if self._made:  # (a failed TLS handshake ends a connection it never made)
            self._made = False
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def __del__(self) -> None:
        self._release()


class _TlsHandshake(asyncio.Protocol):
    """A counted connection until its TLS handshake is done (loop.start_tls, within
    HANDSHAKE_TIMEOUT_S); then aiohttp's protocol gets the TLS transport. A handshake
    that fails or times out, or a peer that closes first, frees the connection's place
    at once: with asyncio's own `ssl=` server a failed handshake never reached the
    protocol, which kept its place until the garbage collector found it (connections
    opened and closed without a handshake held --max-http-connections places)."""

    def __init__(self, counted: _Counted, context: ssl.SSLContext) -> None:
        self._counted = counted
        self._context = context
        self._task: asyncio.Task[None] | None = None
        self._started = False  # start_tls owns the transport (and its losses) from then

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # the ClientHello is start_tls's to read
        self._task = asyncio.get_running_loop().create_task(self._handshake(transport))

    async def _handshake(self, transport: asyncio.Transport) -> None:
        self._started = True
        counted = self._counted
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport, counted, self._context, server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        except asyncio.CancelledError:  # the server is stopping
            counted._release()
            raise
        except Exception:  # failed, timed out, or the peer left; start_tls closed it
            counted._release()
            return
        if tls is None:  # the connection closed as the handshake ended
            counted._release()
            return
        counted.connection_made(tls)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._started:  # closed before its handshake began
            if self._task is not None:
                self._task.cancel()
            self._counted._release()


class _Refused(asyncio.Protocol):
    """A connection over the limit: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger: a request aiohttp could not parse is the client's
    problem, logged in one line at INFO, not as an ERROR with a traceback."""

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self.info("HTTP: malformed request (%s): %s", exc_info.code,
                      exc_info.message.splitlines()[0] if exc_info.message else "")
            return
        self.error(msg, *args, exc_info=exc_info, **kwargs)


def _unparsed(status: int, exc: BaseException | None) -> HttpError:
    """What a request aiohttp could not parse is told: JSON like every other error, in
    our words (aiohttp's quote the bytes the client sent)."""
    if status >= 500:
        return HttpError(status, "internal error; the server log says more", close=True)
    if isinstance(exc, BadHttpMethod):
        message = "not an HTTP/1.1 request (unknown method); this port speaks HTTP/1.1"
    elif isinstance(exc, LineTooLong):
        message = "the request line or a header is too long (at most 8,190 bytes each)"
    elif isinstance(exc, BadStatusLine):
        message = "malformed request line; send METHOD /path HTTP/1.1"
    elif isinstance(exc, InvalidHeader):
        message = "malformed header (a Content-Length must be digits)"
    elif isinstance(exc, HttpProcessingError) and "Host" in (exc.message or ""):
        message = "an HTTP/1.1 request needs a Host header"
    else:
        message = ("malformed HTTP/1.1 request (its request line, a header, or its "
                   "Content-Length or chunked framing)")
    return HttpError(status, message, code="bad_request", close=True)


class _Handler(web.RequestHandler):  # type: ignore[misc]
    """aiohttp's protocol for one connection, answering what it cannot parse as JSON."""

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if too late
        return _unparsed(status, exc).response()


class _WebServer(web.Server):  # type: ignore[misc]
    """aiohttp's low-level server, with our connection protocol."""

    def __call__(self) -> web.RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


# -- the server ----------------------------------------------------------------------


class HttpServer:
    """Serves the HTTP routes from the cores of the models served."""

    def __init__(self, *, cores: Cores, metrics: Metrics,
                 serving: Callable[[], bool], max_body_bytes: int,
                 max_connections: int = 512, idle_timeout: float = 75.0,
                 authorize: Callable[[list[str]], None] | None = None,
                 auth_health: bool = False) -> None:
        self.cores = cores
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.metrics = metrics
        self.serving = serving
        self.max_body_bytes = max_body_bytes
        # authorize(every Authorization header sent) raises EmbedError (UNAUTHENTICATED) to
        # refuse. It guards every route; /health only with auth_health (probes need none).
        self.authorize = authorize
        self.auth_health = auth_health
        self.created = int(time.time())
        self._web: web.Server | None = None
        self._gate: _ConnectionGate | None = None
        self._listener: asyncio.base_events.Server | None = None

    @property
    def connections(self) -> int:
        """HTTP connections open now."""
        return self._gate.open if self._gate is not None else 0

    async def start(self, host: str, port: int, *, tls: ssl.SSLContext | None = None,
                    reuse_port: bool = False) -> int:
        """Listen (HTTPS with `tls`); return the port (port 0: any free one). reuse_port:
        share the port with the other front-end processes of this server."""
        loop = asyncio.get_running_loop()
        # aiohttp's low-level server: one protocol (RequestHandler) per connection, each
        # request handed to `_serve`.
        self._web = _WebServer(self._serve, handler_cancellation=True, access_log=None,
                                keepalive_timeout=self.idle_timeout, lingering_time=LINGER_S,
                                logger=_ServerLog(logging.getLogger("aiohttp.server"), {}))
        self._gate = _ConnectionGate(self.max_connections, self._web, tls=tls)
        self._listener = await loop.create_server(self._gate, host, port,
                                                  reuse_port=reuse_port or None)
        return int(self._listener.sockets[0].getsockname()[1])

    async def stop(self, grace: float) -> None:
        """Stop listening, close idle connections, let requests in flight finish within
        `grace` (their answers say Connection: close), then cancel the rest."""
        if self._listener is not None:
            self._listener.close()
        if self._web is not None:
            self._web.pre_shutdown()
            await self._web.shutdown(grace)
        if self._listener is not None:
            await self._listener.wait_closed()

    # -- routing -----------------------------------------------------------------

    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.version not in ((1, 1), (1, 0)):  # the parser takes any digits
            version = "HTTP/{}.{}".format(*request.version)
            return HttpError(505, f"{version} is not supported; use HTTP/1.1",
                             close=True).response()
        path, method = request.path, request.method
        methods = ROUTES.get(path)
        if methods is None:
            return HttpError(404, f"no route {path[:100]!r}; this server has "
                             f"{', '.join(sorted(ROUTES))}", code="not_found").response()
        if method not in methods:
            return HttpError(405, f"{method} {path} is not allowed; use "
                             f"{' or '.join(methods)}", code="method_not_allowed",
                             headers={"Allow": ", ".join(methods)}).response()
        route = f"{'GET' if method == 'HEAD' else method} {path}"
        headers = request.headers
        request_id = clean_request_id(headers.get("x-request-id", "")) or new_request_id()
        set_request_id(request_id)
        started = time.monotonic()
        self.metrics.call_started(route)
        # The call's model (one model: every call is about it), and what it returned.
        one = self.cores.cores[0].name if len(self.cores.cores) == 1 else ""
        counts = _Counts(model=one)
        with self.cores.call(), tracing.call_span(route, headers, {
                "http.request.method": method, "url.path": path,
                "embedrpc.model": one, "embedrpc.request_id": request_id}) as span:
            try:
                if self.authorize is not None and (path != "/health" or self.auth_health):
                    self.authorize(headers.getall("authorization", []))
                if path == "/v1/embeddings":
                    response = await self._embeddings(request, counts, span)
                elif path == "/v1/rerank":
                    response = await self._rerank(request, counts, span)
                elif path == "/health":
                    response = self._health()
                else:
                    response = self._models()
            except HttpError as exc:
                response = exc.response()
            except EmbedError as exc:
                response = error_from_embed(exc).response()
            except asyncio.CancelledError:
                self.metrics.call_done(route, "CANCELLED", time.monotonic() - started)
                raise
            except Exception:
                log.exception("HTTP %s failed", route)
                # The cause is for the log, not for the client (nor Python's words for it).
                response = HttpError(500, f"internal error (request id {request_id}); the "
                                     "server log says more").response()
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 400:
                span.set_error(str(response.status), bytes(response.body or b"")[:200]
                               .decode(errors="replace"))
        code = _CODE_OF_STATUS.get(response.status, "INTERNAL")
        if path == "/health" and response.status == 503:
            code = "OK"  # the probe was answered; NOT_SERVING is its content
        self.metrics.call_done(route, code, time.monotonic() - started,
                               embeddings=counts.embeddings, tokens=counts.tokens,
                               pairs=counts.pairs, model=counts.model)
        response.headers["x-request-id"] = request_id
        return response

    def _health(self) -> web.Response:
        if self.serving():
            return json_response(200, {"status": "SERVING"})
        return json_response(503, {"status": "NOT_SERVING"})

    def _models(self) -> web.Response:
        return json_response(200, {"object": "list", "data": [
            self._model_card(core.info) for core in self.cores.cores]})

    def _model_card(self, info: Any) -> dict[str, Any]:
        card = {"id": info.model, "object": "model", "created": self.created,
                "owned_by": "embedrpc", "task": info.task}
        if info.task == "embed":
            card |= {"dimensions": info.dimensions, "min_dimensions": info.min_dimensions}
        return card | {"max_length": info.max_length}

    # -- POST /v1/embeddings ------------------------------------------------------

    async def _body(self, request: web.BaseRequest) -> bytes:
        """The request body, refused (413) as soon as it is known to be over the limit."""
        limit = self.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise _too_large(limit)
        if request.headers.get("expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = bytearray()
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                while not request.content.at_eof():
                    body += await request.content.readany()
                    if len(body) > limit:
                        raise _too_large(limit)
        except TimeoutError:
            raise HttpError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} "
                            "s", close=True) from None
        return bytes(body)

    def _client(self, request: web.BaseRequest) -> str:
        """Who calls, for fair share (core.client_of): the API key, else the connection."""
        peer = request.transport.get_extra_info("peername") if request.transport else None
        connection = f"http:{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "http"
        return self.cores.client_of(request.headers.get("authorization"), connection)

    async def _embeddings(self, request: web.BaseRequest, counts: _Counts,
                          span: Any) -> web.Response:
        check_content_type(request.headers.get("content-type"))
        payload = await parse_json(await self._body(request))
        texts, options, encoding_format = parse_embeddings(payload)
        core = self.cores.embedder(payload.get("model") or "", lenient=True)
        counts.model = core.name
        span.set_attributes({"embedrpc.inputs": len(texts), "embedrpc.model": core.name})
        result = await core.embed(texts, **options, client=self._client(request))
        vectors = result.vectors
        counts.embeddings, counts.tokens = len(vectors), result.prompt_tokens
        span.set_attributes({"embedrpc.embeddings": len(vectors),
                             "embedrpc.tokens": result.prompt_tokens})
        build = embeddings_body(vectors, result.prompt_tokens, core.name, encoding_format)
        body = (await asyncio.to_thread(build)
                if encoding_format == "float" and vectors.size > _INLINE_JSON_FLOATS
                else build())
        return web.Response(body=body, content_type=JSON, headers={"Server": SERVER})

    # -- POST /v1/rerank ------------------------------------------------------------

    async def _rerank(self, request: web.BaseRequest, counts: _Counts,
                      span: Any) -> web.Response:
        check_content_type(request.headers.get("content-type"))
        payload = await parse_json(await self._body(request))
        query, documents, options, return_documents = parse_rerank(payload)
        core = self.cores.reranker(payload.get("model") or "", lenient=True)
        counts.model = core.name
        span.set_attributes({"embedrpc.inputs": len(documents), "embedrpc.model": core.name})
        ranking = await core.rerank(query, documents, **options, client=self._client(request))
        counts.pairs, counts.tokens = len(documents), ranking.prompt_tokens
        span.set_attributes({"embedrpc.pairs": len(documents),
                             "embedrpc.tokens": ranking.prompt_tokens})
        body = rerank_body(ranking, documents if return_documents else None, core.name)
        return web.Response(body=body, content_type=JSON, headers={"Server": SERVER})


class _Counts:
    """What one HTTP call was about and returned, for its metrics."""

    __slots__ = ("embeddings", "model", "pairs", "tokens")

    def __init__(self, model: str) -> None:
        self.model = model
        self.embeddings = self.pairs = self.tokens = 0


# -- the request and response bodies ---------------------------------------------------


def check_content_type(value: str | None) -> None:
    """The body must say it is JSON: a web page can make a browser post text/plain or a
    form to any address without asking (no CORS preflight), but not application/json."""
    media = (value or "").split(";", 1)[0].strip().lower()
    if media != JSON:
        got = f"{value[:60]!r}" if value else "none"
        raise HttpError(415, f"Content-Type must be application/json (got {got}); send the "
                        "JSON body with the header 'Content-Type: application/json'",
                        code="unsupported_media_type", close=True)


class _NotJson(ValueError):
    """What the JSON parser's hooks refuse (its message is ours)."""


MAX_INT_DIGITS = 32  # no value of this API needs more; Python refuses over 4300 anyway


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _NotJson(f"it has an integer of {len(text.lstrip('-'))} digits; at most "
                       f"{MAX_INT_DIGITS} are allowed")
    return int(text)


def _json_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON value")


def _load_json(body: bytes) -> Any:
    """The body as JSON (RFC 8259: UTF-8 text); HttpError 400 for anything else, with a
    message of ours: never the parser's internals, whatever the client sent."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HttpError(400, f"the body is not valid JSON: it is not UTF-8 text (byte "
                        f"0x{body[exc.start]:02x} at offset {exc.start})",
                        code="invalid_json") from None
    try:
        return json.loads(text.removeprefix("\ufeff"), parse_int=_json_int,
                          parse_constant=_json_constant)
    except json.JSONDecodeError as exc:
        message = f"{exc.msg} at line {exc.lineno}, column {exc.colno}"
    except _NotJson as exc:
        message = str(exc)
    except RecursionError:
        message = "it is nested too deeply"
    raise HttpError(400, f"the body is not valid JSON: {message}", code="invalid_json")


async def parse_json(body: bytes) -> Any:
    """The request body as JSON (parsed in a thread when it is large)."""
    if len(body) <= _INLINE_JSON_BYTES:
        return _load_json(body)
    return await asyncio.to_thread(_load_json, body)


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
    encoding_format = payload.get("encoding_format")
    if encoding_format in (None, ""):
        encoding_format = "float"
    elif encoding_format not in ("float", "base64"):
        shown = f" {encoding_format[:40]!r} is not supported" \
            if isinstance(encoding_format, str) else " must be a string"
        raise HttpError(400, f"'encoding_format'{shown}; use 'float' or 'base64'",
                        param="encoding_format")
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


def parse_rerank(payload: Any) -> tuple[str, list[str], dict[str, Any], bool]:
    """A rerank request in Cohere's and Jina's shape → (query, documents, the core's
    options, return_documents). Documents are strings (or {"text": ...} objects, as Jina
    and Cohere's older API take). Only the JSON shapes are checked here; counts and
    ranges are the core's."""
    if not isinstance(payload, dict):
        raise HttpError(400, "the body must be a JSON object such as "
                        '{"query": "text", "documents": ["text", ...]}')
    query = payload.get("query")
    if not isinstance(query, str):
        raise HttpError(400, "'query' is required: a string", param="query")
    documents = payload.get("documents")
    if not isinstance(documents, list):
        raise HttpError(400, "'documents' is required: a list of strings", param="documents")
    texts = []
    for i, document in enumerate(documents):
        if isinstance(document, dict) and isinstance(document.get("text"), str):
            document = document["text"]
        if not isinstance(document, str):
            raise HttpError(400, f"'documents[{i}]' must be a string (or an object with a "
                            "string 'text')", param="documents")
        texts.append(document)
    top_n = payload.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool)):
        raise HttpError(400, "'top_n' must be an integer", param="top_n")
    return_documents = payload.get("return_documents", False)
    if return_documents is None:
        return_documents = False
    if not isinstance(return_documents, bool):
        raise HttpError(400, "'return_documents' must be true or false",
                        param="return_documents")
    for key in ("model", "instruction"):
        if payload.get(key) is not None and not isinstance(payload[key], str):
            raise HttpError(400, f"'{key}' must be a string", param=key)
    return query, texts, {"top_n": top_n or 0,
                          "instruction": payload.get("instruction") or ""}, return_documents


def rerank_body(ranking: Ranking, documents: list[str] | None, model: str) -> bytes:
    """The reply's JSON: results best first, with the document text when asked for."""
    order = ranking.order.tolist()
    scores = ranking.scores[ranking.order].tolist()
    if documents is None:
        results = [{"index": i, "relevance_score": s}
                   for i, s in zip(order, scores, strict=True)]
    else:
        results = [{"index": i, "relevance_score": s, "document": {"text": documents[i]}}
                   for i, s in zip(order, scores, strict=True)]
    return json.dumps({"model": model, "results": results,
                       "usage": {"total_tokens": ranking.prompt_tokens}},
                      separators=(",", ":")).encode()
