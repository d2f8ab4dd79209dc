"""Channel set-up for one server or many replicas: target, load balancing, retries.

A client can be pointed at

- one address, ``"host:port"`` (or any gRPC target URI, e.g. ``"unix:/path"``): used as is;
- several replicas, ``["10.0.0.1:50051", "10.0.0.2:50051"]`` or the same as one
  comma-separated string: they become one static gRPC target,
  ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` (host names are resolved once, here);
- a DNS name with one address per replica, ``"dns:///embedrpc-headless.ns.svc:50051"``
  (a Kubernetes headless Service): gRPC re-resolves it when connections fail.

Every channel gets a service config (gRPC's own mechanism, no client-side code paths):

- ``round_robin`` load balancing with client-side health checking of the
  ``embedrpc.v1.Embedder`` health status, so a replica that is starting, draining
  (SIGTERM) or has no live worker gets no new calls — for several replicas and
  ``dns:`` targets, or when asked for with ``balance=True``;
- a retry policy for the unary RPCs (Embed, Tokenize, Info, Rerank, RerankBatch; all
  idempotent):
  ``UNAVAILABLE`` (a replica refusing calls while it stops, a connection reset by a
  crash) and ``CANCELLED`` (what calls still running get from a replica whose grace
  period ran out; the server never answers CANCELLED otherwise, and a call the caller
  cancels itself is never retried) are retried up to ``retries`` attempts in all, with
  exponential backoff, on whichever replica the balancer picks next. EmbedStream is not
  retried: its requests and answers are not idempotent as a whole.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from typing import Any

SERVICE = "embedrpc.v1.Embedder"
RETRIED_METHODS = ("Embed", "Tokenize", "Info")
RERANKER_SERVICE = "embedrpc.v1.Reranker"
RETRIED_RERANKER_METHODS = ("Rerank", "RerankBatch")
RETRIED_CODES = ("UNAVAILABLE", "CANCELLED")
DEFAULT_ATTEMPTS = 5
# A retried call must keep its request until it commits; gRPC's default buffer
# (256 KiB) would silently turn retries off for large Embed requests.
RETRY_BUFFER_BYTES = 64 << 20


def _split_host_port(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' → (host, port); a clear error otherwise."""
    address = address.strip()
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
    else:
        host, sep, port = address.rpartition(":")
        if ":" in host or "/" in host:  # a URI (dns:///...) or an unbracketed IPv6 address
            sep = ""
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target {address!r}: each of several targets must be HOST:PORT "
                         "or [IPv6]:PORT (a single target may be any gRPC target URI)")
    return host, int(port)


def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """An IP literal as is; a host name's addresses, IPv4 ones when it has any."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"target {host}:{port}: cannot resolve {host!r} ({exc.strerror})"
                         ) from None
    found = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    v4 = [a for a in found if a.version == 4]
    return v4 or found


def resolve_target(target: str | Sequence[str]) -> tuple[str, bool]:
    """(gRPC target string, whether it names several replicas).

    A list or comma-separated string of HOST:PORT becomes a static ``ipv4:``/``ipv6:``
    target; anything else is passed to gRPC unchanged.
    """
    parts = target.split(",") if isinstance(target, str) else list(target)
    parts = [p.strip() for p in parts if p.strip()]
    if not parts:
        raise ValueError("no target given: use HOST:PORT, several HOST:PORT, or dns:///NAME:PORT")
    if len(parts) == 1:
        single = parts[0]
        return single, single.startswith("dns:")
    endpoints: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = []
    for part in parts:
        host, port = _split_host_port(part)
        endpoints.extend((address, port) for address in _addresses(host, port))
    endpoints = list(dict.fromkeys(endpoints))
    versions = {address.version for address, _ in endpoints}
    if versions == {4}:
        return "ipv4:" + ",".join(f"{a}:{p}" for a, p in endpoints), True
    if versions == {6}:
        return "ipv6:" + ",".join(f"[{a}]:{p}" for a, p in endpoints), True
    raise ValueError(f"targets {parts}: IPv4 and IPv6 addresses cannot be mixed in one "
                     "static target; list one family, or use one dns:/// name")


def service_config(*, balance: bool, retries: int = DEFAULT_ATTEMPTS,
                   initial_backoff_s: float = 0.1, max_backoff_s: float = 2.0) -> dict[str, Any]:
    """The gRPC service config: round_robin with health checking (when `balance`) and a
    retry policy for UNAVAILABLE and CANCELLED on the unary RPCs (when `retries` > 1)."""
    config: dict[str, Any] = {}
    if balance:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        config["healthCheckConfig"] = {"serviceName": SERVICE}
    if retries > 1:
        config["methodConfig"] = [{
            "name": [*({"service": SERVICE, "method": m} for m in RETRIED_METHODS),
                     *({"service": RERANKER_SERVICE, "method": m}
                       for m in RETRIED_RERANKER_METHODS)],
            "retryPolicy": {
                "maxAttempts": retries,
                "initialBackoff": f"{initial_backoff_s}s",
                "maxBackoff": f"{max_backoff_s}s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": list(RETRIED_CODES),
            },
        }]
    return config


def channel_args(target: str | Sequence[str], options: Sequence[tuple[str, Any]] = (), *,
                 balance: bool | None = None,
                 retries: int = DEFAULT_ATTEMPTS) -> tuple[str, list[tuple[str, Any]]]:
    """(target, channel options) for grpc.[aio.]insecure_channel / secure_channel.

    balance: None = round_robin for several targets and dns: targets, pick_first (gRPC's
    default) for one address; True/False force it. retries: attempts in all for a call that
    fails with UNAVAILABLE or CANCELLED (1 = no retries). A ``grpc.service_config`` in
    `options` replaces the one built here.
    """
    if not 1 <= retries <= 5:
        raise ValueError(f"retries={retries}: gRPC allows 1 (no retries) to 5 attempts")
    resolved, several = resolve_target(target)
    opts = list(options)
    if not any(key == "grpc.service_config" for key, _ in opts):
        config = service_config(balance=several if balance is None else balance,
                                retries=retries)
        if config:
            opts.append(("grpc.service_config", json.dumps(config)))
        if retries > 1:
            opts.append(("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES))
    return resolved, opts
