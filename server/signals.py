"""`embedrpc serve`: run the server until a signal says stop.

SIGTERM or SIGINT: drain (NOT_SERVING, in-flight calls finish within the grace
period), then exit; a second one stops at once. SIGHUP: read the API keys file and
the TLS files again (all or nothing).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from embedrpc import __version__

from .app import EmbedServer, raise_fd_limit, reload_logged, stop_on_signals
from .config import ServeConfig

log = logging.getLogger(__name__)


async def serve(config: ServeConfig) -> None:
    """Run until SIGTERM or SIGINT; a second signal stops at once. With several front
    ends (--frontends, or its default on GPUs), server/supervisor.py runs them."""
    from .devices import resolve_devices
    from .supervisor import frontends_for, supervise

    devices = ["cpu"]
    if config.network.frontends is None and config.devices.backend == "onnx":
        logging.disable(logging.WARNING)  # the server says it again, once, as it loads
        try:
            devices = resolve_devices(config.devices.device)
        finally:
            logging.disable(logging.NOTSET)
    frontends = frontends_for(config, devices)
    if frontends > 1:
        await supervise(config, frontends)
        return
    raise_fd_limit()
    server = EmbedServer(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stop_on_signals(loop, stop, config.network.grace_seconds)
    loop.add_signal_handler(signal.SIGHUP, reload_logged, server)
    port = await server.start()
    log.info("embedrpc %s serving %s on %s:%d (%s)", __version__, ",".join(server.names),
             config.network.host, port, server.security.describe())
    await stop.wait()
    await server.stop()
    log.info("stopped")
