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
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import logging
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

from .app import EmbedServer, Layout, raise_fd_limit, reload_logged, stop_on_signals
from .config import DebugHooks, SecurityOptions, ServeConfig
from .devices import available_cores
from .errors import ModelError
from .logs import configure_logging, frontend_text_format
from .metrics import BATCH_TEXT_BUCKETS, LATENCY_BUCKETS, worker_families
from .security import _given_keys, _load_tls
from .worker.handle import exit_reason, spawn

log = logging.getLogger(__name__)

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
    listens, ("ready",) once it serves, or ("error", message); answers its ("ping",)
    with ("pong",)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor drains it (SIGTERM)
    # A SIGHUP passed on while it still starts must not end it (the default action):
    # the loop's reload handler takes over once the server exists.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _tell(conn, ("hello",))  # SIGHUP may come now: it reads the keys after this anyway
    configure_logging(config.logging.log_level, config.logging.log_format,
                      text_format=frontend_text_format(layout.index))
    try:
        asyncio.run(_frontend(conn, config, layout, hooks))
    except ModelError as exc:
        _tell(conn, ("error", str(exc)))
        raise SystemExit(1) from None
    except Exception as exc:
        log.exception("front end failed")
        _tell(conn, ("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None


def _tell(conn: Any, message: tuple[Any, ...]) -> None:
    with contextlib.suppress(OSError):
        conn.send(message)


async def _frontend(conn: Any, config: ServeConfig, layout: Layout,
                    hooks: DebugHooks) -> None:
    raise_fd_limit()
    loop = asyncio.get_running_loop()
    built: list[EmbedServer] = []

    def on_hup() -> None:
        if built:
            reload_logged(built[0])

    # Before the server reads the keys and certificates (EmbedServer does): a SIGHUP
    # from now on reloads them, once the server exists (the loop runs this callback
    # when it next turns, after the constructor); one before it (ignored) came before
    # they were read, so they are read as the supervisor last copied them.
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    server = EmbedServer(config, hooks=hooks, layout=layout)
    built.append(server)
    if hooks.frontend_start_pause_s:  # tests: a SIGHUP comes after the keys were read
        time.sleep(hooks.frontend_start_pause_s)
    stop = asyncio.Event()
    orphaned = False
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def parent_readable() -> None:
        nonlocal orphaned
        try:
            while conn.poll(0):
                if conn.recv()[0] == "ping":
                    _tell(conn, ("pong",))
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            if not stop.is_set():
                # Its workers ended with it: nothing in flight can finish. Fail it now
                # rather than wait out the grace period; tidy the sockets' directory.
                log.error("the supervisor is gone; stopping")
                orphaned = True
                shutil.rmtree(layout.sockets, ignore_errors=True)
                stop.set()

    loop.add_reader(conn.fileno(), parent_readable)
    server.on_listening = lambda *ports: _tell(conn, ("bound", *ports))
    starting = asyncio.ensure_future(server.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # asked to stop while it starts: start() undoes itself
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return
    starting.result()  # its error, if it could not start
    _tell(conn, ("ready",))
    await stopping
    await server.stop(0.0 if orphaned else None)


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
        self._conn: Any = None  # the pipe to the live process
        self.hup_safe = False  # it ignores SIGHUP until its reload handler is in place
        self._killed = False  # the supervisor killed it (it answered no ping)
        self.answered = time.monotonic()  # when it last answered a ping (or started)
        self.unanswered_since: float | None = None  # its oldest ping not answered yet

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self, config: ServeConfig) -> None:
        self.config = config
        self._thread = threading.Thread(target=self._supervise, name=f"{self.name}-supervisor",
                                        daemon=True)
        self._thread.start()

    def terminate(self) -> None:
        """Ask it to drain and exit (SIGTERM); it is not restarted."""
        self._stopping.set()
        self.signal(signal.SIGTERM)

    def ping(self) -> None:
        """Ask the live process to answer (its event loop does, if it is not stuck)."""
        conn = self._conn
        if conn is not None:
            if self.unanswered_since is None:
                self.unanswered_since = time.monotonic()
            with contextlib.suppress(OSError, ValueError):
                conn.send(("ping",))

    def kill_stuck(self) -> None:
        """SIGKILL: it answered no ping for too long (it is restarted)."""
        self._killed = True
        self.signal(signal.SIGKILL)

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
        proc, parent = spawn(frontend_main, (self.config, self.layout, self.hooks),
                             f"embedrpc-{self.name}")
        self.pid = proc.pid
        self.answered = time.monotonic()
        self._conn = parent
        if self._stopping.is_set():  # terminate() came while it was being started
            self.signal(signal.SIGTERM)
        error = ""
        while True:
            try:
                message = parent.recv()
            except (EOFError, OSError):
                break  # it exited
            if message[0] == "bound":
                self.unanswered_since = None  # a new process
                self.metrics_port = message[3]
                self._post(_resolve, self.bound, tuple(message[1:]))
            elif message[0] == "ready":
                self.answered = time.monotonic()
                self.alive = True
                if self._was_ready:
                    log.info("%s serving again (pid %s, restart %d)", self.name, proc.pid,
                             self.restarts)
                else:
                    log.info("%s serving (pid %s)", self.name, proc.pid)
                self._was_ready = True
                self._post(_resolve, self.ready, None)
            elif message[0] == "hello":
                self.hup_safe = True
            elif message[0] == "pong":
                self.answered = time.monotonic()
                self.unanswered_since = None
            elif message[0] == "error":
                error = message[1]
        self._conn = None
        parent.close()
        proc.join(5.0)
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
        self.alive = False
        self.metrics_port = None
        self.pid = None  # no signal may reach another process that gets its pid
        self.hup_safe = False
        if self._stopping.is_set():
            return "ended"
        killed = self._killed
        self._killed = False
        signalled = proc.exitcode is not None and -proc.exitcode in _GROUP_SIGNALS
        if not self._was_ready and not signalled:  # it never served: retrying will not
            # change that (but a signal to the process group while it started, before
            # it set its handlers, is no fault of its own: the supervisor, when the
            # signal was meant for it, stops before the restart)
            why = error or exit_reason(proc.exitcode)
            self._post(_fail, self.bound, ModelError(f"{self.name}: {why}"))
            self._post(_fail, self.ready, ModelError(f"{self.name}: {why}"))
            return "fatal"
        self.restarts += 1
        how = "killed by the supervisor: it answered nothing" if killed else \
            exit_reason(proc.exitcode).replace(" before it was ready", "")
        log.warning("%s %s%s; restarting (restart %d)", self.name,
                    how if how.startswith("exited") else f"died: {how}",
                    f": {error}" if error else "", self.restarts)
        return "crashed"


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        future.exception()  # retrieved: no "never retrieved" warning for the second one


# -- metrics: the sum over the front ends ---------------------------------------------------

# Series about the workers are the supervisor's own (it owns them; a front end sees only
# its share of a merged batch, and the time its batches waited behind another's):
_SUPERVISOR_SERIES = {"embedrpc_worker_busy_seconds", "embedrpc_inference_duration_seconds",
                      "embedrpc_worker_restarts", "embedrpc_workers_alive", "embedrpc_workers"}
# Series every front end reports alike: the largest, not the sum.
_SAME_IN_EVERY_FRONTEND = {"embedrpc_build_info"}
_SCRAPE_TIMEOUT_S = 2.0
_Key = tuple[str, tuple[tuple[str, str], ...]]


class _Seen:
    """What was last read from one front end, and what its earlier processes counted."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.families: dict[str, tuple[str, str, str]] = {}  # name → (doc, type, unit)
        self.values: dict[str, dict[_Key, float]] = {}
        self.carried: dict[str, dict[_Key, float]] = {}  # counts of its dead processes
        self.asked = 0.0  # time.monotonic() when the read now in `values` was sent
        self.failed = False  # the last read got no answer


def _monotonic(kind: str, sample: str) -> bool:
    """A sample that only grows while its process lives (a counter, a histogram's
    buckets, count and sum): summed across a front end's processes, so a restart does not
    make the server's total go back."""
    return kind in ("counter", "histogram", "summary") and not sample.endswith("_created")


class FrontEndMetrics:
    """A Prometheus collector: every front end's /metrics (on loopback) read at scrape
    time and added up series by series. A front end that cannot be read (restarting,
    stuck) keeps its last counts, and a restarted one's counts add to its dead
    predecessors': the totals never go back (their gauges count only while they answer).

    A scrape never waits on a front end whose last read failed (refresh, every second,
    reads it again), and reads the others at once, side by side: one stuck front end
    costs a scrape at most one read's timeout, once, and overlapping scrapes do not
    queue behind each other."""

    def __init__(self, frontends: list[FrontEnd]) -> None:
        self.frontends = frontends
        self._seen = [_Seen() for _ in frontends]
        self._lock = threading.Lock()  # scrapes and refreshes may overlap

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import Metric

        answered = self._read_all(skip_failed=True)
        merged: dict[str, Metric] = {}
        totals: dict[str, dict[_Key, float]] = {}
        with self._lock:
            for seen, fresh in zip(self._seen, answered, strict=True):
                for name, (doc, kind, unit) in seen.families.items():
                    metric = merged.setdefault(name, Metric(name, doc, kind, unit))
                    series = totals.setdefault(name, {})
                    sources = [seen.values.get(name, {}) if fresh else
                               {k: v for k, v in seen.values.get(name, {}).items()
                                if _monotonic(kind, k[0])},
                               seen.carried.get(name, {})]
                    for values in sources:
                        for key, value in values.items():
                            series[key] = _combine(name, key[0], series.get(key), value)
        for name, metric in merged.items():
            for (sample, labels), value in totals[name].items():
                metric.add_sample(sample, dict(labels), value)
            yield metric

    def refresh(self) -> None:
        """Read every front end now (between scrapes, so a front end that dies loses no
        more of its counts than since the last refresh)."""
        self._read_all(skip_failed=False)

    def _read_all(self, *, skip_failed: bool) -> list[bool]:
        """Read the front ends side by side; which ones answered. `skip_failed`: leave
        out those whose last read failed."""
        asked = [i for i, seen in enumerate(self._seen)
                 if not (skip_failed and seen.failed)]
        answered = [False] * len(self.frontends)
        if asked:
            with concurrent.futures.ThreadPoolExecutor(len(asked)) as pool:
                for i, ok in zip(asked, pool.map(self._read, asked), strict=True):
                    answered[i] = ok
        return answered

    def _read(self, index: int) -> bool:
        """Read one front end into its _Seen; False if it did not answer."""
        from prometheus_client.parser import text_string_to_metric_families

        frontend, seen = self.frontends[index], self._seen[index]
        port, pid = frontend.metrics_port, frontend.pid
        if port is None or pid is None:
            return False
        asked = time.monotonic()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                        timeout=_SCRAPE_TIMEOUT_S) as reply:
                text = reply.read().decode("utf-8")
        except OSError:
            with self._lock:
                seen.failed = True
            return False
        families = list(text_string_to_metric_families(text))
        with self._lock:
            if asked < seen.asked:  # a later read (an overlapping scrape) is in already
                return True
            seen.asked, seen.failed = asked, False
            if seen.pid is not None and seen.pid != pid:  # a new process: keep its counts
                for name, values in seen.values.items():
                    kind = seen.families[name][1]
                    carried = seen.carried.setdefault(name, {})
                    for key, value in values.items():
                        if _monotonic(kind, key[0]):
                            carried[key] = carried.get(key, 0.0) + value
            seen.pid = pid
            seen.values = {}
            for family in families:
                # The text format gives a counter's or histogram's _created samples a
                # family of their own (a gauge): the supervisor's series drop them too.
                if family.name.removesuffix("_created") in _SUPERVISOR_SERIES:
                    continue
                seen.families[family.name] = (family.documentation, family.type,
                                              family.unit)
                seen.values[family.name] = {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for s in family.samples}
        return True

    def describe(self) -> list[Any]:
        return []  # collected only when scraped (no front end is asked at registration)


def _combine(family: str, sample: str, have: float | None, value: float) -> float:
    if have is None:
        return value
    if sample.endswith("_created") or sample == "process_start_time_seconds":
        return min(have, value)
    if family in _SAME_IN_EVERY_FRONTEND or sample == "process_max_fds":
        return max(have, value)
    return have + value


class SupervisorMetrics:
    """The supervisor's own series: the device workers (what they ran, for how long,
    whether they are alive, their restarts) and the front ends."""

    def __init__(self, models: list[Any], frontends: list[FrontEnd]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.models = models
        self.frontends = frontends
        self.labelled = len(models) > 1
        m = ["model"] if self.labelled else []
        self.registry = CollectorRegistry()
        r = self.registry
        self.texts = Histogram("embedrpc_device_batch_texts", "Texts per batch a device "
                               "worker ran (batches of several front ends merged).", m,
                               buckets=BATCH_TEXT_BUCKETS, registry=r)
        self.merged = Counter("embedrpc_device_batches_merged", "Device batches that held "
                              "the batches of several front ends.", m, registry=r)
        self.inference = Histogram("embedrpc_inference_duration_seconds", "Time a worker "
                                   "spent on one batch.", m, buckets=LATENCY_BUCKETS,
                                   registry=r)
        self.busy = Counter("embedrpc_worker_busy_seconds", "Time each worker spent running "
                            "batches.", ["worker", *m], registry=r)
        for model in models:
            for w in model.workers:
                self._of(self.busy, w.name, model=model.name)  # every series from the start
                w.on_ran = functools.partial(self.ran, w.name, model.name)
        r.register(self)

    def _of(self, metric: Any, *labels: str, model: str) -> Any:
        values = [*labels, model] if self.labelled else list(labels)
        return metric.labels(*values) if values else metric

    def ran(self, worker: str, model: str, batches: int, figures: tuple[int, float]) -> None:
        rows, seconds = figures
        self._of(self.texts, model=model).observe(rows)
        if batches > 1:
            self._of(self.merged, model=model).inc()
        self._of(self.inference, model=model).observe(seconds)
        self._of(self.busy, worker, model=model).inc(seconds)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield from worker_families(self.labelled, {m.name: m.workers for m in self.models})
        frontends_alive = GaugeMetricFamily("embedrpc_frontends_alive", "Front-end processes "
                                            "serving now (answering the supervisor's pings).")
        now = time.monotonic()
        frontends_alive.add_metric([], sum(
            1 for f in self.frontends if f.alive and (
                f.unanswered_since is None or now - f.unanswered_since <= _ANSWERS_WITHIN_S)))
        frontend_restarts = CounterMetricFamily("embedrpc_frontend_restarts", "Times a "
                                                "front-end process died and was restarted.",
                                                labels=["frontend"])
        for f in self.frontends:
            frontend_restarts.add_metric([f.name], f.restarts)
        yield from (frontends_alive,
                    GaugeMetricFamily("embedrpc_frontends", "Front-end processes "
                                      "configured.", value=len(self.frontends)),
                    frontend_restarts)

    def describe(self) -> list[Any]:
        return []


def _serve_metrics(own: SupervisorMetrics, host: str, port: int
                   ) -> tuple[tuple[Any, Any], FrontEndMetrics]:
    from prometheus_client import start_http_server

    sums = FrontEndMetrics(own.frontends)
    own.registry.register(sums)
    return start_http_server(port, host, registry=own.registry), sums


# The supervisor reads every front end's counts this often between scrapes: a front end
# that dies (SIGKILL, a crash) loses at most the counts of its last interval.
_COUNTS_EVERY_S = 1.0


async def _keep_counts(sums: FrontEndMetrics) -> None:
    while True:
        await asyncio.sleep(_COUNTS_EVERY_S)
        await asyncio.to_thread(sums.refresh)


# -- the security files, as last found good ---------------------------------------------

class SecurityFiles:
    """The files --api-keys-file and the TLS options name, copied into the supervisor's
    private directory (0700, removed when it stops) each time it has read them and found
    them good: at start, and at each SIGHUP that reloads. The front ends read the copies.
    So a front end (re)started while a file is broken, empty or half written starts with
    the keys and certificates the others serve with, and a SIGHUP reaches the front ends
    only when the files are good: all or nothing, for every front end alike."""

    FIELDS = ("tls_cert", "tls_key", "tls_client_ca", "api_keys_file")

    def __init__(self, directory: str, options: SecurityOptions) -> None:
        self.options = options  # the files the user named
        self.dir = os.path.join(directory, "security")
        names = {f: os.path.join(self.dir, f) for f in self.FIELDS if getattr(options, f)}
        self.copied = dataclasses.replace(options, **names)  # what the front ends read
        if names:
            os.mkdir(self.dir, 0o700)
            self.refresh()

    def refresh(self) -> None:
        """Copy the files anew (call it once they were read and found good); ValueError,
        and the copies as they were, if what was copied is not good (a file changed in
        between)."""
        fields = [f for f in self.FIELDS if getattr(self.options, f)]
        staged = {f: os.path.join(self.dir, f"{f}.new") for f in fields}
        try:
            for f in fields:
                with open(getattr(self.options, f), "rb") as src:
                    data = src.read()
                fd = os.open(staged[f], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as dst:
                    dst.write(data)
            check = dataclasses.replace(self.options, **staged)
            _load_tls(check)
            if check.api_keys_file is not None:
                _given_keys(check)
        except (OSError, ValueError) as exc:
            for path in staged.values():
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise ValueError(f"the files changed while they were read ({exc}); send SIGHUP "
                             "again") from None
        for f in fields:
            os.replace(staged[f], os.path.join(self.dir, f))


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
    net = config.network
    # The ports first, before a model loads or a process starts: a refused start is
    # quick, and leaves no half-spawned worker behind (nor its traceback).
    fixed = [(what, p) for what, p in (("", net.port), (" for HTTP", net.http_port)) if p]
    held = _hold_ports([p for _, p in fixed], net.host)
    try:
        _refuse_taken(fixed, net.host)
        await _run(config, n, hooks, sockets, stop, held)
    finally:
        for lock in held:
            lock.close()


async def _run(config: ServeConfig, n: int, hooks: DebugHooks, sockets: str,
               stop: asyncio.Event | None, held: list[socket.socket]) -> None:
    """The supervisor, its fixed ports held (`held`: it adds those that port 0 picks;
    the caller closes them all)."""
    loop = asyncio.get_running_loop()
    # Loads every model (a checkpoint is prepared into the cache here, once: the front
    # ends find it there) and makes the workers' specs; it serves no calls.
    server = EmbedServer(config, hooks=hooks, layout=Layout("supervisor", sockets))
    files = SecurityFiles(sockets, config.security)
    net = config.network
    frontends = [FrontEnd(i, Layout("frontend", sockets, i), hooks, loop) for i in range(n)]
    own_stop = stop is None
    stop = stop or asyncio.Event()
    if own_stop:
        _handle_signals(loop, stop, config, frontends, server, files, sockets)
    config = dataclasses.replace(config, security=files.copied)  # the front ends' config
    for m in server.models:
        server._log_model(m)
    own_metrics = SupervisorMetrics(server.models, frontends)
    ready = [w.start(loop) for w in server.workers]
    http: Any = None
    watch: asyncio.Task[None] | None = None
    counts: asyncio.Task[None] | None = None
    try:
        if net.metrics_port is not None:
            host = net.metrics_host or net.host
            try:
                http, sums = _serve_metrics(own_metrics, host, net.metrics_port)
            except OSError as exc:
                raise ModelError(f"cannot listen for metrics: {exc}") from exc
            log.info("metrics on http://%s:%d/metrics", host, http[0].server_port)
        # The first front end binds the ports (port 0: it picks them); the others share
        # them, and so does a restarted one. Its /metrics is on loopback, for this process.
        fe_net = dataclasses.replace(
            net, metrics_port=0 if net.metrics_port is not None else None,
            metrics_host="127.0.0.1")
        first_config = dataclasses.replace(config, network=fe_net)
        frontends[0].start(first_config)
        port, http_port, _ = await _first(frontends[0].bound, ready, stop)
        held += _hold_ports([p for p in (port, http_port) if p and p not in
                             (net.port, net.http_port)], net.host)
        shared = dataclasses.replace(config, network=dataclasses.replace(
            fe_net, port=port, http_port=http_port))
        frontends[0].config = shared  # a restart binds the same ports
        if http_port is not None:
            log.info("HTTP (OpenAI-compatible) on %s://%s:%d/v1/embeddings",
                     "https" if server.security.tls else "http", net.host, http_port)
        for frontend in frontends[1:]:
            frontend.start(shared)
        infos = await _first(asyncio.wait_for(asyncio.gather(*ready), net.startup_timeout_s),
                             ready, stop)
        for w, info in zip(server.workers, infos, strict=True):
            log.info("%s ready (pid %s, %s)", w.name, w.pid, info.get("providers"))
        await _first(asyncio.gather(*(f.ready for f in frontends)), ready, stop)
        log.info("embedrpc %s serving %s on %s:%d (%d front ends, %s)", __version__,
                 ",".join(server.names), net.host, port, n, server.security.describe())
        watch = loop.create_task(_watch(frontends, hooks.frontend_stall_s))
        if http is not None:
            counts = loop.create_task(_keep_counts(sums))
        await stop.wait()
    except _Stopped:
        pass
    finally:
        for task in (watch, counts):
            if task is not None:
                task.cancel()
        if any(f.started for f in frontends):
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
            # With the user id: SO_REUSEPORT lets only the same user share a port anyway.
            # (Abstract names have no permissions: another local user who takes this one
            # first keeps the server from starting; docs/security.md says so.)
            lock.bind(f"\0embedrpc-{os.getuid()}-port-{port}")
        except OSError:
            lock.close()
            for other in held:
                other.close()
            raise ModelError(f"cannot listen on {host}:{port}: another embedrpc server "
                             "with several front ends serves that port") from None
        held.append(lock)
    return held


_WILDCARDS = ("", "*", "0.0.0.0", "::")


def _refuse_taken(ports: list[tuple[str, int]], host: str) -> None:
    """ModelError if another program listens on one of `ports` ((what, port), by number).
    The front ends bind with SO_REUSEPORT, and so would join, silently sharing its
    connections, a listener that set it too (as every grpcio server does by default);
    a probe bound without it is refused by the kernel as one front end alone would be."""
    bare = host.strip("[]")
    for what, port in ports:
        if bare in _WILDCARDS:  # grpc listens on [::] (both families) where it can
            addresses = [(socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))]
        else:
            try:
                found = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM)
            except OSError:  # the front end's own bind says what is wrong with the host
                continue
            addresses = list(dict.fromkeys((f, a[:2]) for f, _, _, _, a in found))
        for family, address in addresses:
            try:
                probe = socket.socket(family, socket.SOCK_STREAM)
            except OSError:  # no IPv6 here: the next address is IPv4's
                continue
            with probe:
                # SO_REUSEADDR: connections of an earlier server left in TIME_WAIT are no
                # objection; a listening socket still is.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and bare in _WILDCARDS:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                try:
                    probe.bind(address)
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        continue  # not this process's to judge: the front end reports it
                    raise ModelError(f"cannot listen{what} on {host}:{port}: another "
                                     f"program listens on that port ({exc.strerror})") from None
            if bare in _WILDCARDS:
                break  # [::] covered both families


_PING_EVERY_S = 1.0
# What a service manager or a terminal sends to the whole process group: a front end
# still starting (its handlers not yet set) dies of it, and is started again.
_GROUP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
# A front end that has left a ping unanswered for this long is not counted as serving
# in embedrpc_frontends_alive (after 20 s without an answer it is killed and restarted).
_ANSWERS_WITHIN_S = 3 * _PING_EVERY_S


async def _watch(frontends: list[FrontEnd], stall_s: float) -> None:
    """Ping every front end; one serving that has not answered for `stall_s` (its event
    loop is stuck, or it was stopped) is killed, so it is restarted: its connections are
    closed and their clients reconnect to the others."""
    while True:
        await asyncio.sleep(_PING_EVERY_S)
        now = time.monotonic()
        for frontend in frontends:
            if frontend.alive and now - frontend.answered > stall_s:
                log.error("%s answered nothing for %.0f s (its event loop is stuck); killing "
                          "it, it is restarted", frontend.name, now - frontend.answered)
                frontend.alive = False
                frontend.kill_stuck()
            elif frontend.alive:  # a serving one reads its pipe: the pings never pile up
                frontend.ping()


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
            if stop.is_set():  # stopping: what failed meanwhile does not matter
                raise _Stopped
            if task in done:
                return task.result()
            for future in done:
                waiting.discard(future)
                if future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]
    finally:
        for future in (task, stopping):
            if not future.done():
                future.cancel()
            future.add_done_callback(_retrieved)


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Its exception counts as seen (a result nobody waits for any more)."""
    if not future.cancelled():
        future.exception()


def on_sighup(server: EmbedServer, files: SecurityFiles, frontends: list[FrontEnd]) -> None:
    """SIGHUP: read the files (the supervisor's own reload: all or nothing), copy them
    for the front ends, and pass the signal on to each."""
    try:
        server.reload()
        files.refresh()
    except ValueError as exc:
        log.error("SIGHUP: nothing reloaded, the current keys and certificates stay: %s", exc)
        return
    # A front end still booting would die of it; one past "hello" reloads, or reads
    # the copies afresh as it starts.
    live = [f for f in frontends if f.pid is not None and f.hup_safe]
    for frontend in live:
        frontend.signal(signal.SIGHUP)
    log.info("SIGHUP: passed on to %d front ends (each reloads and logs it)", len(live))


def _handle_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event,
                    config: ServeConfig, frontends: list[FrontEnd],
                    server: EmbedServer, files: SecurityFiles, sockets: str) -> None:
    def kill_children() -> None:  # a second signal: exit now, leaving nothing behind
        for frontend in frontends:
            frontend.signal(signal.SIGKILL)
        for w in server.workers:
            if w.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
        shutil.rmtree(sockets, ignore_errors=True)

    def on_hup() -> None:
        on_sighup(server, files, frontends)

    stop_on_signals(loop, stop, config.network.grace_seconds, kill_children)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
