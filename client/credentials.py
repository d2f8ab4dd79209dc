"""TLS channel credentials and API-key metadata for the clients."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

# PEM data as bytes, or the path of a PEM file as str / Path.
Pem = bytes | str | os.PathLike[str]


def _pem(value: Pem | None, name: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"{name}={str(value)!r}: cannot read it: "
                         f"{exc.strerror or exc}") from None


def channel_credentials(credentials: grpc.ChannelCredentials | None = None, *,
                        tls: bool = False, root_certificates: Pem | None = None,
                        client_cert: Pem | None = None,
                        client_key: Pem | None = None) -> grpc.ChannelCredentials | None:
    """`credentials` as given, else TLS credentials when `tls` or any PEM is given (no
    root_certificates: the system's roots), else None (plaintext). PEMs are bytes of PEM
    data, or a str/Path naming a PEM file."""
    wants_tls = tls or any(v is not None for v in (root_certificates, client_cert, client_key))
    if credentials is not None:
        if wants_tls:
            raise ValueError("give either credentials= or the TLS options (tls, "
                             "root_certificates, client_cert, client_key), not both")
        return credentials
    if not wants_tls:
        return None
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together (mutual TLS): give both "
                         "or neither")
    import grpc

    return grpc.ssl_channel_credentials(
        root_certificates=_pem(root_certificates, "root_certificates"),
        private_key=_pem(client_key, "client_key"),
        certificate_chain=_pem(client_cert, "client_cert"))


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries an API key: ('authorization', 'Bearer <key>')."""
    if not api_key:
        return ()
    if not all("!" <= ch <= "~" for ch in api_key):
        raise ValueError("api_key may hold only visible ASCII characters (no spaces or "
                         "control characters)")
    return (("authorization", f"Bearer {api_key}"),)
