"""`serve --frontends N`: one supervisor, N front-end processes on one port, and the
device workers they all share.

    supervisor (this process)    owns the device workers: starts them, restarts them;
      │                          owns the front ends: starts them, restarts a dead one,
      │                          drains them all on SIGTERM, passes SIGHUP on to each;
      │                          serves /metrics: the sum of the front ends' metrics
      ├─ worker-…                each listens on a Unix socket; batches of several front
      │                          ends waiting together run as one (worker/process.py)
      └─ frontend-0 … N-1        each a whole server (app.EmbedServer) whose workers are
                                 connections to those sockets (worker/remote.py): gRPC and
                                 HTTP on the shared port (SO_REUSEPORT; the kernel spreads
                                 connections over them), validation, tokenizer, router

Health comes from the front end a connection reached: SERVING while it is up and has a
worker. A front end that dies takes its connections with it (their calls fail with
UNAVAILABLE, and clients reconnect to the others); it is restarted with backoff. One
started with port 0 is given the port the first front end got.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

from embedrpc import __version__

from .app import EmbedServer, Layout, raise_fd_limit, reload_logged
from .config import DebugHooks, ServeConfig
from .devices import available_cores
from .errors import ModelError
from .logs import configure_logging, frontend_text_format

log = logging.getLogger(__name__)

_CTX = mp.get_context("spawn")
_MAX_BACKOFF_S = 5.0
_MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes on Linux, the last one a NUL
# Front ends given no --frontends: 1 on the CPU (its cores are the workers'); with GPUs,
# one per 4 cores, at most 8 (the tokenizer and gRPC of ~8 processes keep an H200 busy
# with short queries; see docs/performance.md).
_AUTO_MAX = 8
_CORES_PER_FRONTEND = 4


def frontends_for(config: ServeConfig, devices: list[str]) -> int:
    """How many front-end processes to run: --frontends, or the default for the devices."""
    if config.network.frontends is not None:
        return config.network.frontends
    if config.devices.backend != "onnx" or not devices[0].startswith("cuda"):
        return 1
    return max(1, min(_AUTO_MAX, available_cores() // _CORES_PER_FRONTEND))


# -- a front-end process ----------------------------------------------------------------

def frontend_main(conn: Any, config: ServeConfig, layout: Layout, hooks: DebugHooks) -> None:
    """Entry point of a front-end process: a whole server whose workers are the
    supervisor's. Tells the supervisor ("bound", grpc, http, metrics ports) once it
    listens, ("ready",) once it serves, or ("error", message)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor drains it (SIGTERM)
    configure_logging(config.logging.log_level, config.logging.log_format,
                      text_format=frontend_text_format(layout.index))
    try:
        asyncio.run(_frontend(conn, config, layout, hooks))
    except ModelError as exc:
        _tell(conn, ("error", str(exc)))
    except Exception as exc:
        log.exception("front end failed")
        _tell(conn, ("error", f"{type(exc).__name__}: {exc}"))


def _tell(conn: Any, message: tuple[Any, ...]) -> None:
    with contextlib.suppress(OSError):
        conn.send(message)


async def _frontend(conn: Any, config: ServeConfig, layout: Layout,
                    hooks: DebugHooks) -> None:
    raise_fd_limit()
    server = EmbedServer(config, hooks=hooks, layout=layout)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_logged, server)

    def parent_readable() -> None:  # the supervisor sends nothing: this is its end
        loop.remove_reader(conn.fileno())
        if not stop.is_set():
            log.error("the supervisor is gone; stopping")
            stop.set()

    loop.add_reader(conn.fileno(), parent_readable)
    server.on_listening = lambda *ports: _tell(conn, ("bound", *ports))
    await server.start()
    _tell(conn, ("ready",))
    await stop.wait()
    await server.stop()


# -- the supervisor's view of one front end -----------------------------------------------

