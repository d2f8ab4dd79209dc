"""SIGHUP: the API keys file and the TLS files are read again without a restart.

Real servers (fake backend) on loopback; keys and certificates made here. What must
hold: after a reload new calls and new handshakes use the new keys and certificate,
gRPC and HTTP alike; a reload that finds a problem changes nothing; a real SIGHUP to
`embedrpc serve` does it.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from embedrpc.client import EmbedClient

from .helpers import certificate, pem, running_server, serve, wait_until, write_key

OLD, NEW = "old-key-0123456789abcdef0123", "new-key-fedcba9876543210fedc"
TIMEOUT = 10.0


def _refused(target: str, key: str, **tls: object) -> grpc.StatusCode | None:
    """None when Info succeeds with `key`, else the status code."""
    with EmbedClient(target, timeout=TIMEOUT, api_key=key, retries=1, **tls) as client:
        try:
            client.info()
        except grpc.RpcError as exc:
            return exc.code()
    return None


def _http_status(port: int, key: str) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/embeddings", data=json.dumps({"input": "x"}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_keys_file_is_read_again(fake_model_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"{OLD}\n")
    keys.chmod(0o600)
    with running_server(model=str(fake_model_dir), backend="fake", api_keys_file=str(keys),
                        http_port=0) as (server, target):
        assert _refused(target, OLD) is None and _http_status(server.http_port, OLD) == 200
        assert _refused(target, NEW) == grpc.StatusCode.UNAUTHENTICATED

        keys.write_text(f"# rotated\n{NEW}\n")
        assert server.reload() == ["1 API key(s)"]
        assert _refused(target, NEW) is None and _http_status(server.http_port, NEW) == 200
        assert _refused(target, OLD) == grpc.StatusCode.UNAUTHENTICATED
        assert _http_status(server.http_port, OLD) == 401

        # A file left empty (or unreadable) changes nothing: the server keeps its keys.
        keys.write_text("# nothing here\n")
        with pytest.raises(ValueError, match="no keys in it"):
            server.reload()
        keys.unlink()
        with pytest.raises(ValueError, match="no such file"):
            server.reload()
        assert _refused(target, NEW) is None


def _server_files(directory: Path, name: str) -> tuple[bytes, Path, Path]:
    """A fresh CA and a server certificate for 127.0.0.1 signed by it: (CA PEM, cert, key)."""
    new_key = ec.generate_private_key
    ca_key, key = new_key(ec.SECP256R1()), new_key(ec.SECP256R1())
    ca = certificate(f"{name} CA", ca_key, None, ca_key, ca=True)
    cert = certificate("localhost", key, ca, ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                        sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(pem(cert) + pem(ca))
    write_key(key_path, key)
    return pem(ca), cert_path, key_path


def test_certificate_is_read_again(fake_model_dir: Path, tmp_path: Path) -> None:
    old_ca, old_cert, old_key = _server_files(tmp_path, "old")
    new_ca, new_cert, new_key = _server_files(tmp_path, "new")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(old_cert.read_bytes())
    key.write_bytes(old_key.read_bytes())
    with running_server(model=str(fake_model_dir), backend="fake", tls_cert=str(cert),
                        tls_key=str(key)) as (server, target):
        assert _refused(target, "", root_certificates=old_ca) is None
        assert _refused(target, "", root_certificates=new_ca) == grpc.StatusCode.UNAVAILABLE

        # A key that does not match the certificate: refused, the old pair stays in use.
        cert.write_bytes(new_cert.read_bytes())
        with pytest.raises(ValueError, match="does not belong"):
            server.reload()
        assert _refused(target, "", root_certificates=old_ca) is None

        key.write_bytes(new_key.read_bytes())
        assert server.reload() == ["TLS certificate"]
        # New handshakes present the new certificate: clients of the new CA get in,
        # clients that trust only the old one no longer do.
        assert _refused(target, "", root_certificates=new_ca) is None
        assert _refused(target, "", root_certificates=old_ca) == grpc.StatusCode.UNAVAILABLE


def test_sighup_reloads_a_running_server(fake_model_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"{OLD}\n")
    keys.chmod(0o600)
    with serve(fake_model_dir, "--api-keys-file", str(keys)) as server:
        assert _refused(server.target, OLD) is None
        keys.write_text(f"{NEW}\n")
        server.proc.send_signal(signal.SIGHUP)
        def logged(text: str) -> bool:
            return any(text in line for line in server.lines)

        wait_until(lambda: logged("SIGHUP: reloaded 1 API key(s)"), 10,
                   lambda: "".join(server.lines))
        assert _refused(server.target, NEW) is None
        assert _refused(server.target, OLD) == grpc.StatusCode.UNAUTHENTICATED
        keys.write_text("")
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: logged("SIGHUP: nothing reloaded"), 10, lambda: "".join(server.lines))
        assert _refused(server.target, NEW) is None
        assert server.proc.poll() is None  # still serving
