"""The OpenAI-compatible HTTP API, with plain HTTP requests (http.client and raw sockets)."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import logging
import re
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedrpc.client import EmbedClient
from embedrpc.server import EmbedServer, ServeConfig
from embedrpc.server.errors import (
    InvalidInput,
    ModelError,
    Overloaded,
    Unavailable,
    WorkerFailed,
)
from embedrpc.server.frontends.http import error_from_embed
from embedrpc.v1 import embedder_pb2 as pb
from embedrpc.v1 import embedder_pb2_grpc as pb_grpc

from .helpers import running_server, wait_until

LIMIT = 64 << 10  # --max-message-bytes of the server under test


@pytest.fixture(scope="module")
def server(fake_model_dir: Path) -> Iterator[tuple[EmbedServer, str]]:
    with running_server(model=str(fake_model_dir), backend="fake", workers=1, http_port=0,
                        max_message_bytes=LIMIT, max_inputs=50) as running:
        yield running


def call(srv: EmbedServer, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=10)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                       **(headers or {})})
        reply = conn.getresponse()
        raw = reply.read()
        assert reply.getheader("Content-Type") == "application/json"
        return reply.status, dict(reply.getheaders()), json.loads(raw) if raw else None
    finally:
        conn.close()


def embeddings(srv: EmbedServer, **request: Any) -> dict[str, Any]:
    status, _, out = call(srv, "POST", "/v1/embeddings", request)
    assert status == 200, out
    return out


def grpc_vectors(target: str, texts: list[str], dimensions: int = 0) -> np.ndarray:
    with EmbedClient(target) as client:
        return client.embed(texts, dimensions=dimensions)


def assert_openai_error(status: int, out: Any, expected_status: int, *, words: str,
                        param: str | None = None) -> None:
    assert status == expected_status, out
    assert set(out) == {"error"}
    error = out["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]
    assert error["param"] == param
    assert error["type"] == ("invalid_request_error" if expected_status < 500
                             else "server_error") or expected_status in (401, 403, 429)


def test_string_input(server) -> None:
    srv, target = server
    text = "What is the capital of China?"
    out = embeddings(srv, input=text, model="anything", user="u1")
    assert out["object"] == "list" and out["model"] == srv.spec.name
    [item] = out["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    vector = np.array(item["embedding"], dtype=np.float32)
    np.testing.assert_array_equal(vector, grpc_vectors(target, [text])[0])
    with EmbedClient(target) as client:
        tokens = client.tokenize([text]).usage.prompt_tokens
    assert out["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_list_input_keeps_order_and_equals_grpc(server) -> None:
    srv, target = server
    texts = [f"document {i} " + "x " * i for i in range(12)]
    out = embeddings(srv, input=texts)
    assert [d["index"] for d in out["data"]] == list(range(12))
    vectors = np.array([d["embedding"] for d in out["data"]], dtype=np.float32)
    np.testing.assert_array_equal(vectors, grpc_vectors(target, texts))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def test_base64_is_little_endian_float32_of_the_same_vectors(server) -> None:
    srv, target = server
    texts = ["alpha", "beta gamma"]
    floats = embeddings(srv, input=texts, encoding_format="float")
    encoded = embeddings(srv, input=texts, encoding_format="base64")
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                        for d in encoded["data"]])
    np.testing.assert_array_equal(decoded, np.array([d["embedding"] for d in floats["data"]],
                                                    dtype=np.float32))
    np.testing.assert_array_equal(decoded, grpc_vectors(target, texts))
    assert encoded["usage"] == floats["usage"]


def test_dimensions_truncate_then_renormalise(server) -> None:
    srv, target = server
    full = grpc_vectors(target, ["matryoshka"])[0]
    out = embeddings(srv, input="matryoshka", dimensions=32)
    vector = np.array(out["data"][0]["embedding"])
    assert vector.shape == (32,)
    np.testing.assert_allclose(vector, full[:32] / np.linalg.norm(full[:32]), atol=1e-6)


@pytest.mark.parametrize(("body", "words", "param"), [
    (b"{not json", "not valid JSON", None),
    (b"\xff\xfe", "not valid JSON", None),
    ([1, 2], "must be a JSON object", None),
    ({}, "'input' is required", "input"),
    ({"input": []}, "inputs is empty; send 1 to 50 texts", "input"),
    ({"input": [1, 2, 3]}, "token-id arrays are not accepted", "input"),
    ({"input": [[1, 2], [3]]}, "token-id arrays are not accepted", "input"),
    ({"input": ["a", None]}, "a string or a list of strings", "input"),
    ({"input": "a", "encoding_format": "float16"}, "use 'float' or 'base64'", "encoding_format"),
    ({"input": "a", "dimensions": 0}, "dimensions=0 is out of range; use 32..64", "dimensions"),
    ({"input": "a", "dimensions": "64"}, "'dimensions' must be an integer", "dimensions"),
    ({"input": "a", "dimensions": True}, "'dimensions' must be an integer", "dimensions"),
    ({"input": "a", "dimensions": 5000}, "dimensions=5000 is out of range", "dimensions"),
    ({"input": "a", "dimensions": 31}, "dimensions=31 is out of range; use 32..64",
     "dimensions"),
    ({"input": "a", "prompt_name": "nope"}, "nope", None),
    ({"input": "a", "model": 3}, "'model' must be a string", "model"),
    ({"input": ["a"] * 51}, "51 inputs in one request; at most 50 are allowed", "input"),
])
def test_bad_requests_get_400_with_an_openai_error(server, body: Any, words: str,
                                                   param: str | None) -> None:
    srv, _ = server
    status, _, out = call(srv, "POST", "/v1/embeddings", body)
    assert_openai_error(status, out, 400, words=words, param=param)
    # Every 400 has a code (the token-id refusal had null: outside review)
    assert out["error"]["code"] == ("invalid_json" if words == "not valid JSON"
                                    else "invalid_argument")


@pytest.mark.parametrize(("body", "words", "param"), [
    (b'{"input": "\\ud800"}', "inputs[0] holds a lone surrogate (U+D800 at character 0)",
     "input"),
    (b'{"input": ["ok", "a\\udfffb"]}', "inputs[1] holds a lone surrogate (U+DFFF at "
     "character 1)", "input"),
    (b'{"input": "x", "instruction": "\\ud83d"}', "instruction holds a lone surrogate",
     "instruction"),
    (b'{"input": "x", "dimensions": ' + b"9" * 5000 + b"}",
     "not valid JSON: it has an integer of 5000 digits; at most 32", None),
    (b"[" * 50_000, "not valid JSON: it is nested too deeply", None),
    (b'{"input": "caf\xc3"}', "not valid JSON: it is not UTF-8 text (byte 0xc3 at offset 14)",
     None),
    (b'{"input": "\xed\xa0\x80"}', "it is not UTF-8 text (byte 0xed at offset 11)", None),
    (b'{"input": NaN}', "not valid JSON: NaN is not a JSON value", None),
    (b'{"input": "x",}', "not valid JSON: Expecting property name enclosed in double quotes "
     "at line 1, column 15", None),
    (b"", "not valid JSON: Expecting value at line 1, column 1", None),
    (b'"just a string"', "must be a JSON object", None),
    (b'{"input": {"text": "x"}}', "'input' must be a string or a list of strings", "input"),
    (b'{"input": "x", "dimensions": 1.5}', "'dimensions' must be an integer", "dimensions"),
    (b'{"input": "x", "dimensions": [64]}', "'dimensions' must be an integer", "dimensions"),
    (b'{"input": "x", "encoding_format": ["float"]}', "'encoding_format' must be a string; "
     "use 'float' or 'base64'", "encoding_format"),
    (b'{"input": "x", "encoding_format": "' + b"f" * 10_000 + b'"}',
     "'encoding_format' 'ffff", "encoding_format"),
    (b'{"input": "x", "prompt_name": {"a": 1}}', "'prompt_name' must be a string",
     "prompt_name"),
])
def test_malformed_bodies_get_400_with_our_own_message(
        server, body: bytes, words: str, param: str | None,
        caplog: pytest.LogCaptureFixture) -> None:
    """Issue 11 item 6. Before: 500 quoting Python ("surrogates not allowed" via the
    tokenizer's TypeError, sys.set_int_max_str_digits(), "maximum recursion depth
    exceeded"), a traceback in the log; a UTF-8-encoded surrogate was let through."""
    srv, _ = server
    caplog.set_level(logging.INFO)
    status, _, out = call(srv, "POST", "/v1/embeddings", body)
    assert_openai_error(status, out, 400, words=words, param=param)
    message = out["error"]["message"]
    assert len(message) < 300, message  # nothing of the body is echoed at length
    for internal in ("sys.", "surrogates not allowed", "recursion", "codec", "TextEncodeInput",
                     "Traceback", "internal error"):
        assert internal not in message
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


@pytest.mark.parametrize("content_type", [
    None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/jsonx", "text/json"])
def test_embeddings_need_a_json_content_type(server, content_type: str | None) -> None:
    """What a web page can make a browser send to any address without a CORS preflight
    (text/plain, forms) is refused: 415, before the body is read. Before: accepted."""
    srv, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=10)
    try:
        conn.putrequest("POST", "/v1/embeddings")
        if content_type is not None:
            conn.putheader("Content-Type", content_type)
        conn.putheader("Content-Length", "16")
        conn.endheaders(b'{"input": "hi!"}')
        reply = conn.getresponse()
        out = json.loads(reply.read())
    finally:
        conn.close()
    assert_openai_error(reply.status, out, 415, words="Content-Type must be application/json "
                        f"(got {repr(content_type) if content_type else 'none'})")
    assert out["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8",
                                          "Application/JSON", " application/json "])
def test_json_content_type_spellings_are_accepted(server, content_type: str) -> None:
    srv, _ = server
    status, _, out = call(srv, "POST", "/v1/embeddings", {"input": "hi"},
                          headers={"Content-Type": content_type})
    assert status == 200 and len(out["data"][0]["embedding"]) == 64


def test_an_internal_error_is_logged_not_told(server, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """A bug answers 500 with the request id; its cause goes to the log only."""
    srv, _ = server

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret detail of the server's insides")

    monkeypatch.setattr(srv.core, "embed", broken)
    status, headers, out = call(srv, "POST", "/v1/embeddings", {"input": "x"})
    assert_openai_error(status, out, 500, words=f"internal error (request id "
                        f"{headers['x-request-id']}); the server log says more")
    assert "secret" not in json.dumps(out)
    [record] = [r for r in caplog.records if r.getMessage() == "HTTP POST /v1/embeddings failed"]
    assert record.exc_info and "secret detail" in str(record.exc_info[1])


def test_oversize_body_gets_413(server) -> None:
    srv, _ = server
    status, headers, out = call(srv, "POST", "/v1/embeddings",
                                {"input": ["x" * 1000] * 70})  # ~70 KB > 64 KiB
    assert_openai_error(status, out, 413, words=f"larger than {LIMIT} bytes")
    assert out["error"]["code"] == "request_too_large"
    assert headers["Connection"] == "close"


def raw(srv: EmbedServer, data: bytes, *, shutdown: bool = False) -> bytes:
    """Send bytes, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=10) as sock:
        sock.sendall(data)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_expect_100_continue_refused_before_the_body_is_sent(server) -> None:
    srv, _ = server
    head = (f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: {LIMIT + 1}\r\n"
            "Content-Type: application/json\r\nExpect: 100-continue\r\n\r\n").encode()
    reply = raw(srv, head)
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in reply
    # Within the limit, the server asks for the body, then answers.
    body = json.dumps({"input": "hi"}).encode()
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=10) as sock:
        sock.sendall(f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}"
                     "\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
                     "Connection: close\r\n\r\n".encode())
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize(("data", "status"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET /health HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 needs Host (RFC 9112 section 3.2)
    (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header: x\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n folded: x\r\n\r\n", 400),
    (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"a" * (70 << 10) + b"\r\n\r\n", 400),
    (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
     400),
])
def test_malformed_requests_get_an_error_and_the_connection_closes(
        server, data: bytes, status: int, caplog: pytest.LogCaptureFixture) -> None:
    """HTTP framing is aiohttp's; what it cannot parse is answered like every other
    error, OpenAI-style JSON, in our words: nothing the client sent is quoted back
    (aiohttp's own text repeats the bytes, e.g. "Invalid method encountered: b'GARBAGE'").
    The connection closes (raw() reads until it does) and the log has no traceback,
    only one INFO line."""
    srv, _ = server
    caplog.set_level(logging.INFO)
    reply = raw(srv, data)
    assert re.match(rb"HTTP/\d\.\d %d " % status, reply), reply[:200]
    head, body = reply.split(b"\r\n\r\n", 1)
    assert b"content-type: application/json" in head.lower(), reply[:300]
    assert_openai_error(status, json.loads(body), status, words="")
    for sent in (b"GARBAGE", b"abc", b"gzip", b"aaaaaaaa", b"zz", b"Bad Header", b"folded",
                 b"\xb2", b"b'"):
        assert sent not in body, body
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


def test_chunked_body_keep_alive_and_pipelining(server) -> None:
    srv, target = server
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=10)
    conn.request("POST", "/v1/embeddings", body=iter([b'{"input": ', b'["chunked"]}']),
                 encode_chunked=True, headers={"Content-Type": "application/json"})
    reply = conn.getresponse()
    first = json.loads(reply.read())
    sock = conn.sock
    conn.request("GET", "/health")  # the same connection, kept alive
    assert conn.getresponse().read() == b'{"status":"SERVING"}'
    assert conn.sock is sock
    conn.close()
    np.testing.assert_array_equal(np.array(first["data"][0]["embedding"], dtype=np.float32),
                                  grpc_vectors(target, ["chunked"])[0])
    # Two requests in one write: two answers, in order.
    body = b'{"input": "p"}'
    one = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    replies = raw(srv, one + b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert replies.startswith(b"HTTP/1.1 200 OK") and replies.count(b"HTTP/1.1 200 OK") == 2
    assert replies.rstrip().endswith(b'"max_length":64}]}')


def test_health_models_and_routing(server, monkeypatch: pytest.MonkeyPatch) -> None:
    srv, _ = server
    status, headers, out = call(srv, "GET", "/health", headers={"x-request-id": "probe-1"})
    assert (status, out) == (200, {"status": "SERVING"})
    assert headers["x-request-id"] == "probe-1"
    assert srv.http is not None
    monkeypatch.setattr(srv.http, "serving", lambda: False)
    assert call(srv, "GET", "/health")[:3:2] == (503, {"status": "NOT_SERVING"})
    monkeypatch.undo()
    status, _, out = call(srv, "GET", "/v1/models")
    assert status == 200 and out["object"] == "list"
    assert [(m["id"], m["object"], m["dimensions"]) for m in out["data"]] == \
        [(srv.spec.name, "model", 64)]
    status, _, out = call(srv, "GET", "/v2/nothing")
    assert_openai_error(status, out, 404, words="no route '/v2/nothing'")
    status, headers, out = call(srv, "GET", "/v1/embeddings")
    assert_openai_error(status, out, 405, words="use POST")
    assert headers["Allow"] == "POST"


def test_request_id_comes_back(server) -> None:
    srv, _ = server
    _, headers, _ = call(srv, "POST", "/v1/embeddings", {"input": "a"},
                         headers={"X-Request-Id": "abc-123"})
    assert headers["x-request-id"] == "abc-123"
    _, headers, _ = call(srv, "POST", "/v1/embeddings", {"input": "a"},
                         headers={"X-Request-Id": "bad id\twith spaces"})
    assert len(headers["x-request-id"]) == 32  # refused, a fresh one generated


def test_error_kinds_map_to_http_statuses() -> None:
    for error, status in ((InvalidInput("x"), 400), (Overloaded("x"), 429),
                          (Unavailable("x"), 503), (WorkerFailed("x"), 500)):
        mapped = error_from_embed(error)
        assert mapped.status == status
        assert mapped.body()["error"]["message"] == "x"


def test_http_off_unless_asked(fake_server) -> None:
    assert fake_server[0].http_port is None


def test_https_and_api_keys(fake_model_dir: Path, tmp_path: Path) -> None:
    """With TLS and API keys on the gRPC port, HTTP speaks HTTPS and wants the key too."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    api_key = "k" * 24
    with running_server(model=str(fake_model_dir), backend="fake", workers=1, http_port=0,
                        tls_cert=str(cert), tls_key=str(key), api_keys=(api_key,)) as (srv, _):
        context = ssl.create_default_context(cafile=str(cert))

        def https(method: str, path: str, headers: dict[str, str]) -> tuple[int, dict, Any]:
            conn = http.client.HTTPSConnection("127.0.0.1", srv.http_port, timeout=10,
                                               context=context)
            body = b'{"input": "secret text"}' if method == "POST" else None
            conn.request(method, path, body=body,
                         headers={"Content-Type": "application/json", **headers})
            reply = conn.getresponse()
            out = json.loads(reply.read())
            conn.close()
            return reply.status, dict(reply.getheaders()), out

        assert https("GET", "/health", {})[0] == 200  # open for probes
        status, headers, out = https("POST", "/v1/embeddings", {})
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert out["error"]["type"] == "authentication_error"
        assert "missing credentials" in out["error"]["message"]
        status, _, out = https("POST", "/v1/embeddings", {"Authorization": "Bearer wrong"})
        assert status == 401 and out["error"]["message"] == "invalid API key"
        assert https("GET", "/v1/models", {})[0] == 401
        status, _, out = https("POST", "/v1/embeddings", {"Authorization": f"Bearer {api_key}"})
        assert status == 200 and len(out["data"][0]["embedding"]) == 64
        # One Authorization header: two are refused even when one holds the key.
        conn = http.client.HTTPSConnection("127.0.0.1", srv.http_port, timeout=10,
                                           context=context)
        conn.putrequest("POST", "/v1/embeddings")
        for value in ("Bearer wrong", f"Bearer {api_key}"):
            conn.putheader("Authorization", value)
        body = b'{"input": "secret text"}'
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        reply = conn.getresponse()
        out = json.loads(reply.read())
        conn.close()
        assert reply.status == 401
        assert out["error"]["message"] == ("send the Authorization header once: a request "
                                           "carries one API key")
        # Bytes that are not UTF-8 in the header: refused as a wrong key (401), not a 500.
        raw = context.wrap_socket(socket.create_connection(("127.0.0.1", srv.http_port),
                                                           timeout=10),
                                  server_hostname="127.0.0.1")
        body = b'{"input": "x"}'
        raw.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: "
                    b"application/json\r\nAuthorization: Bearer \xff" + api_key.encode()
                    + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = raw.recv(65536)
        raw.close()
        assert head.startswith(b"HTTP/1.1 401"), head[:200]


def test_busy_http_port_stops_the_start_with_a_clear_error(fake_model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ModelError, match=f"cannot listen for HTTP: .*{port}"), \
                running_server(model=str(fake_model_dir), backend="fake", workers=1,
                               http_port=port):
            pass


def test_listening_during_warm_up_answers_503(fake_model_dir: Path) -> None:
    """The gRPC, HTTP and metrics ports open before the warm-up (a busy port fails fast);
    until the workers are warm, health says NOT_SERVING (503 on HTTP) and embeddings
    UNAVAILABLE "still loading" (503), rather than a refused connection."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    # The fake backend's warm-up batch takes fake_delay_ms.
    srv = EmbedServer(ServeConfig.of(model=str(fake_model_dir), backend="fake", workers=1,
                                  device="cpu", host="127.0.0.1", port=0, http_port=0,
                                  metrics_port=0, fake_delay_ms=3000))
    started = asyncio.run_coroutine_threadsafe(srv.start(), loop)
    try:
        wait_until(lambda: srv.http_port is not None or started.done(), 60,
                   lambda: f"HTTP not listening: {started}")
        assert not started.done()
        assert call(srv, "GET", "/health")[::2] == (503, {"status": "NOT_SERVING"})
        status, _, out = call(srv, "POST", "/v1/embeddings", {"input": "early"})
        assert_openai_error(status, out, 503, words="still loading")
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics") as reply:
            assert "embedrpc_workers_alive 0.0" in reply.read().decode()
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "embedrpc.v1.Embedder"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service),
                                     timeout=10, wait_for_ready=True)
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as early:
                pb_grpc.EmbedderStub(channel).Embed(pb.EmbedRequest(inputs=["early"]),
                                                    timeout=10)
            assert early.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in early.value.details()
            assert not started.done()
            started.result(60)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
        assert call(srv, "GET", "/health")[::2] == (200, {"status": "SERVING"})
    finally:
        asyncio.run_coroutine_threadsafe(srv.stop(grace=1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
