"""TLS, mutual TLS and API keys: real servers (fake backend) on loopback, certificates made
here at test time (an EC P-256 CA, a server certificate for 127.0.0.1 and localhost, a
client certificate from that CA, and one from another CA)."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from embedrpc.cli import main, parse_args
from embedrpc.client import AsyncEmbedClient, EmbedClient
from embedrpc.server import EmbedServer, ServeConfig
from embedrpc.server.frontends import http as http_frontend
from embedrpc.server.security import (
    BAD_SCHEME,
    INVALID_KEY,
    MISSING_CREDENTIALS,
    SEVERAL_KEYS,
    ApiKeys,
    read_keys_file,
)

from .helpers import (
    EMBEDRPC,
    certificate,
    pem,
    running_frontends,
    running_server,
    start_server,
    wait_until,
    write_key,
)

KEY = "k-3f9a1c2e7b6d4a58b0e1f2a3c4d5e6f7"  # given with api_keys=
FILE_KEYS = ("file-key-0123456789abcdef", "file-key-fedcba9876543210")
WRONG = "k-wrong-000000000000000000000000000"
TIMEOUT = 10.0  # seconds per call; a refused handshake answers in milliseconds
# The servers the gRPC checks run against: today's one process, and two front-end
# processes on one port with a supervisor (serve --frontends 2), which must hold every
# check alike (issue 13, item 5).
LAYOUTS = ["one process", "frontends 2"]


@contextmanager
def serving(layout: str, **config: object) -> Iterator[str]:
    """A server in `layout` (LAYOUTS) with `config`; yields its target."""
    if layout == "one process":
        with running_server(**config) as (_, target):
            yield target
    else:
        with running_frontends(2, **config) as (target, _):
            yield target


# -- certificates ---------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path  # CA that signed the server and the good client certificate
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # an unrelated CA
    other_client_cert: Path  # signed by other_ca
    other_client_key: Path
    encrypted_key: Path  # server_key, password-protected
    stray_key: Path  # a key that belongs to no certificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    new_key = ec.generate_private_key
    ca_key, other_key = new_key(ec.SECP256R1()), new_key(ec.SECP256R1())
    ca = certificate("embedrpc test CA", ca_key, None, ca_key, ca=True)
    other = certificate("some other CA", other_key, None, other_key, ca=True)
    server_key, client_key, other_client_key = (new_key(ec.SECP256R1()) for _ in range(3))
    server = certificate("localhost", server_key, ca, ca_key,
                          usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=[x509.DNSName("localhost"),
                                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = certificate("client", client_key, ca, ca_key,
                          usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    other_client = certificate("intruder", other_client_key, other, other_key,
                                usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    pki = Pki(*(d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem",
                                "client.key", "other-ca.pem", "other-client.pem",
                                "other-client.key", "encrypted.key", "stray.key")))
    pki.ca.write_bytes(pem(ca))
    pki.other_ca.write_bytes(pem(other))
    pki.server_cert.write_bytes(pem(server) + pem(ca))  # a chain, as deployed
    pki.client_cert.write_bytes(pem(client))
    pki.other_client_cert.write_bytes(pem(other_client))
    write_key(pki.server_key, server_key)
    write_key(pki.client_key, client_key)
    write_key(pki.other_client_key, other_client_key)
    write_key(pki.encrypted_key, server_key, b"secret")
    write_key(pki.stray_key, new_key(ec.SECP256R1()))
    return pki


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(f"# embedrpc API keys, one per line\n\n{FILE_KEYS[0]}\n"
                    f"   # an indented comment\n  {FILE_KEYS[1]}  \n")
    path.chmod(0o600)
    return path


def _code(exc: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return exc.value.code()  # type: ignore[attr-defined]


def _all_calls(client: EmbedClient) -> dict[str, object]:
    """Embed, EmbedStream, Tokenize and Info, each made once; a refusal raises RpcError."""
    return {
        "Embed": lambda: client.embed(["a text"]),
        "EmbedStream": lambda: [r.unwrap() for r in client.stream([["a text"], ["two"]])],
        "Tokenize": lambda: client.tokenize(["a text"]),
        "Info": client.info,
    }


def _assert_all_answer(client: EmbedClient) -> None:
    results = {name: call() for name, call in _all_calls(client).items()}  # type: ignore[operator]
    assert results["Embed"].shape == (1, 64)  # type: ignore[union-attr]
    assert [r.shape for r in results["EmbedStream"]] == [(1, 64), (1, 64)]  # type: ignore[union-attr]
    assert len(results["Tokenize"].inputs) == 1  # type: ignore[union-attr]
    assert results["Info"].dimensions == 64  # type: ignore[union-attr]


# -- TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=LAYOUTS)
def tls_server(fake_model_dir: Path, pki: Pki, request: pytest.FixtureRequest) -> Iterator[str]:
    with serving(request.param, model=str(fake_model_dir), backend="fake",
                 tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)) as target:
        yield target


def test_tls_serves_a_client_that_trusts_the_ca(tls_server: str, pki: Pki,
                                                fake_model_dir: Path) -> None:
    with EmbedClient(tls_server, timeout=TIMEOUT, root_certificates=str(pki.ca)) as client:
        vectors = client.embed(["hello", "world"])
        info = client.info()
    assert vectors.shape == (2, info.dimensions) == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # The same certificate as PEM bytes instead of a path; "localhost" matches the DNS SAN.
    port = tls_server.rsplit(":", 1)[1]
    with EmbedClient(f"localhost:{port}", timeout=TIMEOUT,
                     root_certificates=pki.ca.read_bytes()) as client:
        np.testing.assert_array_equal(client.embed(["hello", "world"]), vectors)


def test_tls_refuses_plaintext_and_untrusted_clients(tls_server: str, pki: Pki) -> None:
    with EmbedClient(tls_server, timeout=TIMEOUT, retries=1) as client, \
            pytest.raises(grpc.RpcError) as exc:
        client.info()
    assert _code(exc) == grpc.StatusCode.UNAVAILABLE
    # A client that trusts another CA refuses the server's certificate.
    with EmbedClient(tls_server, timeout=TIMEOUT, root_certificates=str(pki.other_ca),
                     retries=1) as client, pytest.raises(grpc.RpcError) as exc:
        client.info()
    assert _code(exc) == grpc.StatusCode.UNAVAILABLE


# -- mutual TLS -----------------------------------------------------------------------


@pytest.fixture(scope="module", params=LAYOUTS)
def mtls_server(fake_model_dir: Path, pki: Pki, request: pytest.FixtureRequest) -> Iterator[str]:
    with serving(request.param, model=str(fake_model_dir), backend="fake",
                 tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                 tls_client_ca=str(pki.ca)) as target:
        yield target


def test_mtls_accepts_a_client_certificate_signed_by_the_ca(mtls_server: str, pki: Pki) -> None:
    with EmbedClient(mtls_server, timeout=TIMEOUT, root_certificates=str(pki.ca),
                     client_cert=str(pki.client_cert), client_key=str(pki.client_key)) as client:
        _assert_all_answer(client)


@pytest.mark.parametrize("who", ["no certificate", "certificate from another CA"])
def test_mtls_refuses_clients_without_a_trusted_certificate(mtls_server: str, pki: Pki,
                                                            who: str) -> None:
    cert = {"no certificate": {}, "certificate from another CA": {
        "client_cert": str(pki.other_client_cert), "client_key": str(pki.other_client_key)}}
    with EmbedClient(mtls_server, timeout=TIMEOUT, root_certificates=str(pki.ca), retries=1,
                     **cert[who]) as client, pytest.raises(grpc.RpcError) as exc:
        client.info()
    assert _code(exc) == grpc.StatusCode.UNAVAILABLE
    # The whole port is behind the handshake: health too.
    channel = grpc.secure_channel(mtls_server, grpc.ssl_channel_credentials(pki.ca.read_bytes()))
    with channel, pytest.raises(grpc.RpcError) as exc:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                  timeout=TIMEOUT)
    assert _code(exc) == grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def mtls_http_server(fake_model_dir: Path, pki: Pki,
                     monkeypatch: pytest.MonkeyPatch) -> Iterator[EmbedServer]:
    # A handshake not done within the handshake timeout is dropped: 1 s here.
    monkeypatch.setattr(http_frontend, "HANDSHAKE_TIMEOUT_S", 1.0)
    with running_server(model=str(fake_model_dir), backend="fake", workers=1, http_port=0,
                        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                        tls_client_ca=str(pki.ca)) as (srv, _):
        yield srv


def _https_health(srv: EmbedServer, pki: Pki, cert: Path | None = None,
                  key: Path | None = None) -> int:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    conn = http.client.HTTPSConnection("127.0.0.1", srv.http_port, timeout=TIMEOUT,
                                       context=context)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    finally:
        conn.close()


def test_mtls_on_the_http_port(mtls_http_server: EmbedServer, pki: Pki) -> None:
    """The HTTP port (aiohttp) asks for a client certificate signed by --tls-client-ca, as
    the gRPC port does; refused handshakes leave no connection counted against
    --max-http-connections."""
    srv = mtls_http_server
    assert _https_health(srv, pki, pki.client_cert, pki.client_key) == 200
    for cert, key in ((None, None), (pki.other_client_cert, pki.other_client_key)):
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            _https_health(srv, pki, cert, key)
    assert srv.http is not None
    wait_until(lambda: srv.http.connections == 0, 10,
               lambda: f"{srv.http.connections} connections still counted")


@pytest.fixture
def https_server(fake_model_dir: Path, pki: Pki) -> Iterator[EmbedServer]:
    """HTTPS with room for 4 connections, and the default handshake timeout (10 s)."""
    with running_server(model=str(fake_model_dir), backend="fake", workers=1, http_port=0,
                        max_http_connections=4, tls_cert=str(pki.server_cert),
                        tls_key=str(pki.server_key)) as (srv, _):
        yield srv


def _served(srv: EmbedServer, pki: Pki) -> bool:
    try:
        return _https_health(srv, pki) == 200
    except (ssl.SSLError, ConnectionError):
        return False


def test_https_connections_that_never_finish_a_handshake_free_their_places(
        https_server: EmbedServer, pki: Pki) -> None:
    """--max-http-connections counts a TLS connection from its accept. One that the peer
    closes before or during the handshake, or whose handshake fails, gives its place back
    at once, not when the handshake timeout (10 s) ends: else a client opening and
    closing connections in a loop would hold every place. Three rounds of 4 such
    connections (the cap), each followed by a real HTTPS request within 2 s."""
    srv = https_server
    assert srv.http is not None
    counted = lambda: f"{srv.http.connections} connections still counted"  # noqa: E731
    for junk in (b"", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05hello"):
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", srv.http_port), timeout=TIMEOUT) as s:
                if junk:
                    s.sendall(junk)
        # (The server may accept them after they closed: a refusal meanwhile is retried.)
        wait_until(lambda: _served(srv, pki), 2, counted)
        wait_until(lambda: srv.http.connections == 0, 2, counted)
    # A connection that says nothing keeps its place until the handshake timeout.
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=TIMEOUT):
        wait_until(lambda: srv.http.connections == 1, 2, counted)
        time.sleep(0.5)
        assert srv.http.connections == 1
    wait_until(lambda: srv.http.connections == 0, 2, counted)


# -- API keys -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=LAYOUTS)
def key_server(fake_model_dir: Path, keys_file: Path,
               request: pytest.FixtureRequest) -> Iterator[str]:
    with serving(request.param, model=str(fake_model_dir), backend="fake", api_keys=(KEY,),
                 api_keys_file=str(keys_file)) as target:
        yield target


def _health(target: str, metadata: tuple[tuple[str, str], ...] = (),
            credentials: grpc.ChannelCredentials | None = None) -> int:
    channel = (grpc.secure_channel(target, credentials) if credentials
               else grpc.insecure_channel(target))
    with channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=TIMEOUT, metadata=metadata).status


def _services(target: str, metadata: tuple[tuple[str, str], ...] = (),
              credentials: grpc.ChannelCredentials | None = None) -> set[str]:
    channel = (grpc.secure_channel(target, credentials) if credentials
               else grpc.insecure_channel(target))
    with channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            timeout=TIMEOUT, metadata=metadata)
        return {s.name for s in next(responses).list_services_response.service}


@pytest.mark.parametrize("method", ["Embed", "EmbedStream", "Tokenize", "Info"])
@pytest.mark.parametrize(("api_key", "message"), [(None, MISSING_CREDENTIALS),
                                                  (WRONG, INVALID_KEY)],
                         ids=["no key", "wrong key"])
def test_calls_without_a_valid_key_are_unauthenticated(key_server: str, method: str,
                                                       api_key: str | None,
                                                       message: str) -> None:
    with EmbedClient(key_server, timeout=TIMEOUT, api_key=api_key) as client, \
            pytest.raises(grpc.RpcError) as exc:
        _all_calls(client)[method]()  # type: ignore[operator]
    assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
    assert exc.value.details() == message  # type: ignore[attr-defined]
    assert WRONG not in str(exc.value)


@pytest.mark.parametrize("value", [f"Basic {KEY}", KEY, "Bearer", "Bearer "])
def test_authorization_must_be_a_bearer_token(key_server: str, value: str) -> None:
    with EmbedClient(key_server, timeout=TIMEOUT, metadata=[("authorization", value)]) as client, \
            pytest.raises(grpc.RpcError) as exc:
        client.info()
    assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
    assert exc.value.details() == BAD_SCHEME  # type: ignore[attr-defined]


@pytest.mark.parametrize("values", [[KEY, WRONG], [WRONG, KEY], [KEY, KEY]])
def test_a_call_carries_one_key(key_server: str, values: list[str]) -> None:
    """Several authorization values are refused, even when one (or each) is valid: one
    call must not try many keys."""
    metadata = [("authorization", f"Bearer {v}") for v in values]
    with EmbedClient(key_server, timeout=TIMEOUT, metadata=metadata) as client, \
            pytest.raises(grpc.RpcError) as exc:
        client.embed(["x"])
    assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
    assert exc.value.details() == SEVERAL_KEYS  # type: ignore[attr-defined]


def test_fair_share_names_a_key_however_its_scheme_is_spelled() -> None:
    """The key check takes 'bearer' in any case; fair share must name the same client,
    or a lowercase scheme would give every connection a queue of its own."""
    from embedrpc.server.core import client_of

    named = client_of(True, f"Bearer {KEY}", "ipv4:10.0.0.1:5000")
    assert named.startswith("key:")
    for spelled in (f"bearer {KEY}", f"BEARER {KEY}", f"  Bearer   {KEY} "):
        assert client_of(True, spelled, "ipv4:10.0.0.2:6000") == named
    assert client_of(False, f"Bearer {KEY}", "conn") == "conn"  # no keys: the connection
    assert client_of(True, "Basic abc", "conn") == "conn"


def test_refusals_are_logged_without_the_peer_port() -> None:
    from embedrpc.server.security import peer_host

    assert peer_host("ipv4:10.0.0.7:51234") == "ipv4:10.0.0.7"
    assert peer_host("ipv6:[::1]:51234") == "ipv6:[::1]"
    assert peer_host("unix:/tmp/x.sock") == "unix:/tmp/x.sock"


@pytest.mark.parametrize("api_key", [KEY, *FILE_KEYS])
def test_every_configured_key_opens_every_method(key_server: str, api_key: str) -> None:
    with EmbedClient(key_server, timeout=TIMEOUT, api_key=api_key) as client:
        _assert_all_answer(client)
    # The scheme is case-insensitive (RFC 7235), as gRPC's own token credentials allow.
    with EmbedClient(key_server, timeout=TIMEOUT,
                     metadata=[("authorization", f"bearer {api_key}")]) as client:
        assert client.info().dimensions == 64


def test_async_client_sends_the_key(key_server: str) -> None:
    import asyncio

    async def run() -> tuple[int, int]:
        async with AsyncEmbedClient(key_server, timeout=TIMEOUT, api_key=KEY) as client:
            vectors = await client.embed(["x", "y"])
            streamed = [r.unwrap() async for r in client.stream([["x"]])]
        return vectors.shape[0], len(streamed)

    assert asyncio.run(run()) == (2, 1)


def test_health_and_reflection_stay_open_by_default(key_server: str) -> None:
    assert _health(key_server) == health_pb2.HealthCheckResponse.SERVING
    assert "embedrpc.v1.Embedder" in _services(key_server)


@pytest.fixture(scope="module", params=LAYOUTS)
def locked_server(fake_model_dir: Path, pki: Pki, request: pytest.FixtureRequest) -> Iterator[str]:
    """TLS, a key, and health and reflection behind the key too."""
    with serving(request.param, model=str(fake_model_dir), backend="fake",
                 tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), api_keys=(KEY,),
                 auth_health=True, auth_reflection=True) as target:
        yield target


def test_auth_health_and_reflection_need_the_key(locked_server: str, pki: Pki) -> None:
    tls = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    bearer = (("authorization", f"Bearer {KEY}"),)
    for probe in (_health, _services):
        with pytest.raises(grpc.RpcError) as exc:
            probe(locked_server, credentials=tls)
        assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED, probe.__name__
    assert _health(locked_server, bearer, tls) == health_pb2.HealthCheckResponse.SERVING
    assert "embedrpc.v1.Embedder" in _services(locked_server, bearer, tls)
    with EmbedClient(locked_server, timeout=TIMEOUT, root_certificates=str(pki.ca),
                     api_key=KEY) as client:
        assert client.embed(["over TLS, with a key"]).shape == (1, 64)


def test_cli_client_options(locked_server: str, pki: Pki,
                            capsys: pytest.CaptureFixture[str]) -> None:
    args = ["info", "--target", locked_server, "--tls-ca", str(pki.ca), "--timeout", "10"]
    assert main([*args, "--api-key", KEY]) == 0
    assert json.loads(capsys.readouterr().out)["dimensions"] == 64
    assert main([*args, "--api-key", WRONG]) == 1
    err = capsys.readouterr().err
    assert f"UNAUTHENTICATED: {INVALID_KEY}" in err and WRONG not in err
    assert main([*args[:3], "--tls-ca", "/no/such/ca.pem", "--api-key", KEY]) == 2
    assert "root_certificates='/no/such/ca.pem': cannot read it" in capsys.readouterr().err


# -- configuration: keys and files ----------------------------------------------------


def test_keys_file_skips_comments_and_blank_lines(keys_file: Path) -> None:
    assert read_keys_file(str(keys_file)) == list(FILE_KEYS)


@pytest.mark.parametrize(("text", "error"), [
    ("# only a comment\n\n", "no keys in it"),
    ("good-key-000000000000\nbad key with spaces\n", "line 2: an API key may hold only visible"),
])
def test_bad_keys_files_are_refused_without_echoing(tmp_path: Path, text: str,
                                                    error: str) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ValueError, match=error) as exc:
        read_keys_file(str(path))
    assert "bad key with spaces" not in str(exc.value)
    with pytest.raises(ValueError, match="no such file"):
        read_keys_file(str(tmp_path / "missing"))


def test_keys_are_compared_whole() -> None:
    keys = ApiKeys([KEY, "second-key-0123456789"])
    assert keys.check([f"Bearer {KEY}"]) is None
    assert keys.check(["Bearer second-key-0123456789"]) is None
    for near in (KEY[:-1], KEY + "0", KEY.upper(), f" {KEY}x", ""):
        assert keys.check([f"Bearer {near}"]) is not None, near
    assert keys.check([]) == MISSING_CREDENTIALS
    assert keys.check([f"Basic {KEY}", f"Bearer {KEY}"]) == SEVERAL_KEYS  # one value per call


def _config(fake_model_dir: Path, **kw: object) -> ServeConfig:
    return ServeConfig.of(model=str(fake_model_dir), backend="fake", device="cpu",
                       host="127.0.0.1", port=0, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("files", "error"), [
    ({"tls_cert": "missing.pem", "tls_key": "server_key"},
     r"--tls-cert \S+missing.pem: no such file"),
    ({"tls_cert": "server_cert", "tls_key": "missing.key"},
     r"--tls-key \S+missing.key: no such file"),
    ({"tls_cert": "server_cert", "tls_key": "stray_key"}, "does not belong to the certificate"),
    ({"tls_cert": "server_cert", "tls_key": "encrypted_key"}, "the key is encrypted"),
    ({"tls_cert": "server_key", "tls_key": "server_key"}, "no PEM certificate in it"),
    ({"tls_cert": "server_cert", "tls_key": "ca"}, "no PEM private key in it"),
    ({"tls_cert": "server_cert", "tls_key": "server_key", "tls_client_ca": "server_key"},
     "--tls-client-ca .*no PEM CA certificate"),
    ({"tls_cert": "server_cert"}, "--tls-cert and --tls-key go together"),
    ({"tls_client_ca": "ca"}, "--tls-client-ca needs --tls-cert"),
    ({"auth_health": True}, "--auth-health and --auth-reflection need API keys"),
    ({"api_keys": ("",)}, "--api-key: empty API key"),
])
def test_bad_security_configuration_fails_at_start(fake_model_dir: Path, pki: Pki,
                                                   tmp_path: Path, files: dict[str, object],
                                                   error: str) -> None:
    def path(value: object) -> object:
        if not isinstance(value, str):
            return value
        return str(getattr(pki, value)) if hasattr(pki, value) else str(tmp_path / value)

    with pytest.raises(ValueError, match=error):
        EmbedServer(_config(fake_model_dir, **{k: path(v) for k, v in files.items()}))


def test_unreadable_cert_file_is_named(fake_model_dir: Path, pki: Pki, tmp_path: Path) -> None:
    locked = tmp_path / "locked.pem"
    locked.write_bytes(pki.server_cert.read_bytes())
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads anything: nothing to test
        pytest.skip("running as root")
    with pytest.raises(ValueError, match=r"--tls-cert \S+locked.pem: permission denied"):
        EmbedServer(_config(fake_model_dir, tls_cert=str(locked), tls_key=str(pki.server_key)))


# -- the command line -----------------------------------------------------------------


def test_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EMBEDRPC_API_KEY", f"{KEY}, second-key-0123456789")
    assert parse_args(["serve"]).api_key == [KEY, "second-key-0123456789"]
    # The command line replaces the environment; repeated and comma-separated add up.
    ns = parse_args(["serve", "--api-key", "a1", "--api-key", "b2,c3"])
    assert ns.api_key == ["a1", "b2", "c3"]
    monkeypatch.setenv("EMBEDRPC_API_KEY", KEY)
    assert parse_args(["embed", "x"]).api_key == KEY  # clients read the same variable
    monkeypatch.setenv("EMBEDRPC_AUTH_HEALTH", "true")
    assert parse_args(["serve"]).auth_health is True
    assert parse_args(["serve", "--auth-health", "false"]).auth_health is False
    monkeypatch.delenv("EMBEDRPC_AUTH_HEALTH")
    assert parse_args(["serve", "--auth-reflection"]).auth_reflection is True
    ns = parse_args(["embed", "--tls", "true", "--tls-cert", "c.pem", "--tls-key", "c.key", "hi"])
    assert (ns.tls, ns.client_tls_cert, ns.client_tls_key, ns.texts) == (
        True, "c.pem", "c.key", ["hi"])
    # --help never shows a key.
    for command in ("serve", "info"):
        with pytest.raises(SystemExit):
            parse_args([command, "--help"])
        out = capsys.readouterr().out
        assert "--api-key" in out and KEY not in out


def test_serve_with_a_missing_cert_file_exits_2(fake_model_dir: Path, tmp_path: Path) -> None:

    result = subprocess.run(
        [*EMBEDRPC, "serve", "--model", str(fake_model_dir), "--backend", "fake", "--port", "0",
         "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(tmp_path / "nope.key")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"embedrpc serve: --tls-cert {tmp_path / 'nope.pem'}: no such file" in result.stderr


def test_serve_reads_the_key_from_the_environment(fake_model_dir: Path) -> None:
    """The recommended way to pass a key: EMBEDRPC_API_KEY, not a flag that `ps` shows."""
    proc, target = start_server("--model", str(fake_model_dir), "--backend", "fake",
                                env={"EMBEDRPC_API_KEY": KEY})
    try:
        with EmbedClient(target, timeout=TIMEOUT) as client, \
                pytest.raises(grpc.RpcError) as exc:
            client.info()
        assert _code(exc) == grpc.StatusCode.UNAUTHENTICATED
        with EmbedClient(target, timeout=TIMEOUT, api_key=KEY) as client:
            assert client.info().dimensions == 64
        assert KEY not in " ".join(proc.args)  # type: ignore[arg-type]
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("stream", [False, True])
def test_bench_connects_with_tls_and_a_key(locked_server: str, pki: Pki, stream: bool) -> None:
    """`embedrpc bench` against a TLS server that needs a key: with the CA and the key
    every request succeeds; without the key the server refuses the run's first call."""
    from embedrpc.client.bench import BenchConfig, BenchError, run

    target = locked_server.replace("127.0.0.1", "localhost")
    common: dict[str, object] = {"target": target, "concurrency": 2, "requests": 20,
                                 "warmup": 0.1, "texts": 16, "progress": False,
                                 "query_fraction": 0.0, "stream": stream,
                                 "tls_ca": str(pki.ca)}
    report = run(BenchConfig(**common, api_key=KEY)).report  # type: ignore[arg-type]
    assert report["errors"] == {} and report["requests"] == 20
    assert KEY not in json.dumps(report)  # the key never reaches the report
    with pytest.raises(BenchError, match="UNAUTHENTICATED"):
        run(BenchConfig(**common))  # type: ignore[arg-type]
