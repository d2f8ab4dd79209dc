"""TLS, mutual TLS and API keys for the gRPC server (and the key check for HTTP).

- TLS: `--tls-cert` / `--tls-key` (PEM). Files are read and checked once at start:
  a missing or unreadable file, a file that is not PEM, an encrypted key, or a key
  that does not belong to the certificate stops the server with a message naming
  the flag.
- Mutual TLS: `--tls-client-ca` (PEM): the handshake requires a client certificate
  signed by one of these CAs. This covers the whole port, health included.
- API keys: `--api-key` and/or `--api-keys-file`; each call sends the metadata
  `authorization: Bearer <key>`. Keys are kept only as SHA-256 digests and compared
  with hmac.compare_digest against every configured key, so neither the time taken
  nor an error message tells anything about a key. Health and reflection stay open
  unless `--auth-health` / `--auth-reflection`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import ssl
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from .config import SecurityOptions
from .errors import Unauthenticated

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/",
                       "/grpc.reflection.v1.ServerReflection/")
MISSING_CREDENTIALS = ("missing credentials: send the metadata "
                       "'authorization: Bearer <api key>'")
BAD_SCHEME = "the authorization metadata must be 'Bearer <api key>'"
INVALID_KEY = "invalid API key"
SEVERAL_KEYS = "send the authorization metadata once: a call carries one API key"
HTTP_MESSAGES = {  # the same problems, in HTTP's words
    MISSING_CREDENTIALS: "missing credentials: send the header 'Authorization: Bearer <api key>'",
    BAD_SCHEME: "the Authorization header must be 'Bearer <api key>'",
    SEVERAL_KEYS: "send the Authorization header once: a request carries one API key",
}
SHORT_KEY = 16  # characters; shorter keys are accepted with a warning


# -- API keys -------------------------------------------------------------------------


def check_key(key: str, where: str) -> str:
    """A key as given, or ValueError naming `where` (never the key itself)."""
    if not key:
        raise ValueError(f"{where}: empty API key")
    if not all("!" <= ch <= "~" for ch in key):
        raise ValueError(f"{where}: an API key may hold only visible ASCII characters "
                         "(letters, digits, punctuation; no spaces or control characters)")
    return key


def split_keys(text: str, where: str = "--api-key") -> list[str]:
    """'k1,k2' → ['k1', 'k2'] (spaces around commas ignored); each key checked."""
    return [check_key(part.strip(), where) for part in text.split(",")]


def read_keys_file(path: str) -> list[str]:
    """One key per line; blank lines and lines starting with '#' are skipped."""
    where = f"--api-keys-file {path}"
    try:
        lines = _read(path, "--api-keys-file").decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not UTF-8 text") from None
    mode = os.stat(path).st_mode
    if mode & stat.S_IROTH:
        log.warning("%s is readable by every user on this machine; chmod 600 it", where)
    keys = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(check_key(line, f"{where} line {number}"))
    if not keys:
        raise ValueError(f"{where}: no keys in it (one key per line; '#' starts a comment)")
    return keys


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


class ApiKeys:
    """The accepted keys, as digests; `check()` returns None or why a call is refused."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests: tuple[bytes, ...] = ()
        self.replace(keys)

    def replace(self, keys: Iterable[str]) -> None:
        """Accept these keys from now on, and only these (one assignment: a call checks
        either the old set or the new one, never a mixture)."""
        digests = tuple({_digest(k) for k in keys})
        if not digests:
            raise ValueError("ApiKeys needs at least one key")
        self._digests = digests

    def __len__(self) -> int:
        return len(self._digests)

    def matches(self, key: str | bytes) -> bool:
        """Constant time in the key and in which key matched: every digest is compared."""
        given = _digest(key)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(given, digest)
        return found

    def check(self, authorization: Iterable[str | bytes]) -> str | None:
        """None when the call's one `authorization` value is 'Bearer <a valid key>', else
        a message for the client that does not repeat what it sent. A call with several
        values is refused whatever they hold: one call would otherwise try many keys."""
        values = list(authorization)
        if len(values) > 1:
            return SEVERAL_KEYS
        problem = MISSING_CREDENTIALS
        for value in values:
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                problem = BAD_SCHEME
                continue
            try:
                if self.matches(token.strip()):
                    return None
            except UnicodeEncodeError:  # bytes no key has (HTTP hands them over escaped)
                pass
            problem = INVALID_KEY
        return problem

    def authorize_header(self, headers: Iterable[str]) -> None:
        """For the HTTP API: raise Unauthenticated unless the request's Authorization
        header (`headers`: every one it sent) carries a valid key, once."""
        problem = self.check(headers)
        if problem is not None:
            log.warning("refused an HTTP request: %s", problem)  # one a second at most
            raise Unauthenticated(HTTP_MESSAGES.get(problem, problem))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid bearer key with UNAUTHENTICATED; `open_prefixes` name
    methods (e.g. health) that need none. The refusal replaces the method's handler, so
    interceptors before this one (metrics) see the call end UNAUTHENTICATED, and the
    request is never parsed as protobuf."""

    def __init__(self, keys: ApiKeys, open_prefixes: tuple[str, ...] = ()) -> None:
        self.keys = keys
        self.open_prefixes = open_prefixes

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self.open_prefixes):
            return handler
        values = [value for key, value in handler_call_details.invocation_metadata or ()
                  if key == "authorization"]
        problem = self.keys.check(values)
        if problem is None:
            return handler
        return _refusal(handler, method, problem)


def peer_host(peer: str) -> str:
    """gRPC's peer ("ipv4:10.0.0.7:51234", "ipv6:[::1]:51234", "unix:...") without the
    port."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in address:
        return f"{kind}:{address.rsplit(':', 1)[0]}"
    return peer


