"""Assemble the server and run its lifecycle: models → workers → routers → front ends
(gRPC: Embedder, Reranker, health, reflection; the HTTP routes; /metrics).

Each model (--model, given once or more) gets its own tokenizer, core, router and
workers on every device (ServedModel); the front ends ask `Cores` which model serves a
request. `start()` spawns every model's workers, opens the ports (health NOT_SERVING)
and turns SERVING once every worker answered its warm-up; `stop()` drains. Options:
server/config.py; signals: server/signals.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import ssl
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embedrpc import __version__
from embedrpc.v1 import embedder_pb2 as pb

from .checkpoints import serving_directory
from .config import BatchConfig, DebugHooks, ServeConfig
from .core import Calls, Cores, EmbeddingCore, ModelInfo, RerankCore
from .devices import available_cores, resolve_devices
from .errors import EmbedError, ModelError
from .frontends.grpc_observing import ObservingInterceptor
from .frontends.grpc_service import (
    EmbedderService,
    RerankerService,
    add_embedder_to_server,
    add_reranker_to_server,
)
from .frontends.http import HttpServer, tls_context
from .metrics import Metrics
from .model import ModelSpec, find_onnx, load_model_spec
from .rerank import PairEncoder, model_max_length
from .router import Router
from .security import ServerSecurity
from .tasks import RERANK
from .tokenizer import TextEncoder
from .worker.handle import WorkerHandle
from .worker.remote import RemoteWorker
from .worker.spec import WorkerSpec

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Embedder"].full_name
RERANKER_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Reranker"].full_name

# Info names precisions as the proto does ("float32", "float16", "bfloat16"); a prepared
# graph records `embedrpc prepare --precision`'s names (fp32, fp16, bf16, int8).
_PREPARED_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
GRPC_HANDSHAKE_TIMEOUT_MS = 10_000  # as the HTTP port's TLS handshakes


def info_precision(precision: str) -> str:
    """A worker's precision as Info reports it: "fp16" → "float16", "bf16-emulated" →
    "bfloat16-emulated"; "int8" and the graphs' own type names stay as they are."""
    base, dash, rest = precision.partition("-")
    return _PREPARED_NAMES.get(base, base) + dash + rest


@dataclasses.dataclass(frozen=True)
class Layout:
    """This process's part when several front-end processes share the port (`serve
    --frontends N`, server/supervisor.py). "supervisor": it owns the device workers, which
    listen on Unix sockets in `sockets`, and serves no calls itself; "frontend": it serves
    calls on the shared port (SO_REUSEPORT) and sends its batches to those workers."""

    role: str  # "supervisor" or "frontend"
    sockets: str  # the directory of the workers' sockets
    index: int = 0  # which front end

    def socket_of(self, worker: int) -> str:
        return str(Path(self.sockets) / f"w{worker}.sock")


@dataclasses.dataclass(eq=False)
class ServedModel:
    """One model of the server: its directory, tokenizer, core, workers and router."""

    name: str
    task: str  # "embed" or "rerank"
    path: Path
    onnx_path: Path
    max_length: int
    hidden_size: int  # the width of what its workers return (1: a reranker's score)
    spec: ModelSpec | None  # embedding models
    encoder: TextEncoder | PairEncoder
    core: EmbeddingCore | RerankCore
    batch_config: BatchConfig
    workers: list[WorkerHandle] = dataclasses.field(default_factory=list)
    router: Router | None = None

    @property
    def serving(self) -> bool:
        """Some worker of this model can take batches."""
        return any(w.alive for w in self.workers)