class FrontEnd:
    """One front-end process, started and restarted by a thread of the supervisor."""

    def __init__(self, index: int, layout: Layout, hooks: DebugHooks,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.index = index
        self.name = f"frontend-{index}"
        self.layout = layout
        self.hooks = hooks
        self.config: ServeConfig | None = None
        self.restarts = 0
        self.alive = False  # serving now
        self.metrics_port: int | None = None
        self.pid: int | None = None
        self._loop = loop
        self.bound: asyncio.Future[tuple[int, int | None, int | None]] = loop.create_future()
        self.ready: asyncio.Future[None] = loop.create_future()
        self._stopping = threading.Event()
        self._was_ready = False
        self._thread: threading.Thread | None = None

    def start(self, config: ServeConfig) -> None:
        self.config = config
        self._thread = threading.Thread(target=self._supervise, name=f"{self.name}-supervisor",
                                        daemon=True)
        self._thread.start()

    def terminate(self) -> None:
        """Ask it to drain and exit (SIGTERM); it is not restarted."""
        self._stopping.set()
        self.signal(signal.SIGTERM)

    def signal(self, signum: int) -> None:
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def join(self, timeout: float) -> bool:
        """Wait for its thread (so its process) to end; False if it did not in time."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            self._loop.call_soon_threadsafe(callback, *args)

    def _supervise(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                outcome = self._run_process()
            except Exception as exc:  # e.g. EMFILE from Pipe(): try again later
                log.warning("%s could not start (%s: %s); trying again", self.name,
                            type(exc).__name__, exc)
                outcome = "crashed"
            if outcome == "fatal":
                return
            failures = 0 if time.monotonic() - started > 30 else failures + 1
            self._stopping.wait(min(0.05 * 2**failures, _MAX_BACKOFF_S))

    def _run_process(self) -> str:
        parent, child = _CTX.Pipe(duplex=True)
        try:
            proc = _CTX.Process(target=frontend_main,
                                args=(child, self.config, self.layout, self.hooks),
                                name=f"embedrpc-{self.name}", daemon=True)
            proc.start()
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.pid = proc.pid
        if self._stopping.is_set():  # terminate() came while it was being started
            self.signal(signal.SIGTERM)
        error = ""
        while True:
            try:
                message = parent.recv()
            except (EOFError, OSError):
                break  # it exited
            if message[0] == "bound":
                self.metrics_port = message[3]
                self._post(_resolve, self.bound, tuple(message[1:]))
            elif message[0] == "ready":
                self.alive = True
                if self._was_ready:
                    log.info("%s serving again (pid %s, restart %d)", self.name, proc.pid,
                             self.restarts)
                else:
                    log.info("%s serving (pid %s)", self.name, proc.pid)
                self._was_ready = True
                self._post(_resolve, self.ready, None)
            elif message[0] == "error":
                error = message[1]
        parent.close()
        proc.join(5.0)
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
        self.alive = False
        self.metrics_port = None
        if self._stopping.is_set():
            return "ended"
        if not self._was_ready:  # it never served: retrying will not change that
            why = error or f"exited with code {proc.exitcode} before it was ready"
            self._post(_fail, self.bound, ModelError(f"{self.name}: {why}"))
            self._post(_fail, self.ready, ModelError(f"{self.name}: {why}"))
            return "fatal"
        self.restarts += 1
        log.warning("%s died (exit code %s%s); restarting", self.name, proc.exitcode,
                    f": {error}" if error else "")
        return "crashed"


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        future.exception()  # retrieved: no "never retrieved" warning for the second one


# -- metrics: the sum over the front ends ---------------------------------------------------

# Series every front end reports alike (they describe the shared workers, or the build):
# the largest, not the sum. The rest (calls, texts, tokens, batches, queues, the front
# ends' own process figures) add up.
_SAME_IN_EVERY_FRONTEND = {"embedrpc_workers_alive", "embedrpc_workers",
                           "embedrpc_worker_restarts", "embedrpc_build"}
_SCRAPE_TIMEOUT_S = 2.0


class FrontEndMetrics:
    """A Prometheus collector: every front end's /metrics (on loopback) read at scrape
    time and summed series by series, plus the front ends' own state."""

    def __init__(self, frontends: list[FrontEnd]) -> None:
        self.frontends = frontends

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            Metric,
        )
        from prometheus_client.parser import text_string_to_metric_families

        merged: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for frontend in self.frontends:
            port = frontend.metrics_port
            if port is None:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=_SCRAPE_TIMEOUT_S) as reply:
                    text = reply.read().decode("utf-8")
            except OSError:
                continue  # it is restarting: its figures are gone with it
            for family in text_string_to_metric_families(text):
                if family.name not in merged:
                    merged[family.name] = Metric(family.name, family.documentation,
                                                 family.type, family.unit)
                    values[family.name] = {}
                series = values[family.name]
                largest = family.name in _SAME_IN_EVERY_FRONTEND or family.type == "info"
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    if key not in series:
                        series[key] = sample.value
                    elif sample.name.endswith("_created") or \
                            sample.name == "process_start_time_seconds":
                        series[key] = min(series[key], sample.value)
                    elif largest or sample.name == "process_max_fds":
                        series[key] = max(series[key], sample.value)
                    else:
                        series[key] += sample.value
        for name, metric in merged.items():
            for (sample_name, labels), value in values[name].items():
                metric.add_sample(sample_name, dict(labels), value)
            yield metric
        alive = GaugeMetricFamily("embedrpc_frontends_alive", "Front-end processes "
                                  "serving now.")
        alive.add_metric([], sum(1 for f in self.frontends if f.alive))
        yield alive
        yield GaugeMetricFamily("embedrpc_frontends", "Front-end processes configured.",
                                value=len(self.frontends))
        restarts = CounterMetricFamily("embedrpc_frontend_restarts", "Times a front-end "
                                       "process died and was restarted.", labels=["frontend"])
        for f in self.frontends:
            restarts.add_metric([f.name], f.restarts)
        yield restarts

    def describe(self) -> list[Any]:
        return []  # collected only when scraped (no front end is asked at registration)


