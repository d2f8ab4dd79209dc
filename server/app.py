"""Assemble the server and run its lifecycle: model → workers → router → front ends
(gRPC: Embedder, health, reflection; the OpenAI-compatible HTTP routes; /metrics).

`start()` spawns the workers, opens the ports (health NOT_SERVING) and turns SERVING
once every worker answered its warm-up; `stop()` drains. Options: server/config.py;
signals: server/signals.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embedrpc import __version__
from embedrpc.v1 import embedder_pb2 as pb

from .checkpoints import serving_directory
from .config import DebugHooks, ServeConfig
from .core import EmbeddingCore, ModelInfo
from .devices import available_cores, resolve_devices
from .errors import ModelError
from .frontends.grpc_observing import ObservingInterceptor
from .frontends.grpc_service import EmbedderService, add_embedder_to_server
from .frontends.http import HttpServer, tls_context
from .metrics import Metrics
from .model import ModelSpec, load_model_spec
from .router import Router
from .security import ServerSecurity
from .tokenizer import TextEncoder
from .worker.handle import WorkerHandle
from .worker.spec import WorkerSpec

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Embedder"].full_name


class EmbedServer:
    """The whole server in one object: `await start()`, then `await stop()`."""

    def __init__(self, config: ServeConfig, *, hooks: DebugHooks | None = None) -> None:
        """hooks: test-only fault injection and paths (no flags)."""
        self.config = config
        hooks = hooks or DebugHooks()
        options = config.devices
        # Read and check the key and certificate files first.
        self.security = ServerSecurity.from_config(config.security, host=config.network.host)
        self.devices = resolve_devices(options.device) if options.backend == "onnx" \
            else ["cpu"]
        # A checkpoint (no ONNX graph) is prepared into the cache first, or found there.
        name, directory = serving_directory(
            config.model.model, onnx_file=config.model.onnx_file,
            precision=config.model.precision, device=self.devices[0],
            cache_dir=config.model.cache_dir)
        self.spec: ModelSpec = load_model_spec(str(directory), onnx_file=config.model.onnx_file,
                                               max_length=config.model.max_length, name=name)
        self.encoder = TextEncoder(self.spec)
        # Serves both front ends; UNAVAILABLE ("still loading") until the warm-up is done.
        self.core = EmbeddingCore(spec=self.spec, encoder=self.encoder, limits=config.limits,
                                  keyed=self.security.keys is not None)
        kind = "cuda" if self.devices[0].startswith("cuda") else "cpu"
        self.batch_config = config.batching.for_device(kind, self.spec.max_length)
        if self.batch_config.max_batch_tokens < self.spec.max_length:  # type: ignore[operator]
            raise ModelError(f"--max-batch-tokens {self.batch_config.max_batch_tokens} is "
                             f"below max_length {self.spec.max_length}: the longest input "
                             "would never fit")
        if options.cuda_graphs and options.backend == "onnx" and kind == "cpu":
            if options.device != "auto":
                raise ModelError(f"--cuda-graphs needs a CUDA device, not --device "
                                 f"{options.device}")
            log.warning("--cuda-graphs: no GPU, so no CUDA graphs")
            options = dataclasses.replace(options, cuda_graphs=False)
        cpu_workers = options.workers if kind == "cpu" else 0
        threads = max(1, available_cores() // max(cpu_workers, 1))
        self.workers: list[WorkerHandle] = []
        for device in self.devices:
            spec = WorkerSpec(
                options=options, logging=config.logging, hooks=hooks,
                onnx_path=str(self.spec.onnx_path), device=device, threads=threads,
                pooling=self.spec.pooling, pad_id=self.encoder.pad_id,
                hidden_size=self.spec.hidden_size, max_length=self.spec.max_length)
            for i in range(options.workers):
                self.workers.append(WorkerHandle(spec, name=f"worker-{device}-{i}",
                                                 on_change=self._on_worker_change))
        self.router: Router | None = None
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.service: EmbedderService | None = None
        self.port = 0
        self.metrics = Metrics(model=self.spec.name)
        self.metrics_port: int | None = None  # where /metrics listens, when it does
        self.http: HttpServer | None = None
        self.http_port: int | None = None
        self._http_tls: ssl.SSLContext | None = None
        self._serving: bool | None = None  # None outside normal operation
        self._tasks: set[asyncio.Task[None]] = set()

    def _on_worker_change(self) -> None:
        """A worker became ready, freed a slot, died or failed (runs on the loop)."""
        if self.router is not None:
            self.router.wake()
        if self._serving is None:
            return  # still starting, or shutting down: start() and stop() own health
        serving = any(w.alive for w in self.workers)
        if serving != self._serving:
            # With no live worker, requests wait for a restart: let balancers go elsewhere.
            self._serving = serving
            status = (health_pb2.HealthCheckResponse.SERVING if serving
                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            log.warning("health: %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status))
            self._tasks.add(task := asyncio.get_running_loop().create_task(
                self._set_health(status)))
            task.add_done_callback(self._tasks.discard)

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    def _info(self) -> ModelInfo:
        precision = {w.info.get("precision", "float32") for w in self.workers}
        return ModelInfo(
            model=self.spec.name, dimensions=self.spec.hidden_size,
            min_dimensions=self.spec.min_dimensions, max_length=self.spec.max_length,
            prompt_names=tuple(sorted(self.spec.prompts)), pooling=self.spec.pooling,
            precision=",".join(sorted(precision)), devices=tuple(self.devices),
            max_batch_tokens=self.batch_config.max_batch_tokens, version=__version__,
            max_inputs=self.config.limits.max_inputs, workers=len(self.workers),
            pooled_token=self.encoder.pooled.token,
            pooled_token_id=max(self.encoder.pooled.id, 0),
            pooled_token_source=self.encoder.pooled.source,
        )

    async def start(self) -> int:
        """Start workers, then the gRPC server (NOT_SERVING until warm-up); return the port."""
        try:
            return await self._start()
        except BaseException:
            if self.http is not None:
                await self.http.stop(0)
            await asyncio.to_thread(self.metrics.close)
            raise

    async def _start(self) -> int:
        loop = asyncio.get_running_loop()
        cfg = self.config
        log.info("model %s (%s pooling, %d dimensions, max_length %d) on %s × %d workers",
                 self.spec.name, self.spec.pooling, self.spec.hidden_size,
                 self.spec.max_length, ",".join(self.devices), cfg.devices.workers)
        for assumption in self.spec.assumed:
            log.info("model directory: %s", assumption)
        if self.spec.pooling == "lasttoken":
            log.info("pooled token: %s", self.encoder.pooled.describe())
        if not self.spec.normalize:
            log.warning("the model's sentence-transformers pipeline has no Normalize module; "
                        "vectors are still L2-normalised unless a request sets normalize=false")
        # Spawn workers before the gRPC server exists (grpc and fork do not mix).
        ready = [w.start(loop) for w in self.workers]
        self.router = Router(self.workers, self.batch_config, self.spec.hidden_size,
                             metrics=self.metrics)
        self.metrics.watch(self.router, self.workers)
        options = [
            ("grpc.max_receive_message_length", cfg.limits.max_message_bytes),
            ("grpc.max_send_message_length", cfg.limits.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on the same port fails loudly
        ]
        self.server = grpc.aio.server(
            options=options, interceptors=[ObservingInterceptor(self.metrics, self.spec.name),
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
        try:
            infos = await asyncio.wait_for(asyncio.gather(*ready), cfg.network.startup_timeout_s)
        except BaseException:
            await self._stop_workers()
            raise
        for w, info in zip(self.workers, infos, strict=True):
            if info["hidden_size"] != self.spec.hidden_size:
                await self._stop_workers()
                raise ModelError(f"the graph's output has {info['hidden_size']} dimensions; "
                                 f"config says {self.spec.hidden_size}")
            extra = "".join(f", {key}" for key in ("cuda_graphs", "static_shapes")
                            if info.get(key))
            log.info("%s ready (pid %s, %s%s)", w.name, w.pid, info.get("providers"), extra)
        self.core.open(self.router, self._info())
        self.service = service = EmbedderService(self.core)
        add_embedder_to_server(service, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.router.start()
        await self.server.start()
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
                log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)
            if net.http_port is not None:
                what = "HTTP"
                self.http = HttpServer(core=self.core, model=self.spec.name,
                                       metrics=self.metrics,
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
                                                       tls=self._http_tls)
                log.info("HTTP (OpenAI-compatible) on %s://%s:%d/v1/embeddings",
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
            while not stopping.done() and self.core.active:
                await asyncio.wait([stopping], timeout=0.05)
            if not stopping.done():  # let the last responses leave first
                await asyncio.wait([stopping], timeout=0.5)
            if not stopping.done():
                await self.server.stop(0)
            await stopping
        await http_stopping
        if self.router is not None:
            await self.router.close()
        await asyncio.gather(self._stop_workers(), asyncio.to_thread(self.metrics.close))


