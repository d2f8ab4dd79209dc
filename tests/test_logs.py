"""Structured logs with request ids, and optional OpenTelemetry tracing."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from embedrpc.server import EmbedServer, tracing
from embedrpc.server.logs import (
    JsonFormatter,
    RepeatFilter,
    RequestIdFilter,
    TextFormatter,
    clean_request_id,
    set_request_id,
)
from embedrpc.v1 import embedder_pb2 as pb
from embedrpc.v1 import embedder_pb2_grpc as pb_grpc

from .helpers import running_server, wait_until

HEX_ID = re.compile(r"[0-9a-f]{32}")


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger(f"test.logs.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_json_lines_carry_the_request_id_of_their_task() -> None:
    logger, stream = capture(JsonFormatter())

    async def call(request_id: str) -> None:
        set_request_id(request_id)
        await asyncio.sleep(0.01)  # the other call logs in between
        logger.info("embedded %d texts", 3)

    async def main() -> None:
        logger.warning("outside any call")
        await asyncio.gather(call("r-1"), call("r-2"))
        try:
            raise ValueError("boom \"quoted\"\nsecond line")
        except ValueError:
            logger.exception("failed")

    asyncio.run(main())
    lines = stream.getvalue().splitlines()
    records = [json.loads(line) for line in lines]  # one object per line
    assert len(lines) == 4
    assert "request_id" not in records[0]
    assert {r["request_id"] for r in records[1:3]} == {"r-1", "r-2"}
    for record in records:
        assert set(record) >= {"ts", "level", "logger", "message", "pid"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"])
    assert records[1]["message"] == "embedded 3 texts" and records[1]["level"] == "INFO"
    assert records[3]["level"] == "ERROR" and 'ValueError: boom "quoted"' in \
        records[3]["exception"]


def test_text_lines_append_the_request_id() -> None:
    logger, stream = capture(TextFormatter("%(levelname)s %(message)s"))

    async def main() -> None:
        logger.info("no call")
        set_request_id("abc")
        logger.info("in a call")

    asyncio.run(main())
    assert stream.getvalue().splitlines() == ["INFO no call", "INFO in a call request_id=abc"]


def test_repeated_lines_are_written_once_a_second_with_a_count() -> None:
    """RepeatFilter on a fake clock: the first copy of a line goes through, the copies
    within the next second do not; the first one after it says how many were left out.
    Lines that differ (message, level, logger) are counted apart."""
    now = [100.0]
    logger, stream = capture(TextFormatter("%(levelname)s %(message)s"))
    logger.handlers[0].addFilter(RepeatFilter(1.0, clock=lambda: now[0]))
    for _ in range(1000):
        logger.warning("refused a connection (%d open)", 8)
    logger.error("refused a connection (%d open)", 8)  # another level: its own line
    logger.warning("something else")
    now[0] += 0.999  # still within the second: left out
    logger.warning("refused a connection (%d open)", 8)
    now[0] += 0.001  # the second has passed: through, with the count
    logger.warning("refused a connection (%d open)", 8)
    now[0] += 5
    logger.warning("refused a connection (%d open)", 8)  # nothing left out since
    assert stream.getvalue().splitlines() == [
        "WARNING refused a connection (8 open)",
        "ERROR refused a connection (8 open)",
        "WARNING something else",
        "WARNING refused a connection (8 open) (1000 more)",
        "WARNING refused a connection (8 open)",
    ]


def test_repeat_filter_forgets_old_lines_beyond_its_bound() -> None:
    now = [0.0]
    repeat = RepeatFilter(1.0, max_lines=10, clock=lambda: now[0])
    logger, stream = capture(TextFormatter("%(message)s"))
    logger.handlers[0].addFilter(repeat)
    for i in range(10):
        logger.info("line %d", i)
    assert len(repeat._seen) == 10  # at the bound: all remembered
    now[0] += 2
    logger.info("line 10")  # the 11th: the ten older than a second are forgotten
    assert len(repeat._seen) == 1
    assert stream.getvalue().splitlines() == [f"line {i}" for i in range(11)]


def test_serve_logging_rate_limits_repeated_lines() -> None:
    """configure_logging (what `embedrpc serve` and each worker call) installs it."""
    code = ("import logging, time\n"
            "from embedrpc.server.logs import configure_logging\n"
            "configure_logging('INFO', 'text', text_format='%(levelname)s %(message)s')\n"
            "log = logging.getLogger('asyncio')\n"
            "for _ in range(500): log.error('socket.accept() out of system resource')\n"
            "time.sleep(1.05)\n"
            "log.error('socket.accept() out of system resource')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "ERROR socket.accept() out of system resource",
        "ERROR socket.accept() out of system resource (499 more)"]


def test_caller_ids_are_kept_only_when_plain() -> None:
    assert clean_request_id("req-42.a:b/c") == "req-42.a:b/c"
    for bad in ("", "a b", "x\r\nSet-Cookie: y", "é", "x" * 129):
        assert clean_request_id(bad) == ""


@pytest.fixture(scope="module")
def server(fake_model_dir: Path) -> Iterator[tuple[EmbedServer, str]]:
    with running_server(model=str(fake_model_dir), backend="fake", workers=1,
                        http_port=0) as running:
        yield running


def test_request_ids_reach_responses_and_log_records(server,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    srv, target = server
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.DEBUG, logger="embedrpc.server.core")
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        own = stub.Embed(pb.EmbedRequest(inputs=["a"], request_id="req-42"), timeout=10)
        meta = stub.Embed(pb.EmbedRequest(inputs=["b"]), metadata=[("x-request-id", "meta-7")],
                          timeout=10)
        fresh = stub.Embed(pb.EmbedRequest(inputs=["c"]), timeout=10)
        streamed = list(stub.EmbedStream(iter([pb.EmbedRequest(inputs=["d"], request_id="s1"),
                                               pb.EmbedRequest(inputs=["e"])]),
                                         metadata=[("x-request-id", "stream-9")], timeout=10))
    assert (own.request_id, meta.request_id) == ("req-42", "meta-7")
    assert HEX_ID.fullmatch(fresh.request_id)
    assert [r.request_id for r in streamed] == ["s1", "stream-9"]
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=10)
    conn.request("POST", "/v1/embeddings", body=b'{"input": "f"}',
                 headers={"x-request-id": "http-5", "Content-Type": "application/json"})
    assert conn.getresponse().read()
    conn.close()
    logged = [r.request_id for r in caplog.records if r.getMessage().startswith("embed ")]
    # The stream's two requests run concurrently: their records may come in either order.
    assert sorted(logged) == sorted(["req-42", "meta-7", fresh.request_id, "s1", "stream-9",
                                     "http-5"])


FORGED = "2026-01-01 00:00:00,000 embedrpc.server.app INFO admin logged in"


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_a_request_id_cannot_forge_a_log_line(server, formatter: logging.Formatter) -> None:
    """EmbedRequest.request_id is cleaned like the x-request-id header (issue 11 item 8):
    one with a line break (or anything but 1..128 plain characters) is not used; the call
    goes on under the metadata's id or a generated one, and every log line is ours."""
    _, target = server
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("embedrpc.server")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)  # the core logs one DEBUG line per embed call
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.EmbedderStub(channel)
            plain = stub.Embed(pb.EmbedRequest(inputs=["a"], request_id=f"abc\n{FORGED}"),
                               timeout=10)
            with_meta = stub.Embed(pb.EmbedRequest(inputs=["b"], request_id=f"x\r{FORGED}"),
                                   metadata=[("x-request-id", "meta-8")], timeout=10)
            [streamed] = stub.EmbedStream(iter([pb.EmbedRequest(
                inputs=["c"], request_id=f"s\n{FORGED}")]), timeout=10)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert HEX_ID.fullmatch(plain.request_id) and with_meta.request_id == "meta-8"
    assert HEX_ID.fullmatch(streamed.request_id)
    lines = stream.getvalue().splitlines()
    assert len([line for line in lines if "embed inputs=1" in line]) == 3, lines
    assert not [line for line in lines if "admin logged in" in line], lines
    if isinstance(formatter, JsonFormatter):
        ids = {json.loads(line).get("request_id") for line in lines}
        assert {plain.request_id, "meta-8", streamed.request_id} <= ids