def _refusal(handler: grpc.RpcMethodHandler, method: str,
             problem: str) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        # The peer's address without its port: a client refused on many connections
        # writes one line a second (logs.RepeatFilter), not one per connection.
        log.warning("refused %s from %s: %s", method, peer_host(context.peer()), problem)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    # No request_deserializer: an unauthenticated message stays unparsed bytes.
    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, response_serializer=serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, response_serializer=serializer)
    return grpc.unary_unary_rpc_method_handler(refuse, response_serializer=serializer)


# -- TLS ------------------------------------------------------------------------------


def _read(path: str, flag: str) -> bytes:
    where = f"{flag} {path}"
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except PermissionError:
        raise ValueError(f"{where}: permission denied (the server's user must be able to "
                         "read it)") from None
    except IsADirectoryError:
        raise ValueError(f"{where}: is a directory, not a file") from None
    except OSError as exc:
        raise ValueError(f"{where}: {exc.strerror or exc}") from None


def _no_password() -> bytes:
    raise ValueError("encrypted")


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes of a server certificate chain, its key, and optionally client CAs."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    @classmethod
    def load(cls, cert: str, key: str, client_ca: str | None = None) -> TlsFiles:
        cert_pem = _read(cert, "--tls-cert")
        key_pem = _read(key, "--tls-key")
        if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
            raise ValueError(f"--tls-cert {cert}: no PEM certificate in it (expected a "
                             "'-----BEGIN CERTIFICATE-----' block)")
        if (b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in key_pem
                or b"Proc-Type: 4,ENCRYPTED" in key_pem):
            raise ValueError(f"--tls-key {key}: the key is encrypted; give an unencrypted "
                             "PEM key (e.g. openssl pkey -in KEY -out PLAIN_KEY) and protect "
                             "the file with its permissions")
        if b"PRIVATE KEY-----" not in key_pem:
            raise ValueError(f"--tls-key {key}: no PEM private key in it (expected a "
                             "'-----BEGIN PRIVATE KEY-----' block)")
        # gRPC reports bad files only at the first handshake; OpenSSL checks them now.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cert, key, password=_no_password)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise ValueError(f"--tls-key {key} does not belong to the certificate in "
                                 f"--tls-cert {cert}") from None
            raise ValueError(f"--tls-cert {cert} / --tls-key {key}: OpenSSL cannot load "
                             f"them: {exc}") from None
        except ValueError:
            raise ValueError(f"--tls-key {key}: the key is encrypted; give an unencrypted "
                             "PEM key") from None
        ca_pem = None
        if client_ca is not None:
            ca_pem = _read(client_ca, "--tls-client-ca")
            try:
                context.load_verify_locations(cadata=ca_pem.decode("ascii"))
            except (ssl.SSLError, UnicodeDecodeError):
                raise ValueError(f"--tls-client-ca {client_ca}: no PEM CA certificate in it "
                                 "(expected '-----BEGIN CERTIFICATE-----' blocks)") from None
        return cls(cert_pem, key_pem, ca_pem)

    def certificate_configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.cert)], root_certificates=self.client_ca)


