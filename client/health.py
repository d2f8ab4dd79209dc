"""`embedrpc health`: ask a server's grpc.health.v1 service whether it serves.

Exit code 0 when the status is SERVING, 1 otherwise (NOT_SERVING, unknown service,
unreachable, timeout), so it can be a container health check as it is:

    HEALTHCHECK CMD embedrpc health --target localhost:50051 --timeout 4
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import EmbedClient


def health_status(client: EmbedClient, service: str = "", timeout: float | None = None) -> str:
    """The status name the server reports for `service` ("" = the whole server):
    SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN. Raises grpc.RpcError when the
    call fails (unreachable, deadline, a service name the server does not know)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(client.channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service),
                       timeout=client.timeout if timeout is None else timeout,
                       metadata=client.metadata)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def add_health_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--service", default="",
                   help="service to ask about: '' (default) = the whole server, or "
                        "embedrpc.v1.Embedder")


def run_health(ns: argparse.Namespace) -> int:
    """Print {"target", "service", "status"} as JSON; 0 when SERVING, else 1."""
    import grpc

    from .client import EmbedClient

    try:
        with EmbedClient(ns.target, timeout=ns.timeout, retries=1,
                         api_key=getattr(ns, "api_key", None) or None,
                         tls=getattr(ns, "tls", False),
                         root_certificates=getattr(ns, "tls_ca", None) or None,
                         client_cert=getattr(ns, "client_tls_cert", None) or None,
                         client_key=getattr(ns, "client_tls_key", None) or None) as client:
            status = health_status(client, ns.service)
    except grpc.RpcError as exc:
        details = exc.details() or ""
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            details = f"no health status for service {ns.service!r} (use '' or " \
                "embedrpc.v1.Embedder)"
        print(f"embedrpc health: {ns.target}: {exc.code().name}: {details}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"embedrpc health: {exc}", file=sys.stderr)
        return 2
    json.dump({"target": ns.target, "service": ns.service, "status": status}, sys.stdout)
    sys.stdout.write("\n")
    return 0 if status == "SERVING" else 1