class DeviceBatches:
    """What the device workers ran for the front ends: texts per device batch, and the
    batches that merged several front ends' batches (the workers report each run)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        from .metrics import BATCH_TEXT_BUCKETS

        self.registry = CollectorRegistry()
        self.texts = Histogram("embedrpc_device_batch_texts", "Texts per batch a device "
                               "worker ran (batches of several front ends merged).",
                               buckets=BATCH_TEXT_BUCKETS, registry=self.registry)
        self.merged = Counter("embedrpc_device_batches_merged", "Device batches that held "
                              "the batches of several front ends.", registry=self.registry)

    def ran(self, batches: int, rows: int) -> None:
        self.texts.observe(rows)
        if batches > 1:
            self.merged.inc()


def _serve_metrics(frontends: list[FrontEnd], device: DeviceBatches, host: str,
                   port: int) -> tuple[Any, Any]:
    from prometheus_client import start_http_server

    device.registry.register(FrontEndMetrics(frontends))
    return start_http_server(port, host, registry=device.registry)


# -- the supervisor ------------------------------------------------------------------------

async def supervise(config: ServeConfig, frontends: int, *,
                    hooks: DebugHooks | None = None,
                    stop: asyncio.Event | None = None) -> None:
    """Run the device workers and `frontends` front-end processes until `stop` is set
    (SIGTERM/SIGINT when None; a second signal stops at once)."""
    raise_fd_limit()
    hooks = hooks or DebugHooks()
    try:
        sockets = tempfile.mkdtemp(prefix="embedrpc-")  # 0700: only this user connects
    except OSError as exc:
        raise ModelError(f"--frontends {frontends}: no writable temporary directory for "
                         f"the workers' sockets ({exc}); set TMPDIR") from exc
    if len(Layout("supervisor", sockets).socket_of(999).encode()) > _MAX_SOCKET_PATH:
        shutil.rmtree(sockets, ignore_errors=True)
        raise ModelError(f"--frontends {frontends}: the workers' socket paths under {sockets} "
                         f"would be longer than a Unix socket allows ({_MAX_SOCKET_PATH} "
                         "bytes); set TMPDIR to a shorter directory")
    try:
        await _supervise(config, frontends, hooks, sockets, stop)
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


async def _supervise(config: ServeConfig, n: int, hooks: DebugHooks, sockets: str,
                     stop: asyncio.Event | None) -> None:
    loop = asyncio.get_running_loop()
    # Loads every model (a checkpoint is prepared into the cache here, once: the front
    # ends find it there) and makes the workers' specs; it serves no calls.
    server = EmbedServer(config, hooks=hooks, layout=Layout("supervisor", sockets))
    net = config.network
    frontends = [FrontEnd(i, Layout("frontend", sockets, i), hooks, loop) for i in range(n)]
    own_stop = stop is None
    stop = stop or asyncio.Event()
    if own_stop:
        _handle_signals(loop, stop, config, frontends, server)
    for m in server.models:
        server._log_model(m)
    device = DeviceBatches()
    for w in server.workers:
        w.on_ran = device.ran
    ready = [w.start(loop) for w in server.workers]
    http: Any = None
    held: list[socket.socket] = []
    try:
        if net.metrics_port is not None:
            host = net.metrics_host or net.host
            try:
                http = _serve_metrics(frontends, device, host, net.metrics_port)
            except OSError as exc:
                raise ModelError(f"cannot listen for metrics: {exc}") from exc
            log.info("metrics on http://%s:%d/metrics", host, http[0].server_port)
        # The first front end binds the ports (port 0: it picks them); the others share
        # them, and so does a restarted one. Its /metrics is on loopback, for this process.
        fe_net = dataclasses.replace(
            net, metrics_port=0 if net.metrics_port is not None else None,
            metrics_host="127.0.0.1")
        first_config = dataclasses.replace(config, network=fe_net)
        held = _hold_ports([p for p in (net.port, net.http_port) if p], net.host)
        frontends[0].start(first_config)
        port, http_port, _ = await _first(frontends[0].bound, ready, stop)
        held += _hold_ports([p for p in (port, http_port) if p and p not in
                             (net.port, net.http_port)], net.host)
        shared = dataclasses.replace(config, network=dataclasses.replace(
            fe_net, port=port, http_port=http_port))
        frontends[0].config = shared  # a restart binds the same ports
        for frontend in frontends[1:]:
            frontend.start(shared)
        infos = await _first(asyncio.wait_for(asyncio.gather(*ready), net.startup_timeout_s),
                             ready, stop)
        for w, info in zip(server.workers, infos, strict=True):
            log.info("%s ready (pid %s, %s)", w.name, w.pid, info.get("providers"))
        await _first(asyncio.gather(*(f.ready for f in frontends)), ready, stop)
        log.info("embedrpc %s serving %s on %s:%d (%d front ends, %s)", __version__,
                 ",".join(server.names), net.host, port, n, server.security.describe())
        await stop.wait()
    except _Stopped:
        pass
    finally:
        log.info("stopping: draining the front ends (grace %.0fs)", net.grace_seconds)
        for frontend in frontends:
            frontend.terminate()
        deadline = net.grace_seconds + 15.0
        done = await asyncio.to_thread(lambda: all(f.join(deadline) for f in frontends))
        if not done:
            log.warning("front ends still running after %.0f s: killed", deadline)
            for frontend in frontends:
                frontend.signal(signal.SIGKILL)
        await asyncio.gather(*(w.stop() for w in server.workers))
        if http is not None:
            http[0].shutdown()
            http[0].server_close()
        for lock in held:
            lock.close()
        for future in (*(f.bound for f in frontends), *(f.ready for f in frontends), *ready):
            if future.done() and not future.cancelled():
                future.exception()  # retrieved
    log.info("stopped")


def _hold_ports(ports: list[int], host: str) -> list[socket.socket]:
    """Claim the TCP ports for this server alone. Its front ends share them with
    SO_REUSEPORT, which a second server started by the same user on the same port would
    be let in on too, silently taking half the connections; a Linux abstract Unix socket
    named after each port (scoped, as ports are, to the network namespace, and freed
    when this process ends however it ends) makes that second server fail loudly."""
    held = []
    for port in ports:
        lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            lock.bind(f"\0embedrpc-port-{port}")
        except OSError:
            lock.close()
            for other in held:
                other.close()
            raise ModelError(f"cannot listen on {host}:{port}: another embedrpc server "
                             "with several front ends serves that port") from None
        held.append(lock)
    return held


class _Stopped(Exception):
    """Asked to stop while starting."""


async def _first(what: Any, ready: list[asyncio.Future[Any]], stop: asyncio.Event) -> Any:
    """`what`'s result, unless a worker cannot start first (its ModelError), or `stop` is
    set (_Stopped: the caller drains)."""
    task = asyncio.ensure_future(what)
    stopping = asyncio.ensure_future(stop.wait())
    failed = [f for f in ready if f.done() and f.exception() is not None]
    if failed:
        task.cancel()
        stopping.cancel()
        raise failed[0].exception()  # type: ignore[misc]
    waiting = {task, stopping, *ready}
    try:
        while True:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            if stopping in done:
                raise _Stopped
            for future in done:
                waiting.discard(future)
                if future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]
    finally:
        for future in (task, stopping):
            if not future.done():
                future.cancel()


def _handle_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event,
                    config: ServeConfig, frontends: list[FrontEnd],
                    server: EmbedServer) -> None:
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: stopping now")
            for frontend in frontends:
                frontend.signal(signal.SIGKILL)
            for w in server.workers:
                if w.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.pid, signal.SIGKILL)
            os._exit(1)
        log.info("%s: shutting down (grace %.0fs)", signal.Signals(signum).name,
                 config.network.grace_seconds)
        stop.set()

    def on_hup() -> None:
        live = [f for f in frontends if f.pid is not None]
        for frontend in live:
            frontend.signal(signal.SIGHUP)
        log.info("SIGHUP: passed on to %d front ends (each reloads and logs it)", len(live))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