def test_spans_when_opentelemetry_is_installed(server, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # What trace.set_tracer_provider() would do, without leaving it set for later tests.
    monkeypatch.setattr(tracing, "_TRACER", provider.get_tracer("embedrpc"))
    srv, target = server
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        reply = stub.Embed(pb.EmbedRequest(inputs=["x", "y z"]), timeout=10,
                           metadata=[("traceparent", parent)])
        with pytest.raises(grpc.RpcError):
            stub.Embed(pb.EmbedRequest(inputs=[]), timeout=10)
    # A call's status reaches the client as soon as the servicer aborts; its span ends a
    # moment later.
    def spans_now() -> list:
        return [s for s in exporter.get_finished_spans()
                if s.name == "embedrpc.v1.Embedder/Embed"]

    wait_until(lambda: len(spans_now()) >= 2, 5, lambda: str(spans_now()))
    spans = spans_now()
    [ok] = [s for s in spans if s.attributes["rpc.grpc.status_code"] == 0]
    assert ok.attributes["embedrpc.inputs"] == 2
    assert ok.attributes["embedrpc.tokens"] == reply.usage.prompt_tokens
    assert ok.attributes["embedrpc.model"] == srv.spec.name
    assert ok.attributes["rpc.grpc.status_code"] == 0
    assert format(ok.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert ok.parent is not None and format(ok.parent.span_id, "016x") == "b7ad6b7169203331"
    [failed] = [s for s in spans if s.attributes["rpc.grpc.status_code"] ==
                grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    assert not failed.status.is_ok and "inputs is empty" in failed.status.description
    # HTTP: one span per request too, child of the caller's traceparent header.
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=10)
    conn.request("POST", "/v1/embeddings", body=b'{"input": ["x", "y z"]}',
                 headers={"Content-Type": "application/json", "traceparent": parent})
    assert conn.getresponse().status == 200
    conn.close()
    wait_until(lambda: [s for s in exporter.get_finished_spans()
                        if s.name == "POST /v1/embeddings"], 5)
    [http_span] = [s for s in exporter.get_finished_spans() if s.name == "POST /v1/embeddings"]
    assert http_span.attributes["http.response.status_code"] == 200
    assert http_span.attributes["embedrpc.inputs"] == 2
    assert http_span.attributes["embedrpc.tokens"] == reply.usage.prompt_tokens
    assert format(http_span.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"


def test_no_span_is_made_without_a_tracer_provider() -> None:
    """The API alone (no SDK, no provider set): calls make no span at all."""
    code = ("from embedrpc.server import tracing\n"
            "assert tracing.ENABLED\n"
            "with tracing.call_span('x', {'traceparent': 'junk'}, {'a': 1}) as span:\n"
            "    assert span is tracing._NO_SPAN\n"
            "from opentelemetry import trace\n"
            "from opentelemetry.sdk.trace import TracerProvider\n"
            "trace.set_tracer_provider(TracerProvider())\n"
            "with tracing.call_span('x', {}, {'a': 1}) as span:\n"
            "    assert span is not tracing._NO_SPAN and span._span.is_recording()\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


def test_tracing_is_skipped_cleanly_without_opentelemetry() -> None:
    code = ("import sys; sys.modules['opentelemetry'] = None\n"
            "from embedrpc.server import tracing\n"
            "assert not tracing.ENABLED\n"
            "with tracing.call_span('x', {'traceparent': 'junk'}, {'a': 1}) as span:\n"
            "    span.set_attribute('b', 2); span.set_error('INTERNAL', 'no')\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


def test_serve_with_json_logs_from_a_config_file(tmp_path: Path) -> None:
    """End to end: `embedrpc serve --config` with log-format json; every line is JSON."""
    config = tmp_path / "serve.toml"
    config.write_text('model = "demo"\nbackend = "fake"\nlog-format = "json"\n'
                      'log-level = "DEBUG"\nhost = "127.0.0.1"\nport = 0\ndevice = "cpu"\n')
    proc = subprocess.Popen([sys.executable, "-m", "embedrpc", "serve", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items()
                                 if not k.startswith("EMBEDRPC_")})
    assert proc.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        def serving_port() -> int | None:
            for line in list(lines):
                if match := re.search(r"serving demo on 127\.0\.0\.1:(\d+)", line):
                    return int(match.group(1))
            return None

        wait_until(lambda: serving_port() is not None or proc.poll() is not None, 90,
                   lambda: "server did not start:\n" + "".join(lines))
        port = serving_port()
        assert port, "server did not start:\n" + "".join(lines)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = pb_grpc.EmbedderStub(channel).Embed(
                pb.EmbedRequest(inputs=["hello"], request_id="cli-1"), timeout=10)
        assert reply.request_id == "cli-1"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        reader.join(10)
    records = [json.loads(line) for line in lines if line.strip()]
    assert records, "no log lines"
    for record in records:
        assert {"ts", "level", "logger", "message"} <= set(record)
    [embed] = [r for r in records if r["message"].startswith("embed inputs=1")]
    assert embed["request_id"] == "cli-1" and embed["level"] == "DEBUG"
    assert any(r["message"] == "stopped" for r in records)


def test_grpc_core_does_not_log_each_failed_tls_handshake(fake_model_dir: Path,
                                                           tmp_path: Path) -> None:
    """50 plaintext connections to a TLS gRPC port: gRPC core's own INFO line per failed
    handshake (which bypasses the repeat filter) is not written; GRPC_VERBOSITY=ERROR is
    serve's default."""
    import socket

    from cryptography.hazmat.primitives.asymmetric import ec

    from .helpers import certificate, pem, server_log, start_server, write_key

    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "cert.pem").write_bytes(pem(certificate("localhost", key, None, key)))
    write_key(tmp_path / "key.pem", key)
    proc, target = start_server("--model", str(fake_model_dir), "--backend", "fake",
                                "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key",
                                str(tmp_path / "key.pem"))
    try:
        port = int(target.rsplit(":", 1)[1])
        for _ in range(50):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GARBAGE\r\n\r\n")
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGTERM)
    log = server_log(proc)
    assert "Handshake failed" not in log, log[-2000:]


def test_generated_request_ids_are_32_hex_digits_and_do_not_repeat() -> None:
    """A call that brings no id gets 128 random bits as 32 lowercase hex digits (the
    width of a uuid4's hex, which the ids were before); 100,000 are all distinct, and
    another process's are not this one's."""
    from embedrpc.server.logs import new_request_id

    ids = [new_request_id() for _ in range(100_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids[:1000])
    assert len(set(ids)) == len(ids)
    code = "from embedrpc.server.logs import new_request_id as n; print(n(), n())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, timeout=60).stdout.split()
    assert len(other) == 2 and not set(other) & set(ids)