class EmbedServer:
    """The whole server in one object: `await start()`, then `await stop()`."""

    def __init__(self, config: ServeConfig, *, hooks: DebugHooks | None = None,
                 layout: Layout | None = None) -> None:
        """hooks: test-only fault injection and paths (no flags); layout: this process's
        part among several front ends (None: the whole server in one process)."""
        self.config = config
        self.layout = layout
        # Called once the ports are open, before the warm-up: (gRPC, HTTP, metrics port).
        self.on_listening: Any = None
        hooks = hooks or DebugHooks()
        options = config.devices
        # Read and check the key and certificate files first.
        self.security = ServerSecurity.from_config(
            config.security, host=config.network.host,
            warn=layout is None or layout.role != "frontend")  # the supervisor warns once
        self.devices = resolve_devices(options.device) if options.backend == "onnx" \
            else ["cpu"]
        kind = "cuda" if self.devices[0].startswith("cuda") else "cpu"
        if options.cuda_graphs and options.backend == "onnx" and kind == "cpu":
            if options.device != "auto":
                raise ModelError(f"--cuda-graphs needs a CUDA device, not --device "
                                 f"{options.device}")
            log.warning("--cuda-graphs: no GPU, so no CUDA graphs")
            options = dataclasses.replace(options, cuda_graphs=False)
        # Serves every front end's calls; UNAVAILABLE ("still loading") until the warm-up.
        self.calls = Calls()
        self.models: list[ServedModel] = []
        for model in config.model.model:
            # A checkpoint (no ONNX graph) is prepared into the cache first, or found there.
            name, directory, task = serving_directory(
                model, onnx_file=config.model.onnx_file, precision=config.model.precision,
                device=self.devices[0], cache_dir=config.model.cache_dir,
                task=config.model.task)
            if any(m.name == name for m in self.models):
                raise ModelError(f"two --model are named {name!r}: requests could not tell "
                                 "them apart; serve them from directories of other names")
            self.models.append(self._load(name, directory, task, kind))
        # The CPU's cores are shared by every model's workers.
        cpu_workers = options.workers * len(self.models) if kind == "cpu" else 0
        threads = max(1, available_cores() // max(cpu_workers, 1))
        several = len(self.models) > 1
        number = 0  # the workers in one order, the same in every process of a layout
        for m in self.models:
            for device in self.devices:
                spec = WorkerSpec(
                    options=options, logging=config.logging, hooks=hooks,
                    onnx_path=str(m.onnx_path), device=device, threads=threads, task=m.task,
                    pooling=m.spec.pooling if m.spec else "lasttoken",
                    pad_id=m.encoder.pad_id, hidden_size=m.hidden_size,
                    max_length=m.max_length)
                for i in range(options.workers):
                    m.workers.append(self._worker(
                        m, spec, f"{m.name}:worker-{device}-{i}" if several
                        else f"worker-{device}-{i}", number))
                    number += 1
        self.cores = Cores([m.core for m in self.models], calls=self.calls)
        # The first model's pieces, and the first embedding model's spec, by their old
        # names (one model: the model's).
        first = self.models[0]
        self.core = first.core
        self.encoder = first.encoder
        self.batch_config = first.batch_config
        self.spec: ModelSpec | None = next((m.spec for m in self.models if m.spec), None)
        self.workers: list[WorkerHandle] = [w for m in self.models for w in m.workers]
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.service: EmbedderService | None = None
        self.reranker: RerankerService | None = None
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop it runs on, once started
        self.metrics = Metrics(models=[m.name for m in self.models])
        self.metrics_port: int | None = None  # where /metrics listens, when it does
        self.http: HttpServer | None = None
        self.http_port: int | None = None
        self._http_tls: ssl.SSLContext | None = None
        self._serving: bool | None = None  # None outside normal operation
        self._health_now: dict[str, bool] = {}  # what each health service says
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    @property
    def router(self) -> Router | None:
        """The first model's router (one model: its router)."""
        return self.models[0].router

    def _load(self, name: str, directory: Path, task: str, kind: str) -> ServedModel:
        """A model's tokenizer, core and batch settings (its workers come later)."""
        config = self.config
        keyed = self.security.keys is not None
        max_length = config.model.max_length
        if task == RERANK:
            missing = [f for f in ("tokenizer.json", "config.json")
                       if not (directory / f).is_file()]
            if missing:
                raise ModelError(f"{directory}: missing {', '.join(missing)} (a reranker "
                                 "directory needs model.onnx, tokenizer.json and "
                                 "config.json; `embedrpc prepare` writes them)")
            onnx_path = find_onnx(directory, config.model.onnx_file)
            if max_length is not None and max_length > model_max_length(directory):
                log.warning("--max-length %d is above %s's own limit %d", max_length, name,
                            model_max_length(directory))
            pairs = PairEncoder(directory, max_length=max_length)
            served = ServedModel(
                name=name, task=task, path=directory, onnx_path=onnx_path,
                max_length=pairs.max_length, hidden_size=1, spec=None, encoder=pairs,
                core=RerankCore(name=name, encoder=pairs, limits=config.limits, keyed=keyed,
                                calls=self.calls),
                batch_config=config.batching.for_device(kind, pairs.max_length))
        else:
            spec = load_model_spec(str(directory), onnx_file=config.model.onnx_file,
                                   max_length=max_length, name=name)
            encoder = TextEncoder(spec)
            served = ServedModel(
                name=spec.name, task=task, path=directory, onnx_path=spec.onnx_path,
                max_length=spec.max_length, hidden_size=spec.hidden_size, spec=spec,
                encoder=encoder,
                core=EmbeddingCore(spec=spec, encoder=encoder, limits=config.limits,
                                   keyed=keyed, calls=self.calls),
                batch_config=config.batching.for_device(kind, spec.max_length))
        budget = served.batch_config.max_batch_tokens
        if budget < served.max_length:  # type: ignore[operator]
            raise ModelError(f"--max-batch-tokens {budget} is below max_length "
                             f"{served.max_length}{f' of {name}' if task == RERANK else ''}: "
                             "the longest input would never fit")
        return served

    def _worker(self, m: ServedModel, spec: WorkerSpec, name: str,
                number: int) -> WorkerHandle:
        """A worker process of this server (a WorkerHandle), or with several front ends:
        in the supervisor, one that listens on its socket and merges the front ends'
        batches; in a front end, the connection to it (a RemoteWorker)."""
        on_change = lambda: self._on_worker_change(m)  # noqa: E731
        layout = self.layout
        if layout is None:
            return WorkerHandle(spec, name=name, on_change=on_change)
        path = layout.socket_of(number)
        if layout.role == "frontend":
            return RemoteWorker(spec, name=name, path=path, on_change=on_change)
        b = m.batch_config
        assert b.max_batch_tokens is not None and b.batch_overhead_tokens is not None
        spec = dataclasses.replace(spec, listen=path, merge=(
            b.max_batch_tokens, b.max_batch_size, b.batch_overhead_tokens))
        return WorkerHandle(spec, name=name, on_change=on_change)

    def _on_worker_change(self, model: ServedModel) -> None:
        """A worker of `model` became ready, freed a slot, died or failed (runs on the
        loop)."""
        if model.router is not None:
            model.router.wake()
        if self._serving is None:
            return  # still starting, or shutting down: start() and stop() own health
        # With no live worker, requests wait for a restart: let balancers go elsewhere.
        # Each service is about its own models (a reranker crashing does not take the
        # embedding models out of rotation); the server as a whole ("") about every model.
        now = self._health_by_service()
        changed = {service: up for service, up in now.items()
                   if self._health_now.get(service) != up}
        if not changed:
            return
        self._health_now.update(changed)
        self._serving = now[""]
        for service, up in changed.items():
            log.warning("health%s: %s", f" of {service}" if service else "",
                        "SERVING" if up else "NOT_SERVING")
        self._tasks.add(task := asyncio.get_running_loop().create_task(
            self._set_health_of(changed)))
        task.add_done_callback(self._tasks.discard)

    def _health_by_service(self) -> dict[str, bool]:
        """Whether each health service is serving: the Embedder while every embedding
        model has a live worker, the Reranker likewise for rerankers, "" for all."""
        embed = [m for m in self.models if m.task != RERANK]
        rerank = [m for m in self.models if m.task == RERANK]
        serving = {"": all(m.serving for m in self.models)}
        serving[SERVICE_NAME] = all(m.serving for m in embed) if embed else serving[""]
        if rerank:
            serving[RERANKER_SERVICE_NAME] = all(m.serving for m in rerank)
        return serving

    async def _set_health_of(self, serving: dict[str, bool]) -> None:
        for service, up in serving.items():
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING if up
                                  else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set_health(self, status: int) -> None:
        up = status == health_pb2.HealthCheckResponse.SERVING
        self._health_now = {service: up for service in self._health_by_service()}
        await self._set_health_of(self._health_now)

    def _info(self, m: ServedModel) -> ModelInfo:
        precision = {info_precision(w.info.get("precision", "float32")) for w in m.workers}
        common: dict[str, Any] = dict(
            model=m.name, max_length=m.max_length, precision=",".join(sorted(precision)),
            devices=tuple(self.devices), max_batch_tokens=m.batch_config.max_batch_tokens,
            version=__version__, max_inputs=self.config.limits.max_inputs,
            workers=len(m.workers), task=m.task)
        if isinstance(m.encoder, PairEncoder):
            return ModelInfo(**common, dimensions=0, min_dimensions=0, prompt_names=(),
                             pooling="", pooled_token="", pooled_token_id=0,
                             pooled_token_source="",
                             default_instruction=m.encoder.default_instruction)
        assert m.spec is not None
        return ModelInfo(
            **common, dimensions=m.spec.hidden_size, min_dimensions=m.spec.min_dimensions,
            prompt_names=tuple(sorted(m.spec.prompts)), pooling=m.spec.pooling,
            pooled_token=m.encoder.pooled.token,
            pooled_token_id=max(m.encoder.pooled.id, 0),
            pooled_token_source=m.encoder.pooled.source)

    def _model_of(self, method: str, request: Any) -> str:
        """The model a gRPC call is about (its span, its metrics' model label): the one
        it names or takes by default; "" for none (or one this server does not serve)."""
        if len(self.models) == 1:
            return self.models[0].name  # every call is about the one model
        try:
            if isinstance(request, pb.EmbedRequest | pb.TokenizeRequest):
                return self.cores.embedder(request.model).name
            if isinstance(request, pb.RerankRequest):
                return self.cores.reranker(request.model).name
            if isinstance(request, pb.RerankBatchRequest):
                return self.cores.reranker(
                    request.requests[0].model if request.requests else "").name
            if isinstance(request, pb.InfoRequest):
                return self.cores.named(request.model).name
            if method.endswith("/EmbedStream"):  # its requests' default model
                return self.cores.embedder("").name
        except EmbedError:
            pass
        return ""

    async def start(self) -> int:
        """Start workers, then the gRPC server (NOT_SERVING until warm-up); return the port."""
        try:
            return await self._start()
        except BaseException:
            if self.http is not None:
                await self.http.stop(0)
            await asyncio.to_thread(self.metrics.close)
            raise

    def _log_model(self, m: ServedModel) -> None:
        workers = f"on {','.join(self.devices)} × {self.config.devices.workers} workers"
        if m.spec is None:
            assert isinstance(m.encoder, PairEncoder)
            log.info("model %s (reranker, max_length %d: the model card's pairs, yes/no "
                     "tokens %d/%d) %s", m.name, m.max_length, m.encoder.yes_id,
                     m.encoder.no_id, workers)
            return
        spec = m.spec
        log.info("model %s (%s pooling, %d dimensions, max_length %d) %s", spec.name,
                 spec.pooling, spec.hidden_size, spec.max_length, workers)
        for assumption in spec.assumed:
            log.info("model directory: %s", assumption)
        if spec.pooling == "lasttoken":
            assert isinstance(m.encoder, TextEncoder)
            log.info("pooled token: %s", m.encoder.pooled.describe())
        if not spec.normalize:
            log.warning("the model's sentence-transformers pipeline has no Normalize module; "
                        "vectors are still L2-normalised unless a request sets normalize=false")

    async def _start(self) -> int:
        self.loop = loop = asyncio.get_running_loop()
        cfg = self.config
        for m in self.models:
            if self.layout is None:  # several front ends: the supervisor says it, once
                self._log_model(m)
        # Spawn workers before the gRPC server exists (grpc and fork do not mix).
        ready = [w.start(loop) for w in self.workers]
        for m in self.models:
            m.router = Router(m.workers, m.batch_config, m.hidden_size,
                              metrics=self.metrics.for_model(m.name))
            self.metrics.watch(m.router, m.workers, model=m.name)
        options = [
            ("grpc.max_receive_message_length", cfg.limits.max_message_bytes),
            ("grpc.max_send_message_length", cfg.limits.max_message_bytes),
            # Connections (idle ones too) hold descriptors: past the bound gRPC closes a
            # new one at once, so the HTTP port and the workers' pipes keep theirs; a
            # connection that has not finished its handshake after 10 s is dropped.
            ("grpc.max_allowed_incoming_connections", cfg.network.max_grpc_connections),
            ("grpc.server_handshake_timeout_ms", GRPC_HANDSHAKE_TIMEOUT_MS),
            # A second server on the same port fails loudly; several front ends of one
            # server share it (the kernel spreads connections over them).
            ("grpc.so_reuseport", 1 if self.layout is not None else 0),
        ]
        check_fd_budget(cfg.network.max_grpc_connections,
                        cfg.network.max_http_connections
                        if cfg.network.http_port is not None else None)
        self.server = grpc.aio.server(
            options=options, interceptors=[ObservingInterceptor(self.metrics, self._model_of),
                                           *self.security.interceptors()])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        net = cfg.network
        address = f"{net.host}:{net.port}" if ":" not in net.host else f"[{net.host}]:{net.port}"
        try:
            tls = self.security.tls
            self.port = (self.server.add_secure_port(address, self.security.server_credentials())
                         if tls else self.server.add_insecure_port(address))
        except RuntimeError as exc:
            await self._stop_workers()
            raise ModelError(f"cannot listen on {address}: {exc}") from exc
        await self._start_side_ports()  # now: a busy port should not wait for the warm-up
        if self.on_listening is not None:
            self.on_listening(self.port, self.http_port, self.metrics_port)
        # The services answer from the start: UNAVAILABLE ("still loading") until their
        # model's core opens, and health says NOT_SERVING, so clients and balancers that
        # connect during the warm-up are told, not refused a connection.
        self.service = EmbedderService(self.cores)
        add_embedder_to_server(self.service, self.server)
        self.reranker = RerankerService(self.cores)
        add_reranker_to_server(self.reranker, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, RERANKER_SERVICE_NAME, health.SERVICE_NAME,
             reflection.SERVICE_NAME), self.server)
        await self.server.start()
        try:
            infos = await asyncio.wait_for(asyncio.gather(*ready), cfg.network.startup_timeout_s)
            by_worker = dict(zip(self.workers, infos, strict=True))
            for m in self.models:
                for w in m.workers:
                    info = by_worker[w]
                    if info["hidden_size"] != m.hidden_size:
                        what = "scores" if m.task == RERANK else "vectors"
                        raise ModelError(f"{m.name}: the graph's output has "
                                         f"{info['hidden_size']} dimensions; {m.hidden_size} "
                                         f"expected ({what})")
                    extra = "".join(f", {key}" for key in ("cuda_graphs", "static_shapes")
                                    if info.get(key))
                    log.log(logging.DEBUG if self.layout else logging.INFO,
                            "%s ready (pid %s, %s%s)", w.name, w.pid, info.get("providers"),
                            extra)
        except BaseException:
            await self.server.stop(0)
            await self._stop_workers()
            raise
        for m in self.models:
            assert m.router is not None
            m.core.open(m.router, self._info(m))
            m.router.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._serving = True
        return self.port

    async def _start_side_ports(self) -> None:
        """Prometheus /metrics and the OpenAI-compatible HTTP API, when asked for."""
        cfg, net, sec = self.config, self.config.network, self.config.security
        what = "metrics"
        try:
            if net.metrics_port is not None:
                host = net.metrics_host or net.host
                self.metrics_port = self.metrics.serve(host, net.metrics_port)
                # A front end's own /metrics is for the supervisor, which serves the sum.
                log.log(logging.DEBUG if self.layout else logging.INFO,
                        "metrics on http://%s:%d/metrics", host, self.metrics_port)
            if net.http_port is not None:
                what = "HTTP"
                self.http = HttpServer(cores=self.cores, metrics=self.metrics,
                                       serving=lambda: self._serving is True,
                                       max_body_bytes=cfg.limits.max_message_bytes,
                                       max_connections=net.max_http_connections,
                                       idle_timeout=net.http_idle_seconds,
                                       authorize=keys.authorize_header
                                       if (keys := self.security.keys) else None,
                                       auth_health=cfg.security.auth_health)
                tls = self.security.tls  # HTTPS with the same certificate (and client CAs)
                if tls and sec.tls_cert and sec.tls_key:
                    self._http_tls = tls_context(sec.tls_cert, sec.tls_key, tls.client_ca)
                self.http_port = await self.http.start(net.host, net.http_port,
                                                       tls=self._http_tls,
                                                       reuse_port=self.layout is not None)
                log.log(logging.DEBUG if self.layout else logging.INFO,  # the supervisor's
                        "HTTP (OpenAI-compatible) on %s://%s:%d/v1/embeddings",
                        "https" if tls else "http", net.host, self.http_port)
        except OSError as exc:
            await self._stop_workers()
            raise ModelError(f"cannot listen for {what}: {exc}") from exc

    def reload(self) -> list[str]:
        """Read --api-keys-file and the TLS files again (SIGHUP): new calls and handshakes
        use them, gRPC and HTTP alike. On a problem, ValueError and nothing changes."""
        done = self.security.reload(self.config.security)
        tls, cfg = self.security.tls, self.config.security
        if self._http_tls is not None and tls is not None and cfg.tls_cert and cfg.tls_key:
            # Files just checked by reload(); OpenSSL uses them from the next handshake.
            self._http_tls.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            if tls.client_ca:
                self._http_tls.load_verify_locations(cadata=tls.client_ca.decode("ascii"))
        return done

    async def _stop_workers(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers))

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight calls finish, stop workers."""
        grace = self.config.network.grace_seconds if grace is None else grace
        self._serving = None
        await self.health.enter_graceful_shutdown()
        http_stopping = asyncio.ensure_future(self.http.stop(grace) if self.http else
                                              asyncio.sleep(0))
        if self.server is not None:
            stopping = asyncio.ensure_future(self.server.stop(grace))
            # Calls in flight finish within the grace period; once none is left, streams
            # that never end by themselves (health watchers, idle EmbedStreams) are closed
            # instead of holding the process for the whole grace period.
            while not stopping.done() and self.calls.active:
                await asyncio.wait([stopping], timeout=0.05)
            if not stopping.done():  # let the last responses leave first
                await asyncio.wait([stopping], timeout=0.5)
            if not stopping.done():
                await self.server.stop(0)
            await stopping
        await http_stopping
        for m in self.models:
            if m.router is not None:
                await m.router.close()
        await asyncio.gather(self._stop_workers(), asyncio.to_thread(self.metrics.close))


def reload_logged(server: EmbedServer) -> None:
    """SIGHUP: reload() and say what came of it in the log."""
    try:
        done = server.reload()
    except ValueError as exc:
        log.error("SIGHUP: nothing reloaded, the current keys and certificates stay: %s", exc)
        return
    log.info("SIGHUP: reloaded %s", ", ".join(done) if done else "nothing (no "
             "--api-keys-file and no TLS files to read again)")


def raise_fd_limit() -> None:
    """Raise the soft limit on open files to the hard one: every connection, worker pipe
    and model file takes a descriptor, and a default soft limit of 1024 is reached by
    connections alone long before the machine's own limits."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open files: soft limit raised from %d to %d", soft, target)
        except (ValueError, OSError) as exc:
            log.warning("open files: soft limit stays %d (%s)", soft, exc)


# Descriptors the server needs beside its connections: worker pipes, model files, logs,
# the metrics port, front ends' sockets.
FD_RESERVE = 256


def check_fd_budget(max_grpc: int, max_http: int | None) -> None:
    """Warn when the connection bounds could use more descriptors than the process may
    open: past that, new connections, worker pipes and files all fail alike."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_grpc + (max_http or 0) + FD_RESERVE
    if soft != resource.RLIM_INFINITY and need > soft:
        log.warning("open files: the limit is %d, below what --max-grpc-connections %d%s "
                    "may take with %d to spare for workers and files; raise `ulimit -n` or "
                    "lower the bounds", soft, max_grpc,
                    f" and --max-http-connections {max_http}" if max_http else "",
                    FD_RESERVE)


def stop_on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, grace: float,
                    at_once: Any = lambda: None) -> None:
    """SIGTERM or SIGINT sets `stop` (the caller drains, within `grace` seconds); a second
    one calls `at_once` (kill what must not outlive the process) and exits with code 1."""
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: stopping now")
            at_once()
            os._exit(1)
        log.info("%s: shutting down (grace %.0fs)", signal.Signals(signum).name, grace)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
