"""HTTP connection bounds (issue 11 item 4): --max-http-connections and --http-idle-seconds.

Before: every connection was accepted and kept for 75 s, so 1,100 idle ones took all
of the process's file descriptors (gRPC and the workers' pipes too). Now connections
beyond the cap are closed as soon as they are accepted, with a WARNING (one a second
at most in `serve`'s log), and idle ones close after the idle timeout.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedrpc.server import EmbedServer

from .helpers import running_server, wait_until

CAP = 6  # --max-http-connections of the server under test
IDLE = 1.0  # --http-idle-seconds
HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def server(fake_model_dir: Path) -> Iterator[EmbedServer]:
    with running_server(model=str(fake_model_dir), backend="fake", workers=1, http_port=0,
                        max_http_connections=CAP, http_idle_seconds=IDLE) as (srv, _):
        yield srv


def connect(srv: EmbedServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.http_port), timeout=10)


def health(sock: socket.socket) -> bytes:
    """One request on a kept-alive connection; its whole answer."""
    sock.sendall(HEALTH)
    reply = b""
    while not reply.endswith(b'{"status":"SERVING"}'):
        chunk = sock.recv(4096)
        assert chunk, f"closed by the server after {reply!r}"
        reply += chunk
    return reply


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed the connection (EOF or reset); None if it did not
    within `seconds`."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        data = sock.recv(4096)
    except (ConnectionResetError, BrokenPipeError):
        return time.monotonic() - started
    except TimeoutError:
        return None
    assert data == b"", data
    return time.monotonic() - started


def test_connections_beyond_the_cap_are_closed_at_once(server: EmbedServer,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    assert server.http is not None
    wait_until(lambda: server.http.connections == 0, 10)  # earlier tests' connections gone
    caplog.set_level(logging.WARNING, logger="embedrpc.server.frontends.http")
    kept = [connect(server) for _ in range(CAP)]
    try:
        for sock in kept:  # at the cap: every one of them is served
            assert health(sock).startswith(b"HTTP/1.1 200 OK")
        assert server.http.connections == CAP
        over = [connect(server) for _ in range(3)]
        for sock in over:
            assert closed_within(sock, 2.0) is not None
            sock.close()
        refused = [r for r in caplog.records if "refused a connection" in r.getMessage()]
        assert len(refused) == 3
        assert f"{CAP} are open, the most --max-http-connections allows" in \
            refused[0].getMessage()
        for sock in kept:  # the connections within the cap are untouched
            assert health(sock).startswith(b"HTTP/1.1 200 OK")
        kept.pop().close()  # a slot frees once the server sees the close
        wait_until(lambda: server.http.connections == CAP - 1, 10)
        kept.append(connect(server))
        assert health(kept[-1]).startswith(b"HTTP/1.1 200 OK")
    finally:
        for sock in kept:
            sock.close()
    wait_until(lambda: server.http.connections == 0, 10)


def test_idle_connections_are_closed_after_the_idle_timeout(server: EmbedServer) -> None:
    # Never a request: closed about IDLE after the connection opened.
    with connect(server) as silent:
        waited = closed_within(silent, IDLE + 5)
    assert waited is not None and IDLE - 0.1 <= waited <= IDLE + 2, waited
    # The timer restarts after each answer: a connection used every 0.6 s (under IDLE)
    # stays open past IDLE, then closes IDLE after its last answer.
    with connect(server) as busy:
        started = time.monotonic()
        for _ in range(3):
            assert health(busy).startswith(b"HTTP/1.1 200 OK")
            time.sleep(0.6 * IDLE)
        assert health(busy).startswith(b"HTTP/1.1 200 OK")
        assert time.monotonic() - started > IDLE * 1.5
        waited = closed_within(busy, IDLE + 5)
    assert waited is not None and IDLE - 0.1 <= waited <= IDLE + 2, waited