# -- what the server uses -------------------------------------------------------------


@dataclass
class ServerSecurity:
    """Everything security-related the server needs, loaded and checked at start;
    `reload()` reads the keys file and the TLS files again (SIGHUP)."""

    tls: TlsFiles | None = None
    keys: ApiKeys | None = None
    open_prefixes: tuple[str, ...] = ()
    # A certificate configuration read by reload(), handed to gRPC at its next handshake.
    _pending: grpc.ServerCertificateConfiguration | None = None

    @classmethod
    def from_config(cls, config: SecurityOptions, *, host: str,
                    warn: bool = True) -> ServerSecurity:
        """`host`: where the server listens (keys without TLS off loopback are warned
        about); `warn`: False in a front end of several, whose supervisor has warned once
        for all of them."""
        if (config.tls_cert is None) != (config.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both (PEM files) "
                             "or neither")
        if config.tls_client_ca is not None and config.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is "
                             "TLS with client certificates")
        tls = _load_tls(config)
        given = _given_keys(config)
        keys = ApiKeys(given) if given else None
        if keys is None and (config.auth_health or config.auth_reflection):
            raise ValueError("--auth-health and --auth-reflection need API keys "
                             "(--api-key or --api-keys-file)")
        if keys is not None and warn:
            if any(len(k) < SHORT_KEY for k in given):
                log.warning("an API key is shorter than %d characters; use long random keys "
                            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')",
                            SHORT_KEY)
            if tls is None and host not in ("127.0.0.1", "::1", "localhost"):
                log.warning("API keys without TLS: keys cross the network in clear text; "
                            "add --tls-cert and --tls-key")
        open_prefixes: tuple[str, ...] = ()
        if not config.auth_health:
            open_prefixes += (HEALTH_PREFIX,)
        if not config.auth_reflection:
            open_prefixes += REFLECTION_PREFIXES
        return cls(tls, keys, open_prefixes)

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS credentials whose certificates `reload()` can replace: gRPC asks for a new
        configuration before every handshake; connections already open keep theirs."""
        assert self.tls is not None
        return grpc.dynamic_ssl_server_credentials(
            self.tls.certificate_configuration(), self._take_pending,
            require_client_authentication=self.tls.client_ca is not None)

    def _take_pending(self) -> grpc.ServerCertificateConfiguration | None:
        pending, self._pending = self._pending, None
        return pending

    def reload(self, config: SecurityOptions) -> list[str]:
        """Read --api-keys-file and the TLS files again and use them for new calls and
        handshakes. All or nothing: on any problem, raise ValueError and keep what is in
        use. API keys can be replaced, not turned on or off (that needs a restart).
        Returns what was reloaded, for the log."""
        tls = _load_tls(config) if self.tls is not None else None
        # Only a keys file can have changed; the flags' keys come along (never empty).
        given = (_given_keys(config) if self.keys is not None
                 and config.api_keys_file is not None else None)
        done = []
        if self.keys is not None and given is not None:
            self.keys.replace(given)
            done.append(f"{len(self.keys)} API key(s)")
        if tls is not None:
            self.tls = tls
            self._pending = tls.certificate_configuration()
            done.append("TLS certificate" + (" and client CAs" if tls.client_ca else ""))
        return done

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [] if self.keys is None else [AuthInterceptor(self.keys, self.open_prefixes)]

    def describe(self) -> str:
        parts = ["mutual TLS" if self.tls and self.tls.client_ca else
                 "TLS" if self.tls else "plaintext"]
        if self.keys is not None:
            parts.append(f"{len(self.keys)} API key(s)")
        return ", ".join(parts)


def _load_tls(config: SecurityOptions) -> TlsFiles | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    return TlsFiles.load(config.tls_cert, config.tls_key, config.tls_client_ca)


def _given_keys(config: SecurityOptions) -> list[str]:
    """--api-key (and EMBEDRPC_API_KEY) and the lines of --api-keys-file."""
    given = [check_key(k, "--api-key") for k in config.api_keys]
    if config.api_keys_file is not None:
        given += read_keys_file(config.api_keys_file)
    return given
