"""gRPC connection bound: --max-grpc-connections.

An outside attack review held 20,000 connections that finished the HTTP/2 handshake and
then only answered PINGs: every file descriptor was taken, and the HTTP port went dark
with gRPC. Now gRPC closes a new connection beyond the bound as soon as it is accepted
(grpc core's `grpc.max_allowed_incoming_connections`), and calls on the connections
already open, the HTTP port and the workers carry on.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from embedrpc.client import EmbedClient

from .helpers import running_server

CAP = 3  # --max-grpc-connections of the server under test
OWN = [("grpc.use_local_subchannel_pool", 1)]  # a TCP connection of its own per client


def test_connections_beyond_the_bound_are_refused_and_the_rest_carry_on(
        fake_model_dir: Path) -> None:
    with running_server(model=str(fake_model_dir), backend="fake", workers=1, http_port=0,
                        max_grpc_connections=CAP) as (srv, target):
        held = [EmbedClient(target, options=OWN, retries=1, timeout=10) for _ in range(CAP)]
        try:
            for client in held:  # exactly the bound: every one is served
                assert client.embed(["at the bound"]).shape == (1, 64)
            with EmbedClient(target, options=OWN, retries=1, timeout=10) as extra, \
                    pytest.raises(grpc.RpcError) as exc:
                extra.embed(["one past the bound"])
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            for client in held:  # the connections already open go on
                assert client.embed(["still served"]).shape == (1, 64)
            request = urllib.request.Request(
                f"http://127.0.0.1:{srv.http_port}/v1/embeddings",
                data=json.dumps({"input": "over HTTP"}).encode(),
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as reply:  # HTTP is not shut out
                assert len(json.loads(reply.read())["data"][0]["embedding"]) == 64
            held.pop().close()  # one leaves: a new connection gets its place
            with EmbedClient(target, options=OWN, retries=1, timeout=10) as late:
                for _ in range(20):
                    try:
                        assert late.embed(["after one left"]).shape == (1, 64)
                        break
                    except grpc.RpcError as err:  # the server may not have seen it go yet
                        assert err.code() == grpc.StatusCode.UNAVAILABLE
                        time.sleep(0.25)
                else:
                    raise AssertionError("no new connection was let in after one closed")
        finally:
            for client in held:
                client.close()


def test_the_bound_is_at_least_one() -> None:
    from embedrpc.server import ServeConfig

    with pytest.raises(ValueError, match="--max-grpc-connections must be at least 1"):
        ServeConfig.of(max_grpc_connections=0)


def test_bounds_beyond_the_descriptor_limit_are_warned_about(
        fake_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        pytest.skip("no limit on open files here")
    with caplog.at_level("WARNING", logger="embedrpc.server.app"), \
            running_server(model=str(fake_model_dir), backend="fake", workers=1,
                           max_grpc_connections=soft):  # + the reserve: over the limit
        pass
    assert any(f"open files: the limit is {soft}" in r.getMessage()
               and "--max-grpc-connections" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="embedrpc.server.app"), \
            running_server(model=str(fake_model_dir), backend="fake", workers=1,
                           max_grpc_connections=max(1, soft - 300)):  # fits
        pass
    assert not any("open files: the limit" in r.getMessage() for r in caplog.records)
