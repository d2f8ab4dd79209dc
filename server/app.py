"""Assemble and run the server: model → workers → router → gRPC (Embedder, health, reflection)."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import ssl
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embedrpc import __version__
from embedrpc.v1 import embedder_pb2 as pb

from .checkpoints import PRECISIONS, serving_directory
from .errors import ModelError
from .http import HttpServer, tls_context
from .logs import LOG_FORMATS
from .metrics import Metrics, ObservingInterceptor
from .model import ModelSpec, load_model_spec
from .router import BatchConfig, Router
from .security import ServerSecurity
from .service import EmbedderService, ServiceLimits, add_embedder_to_server
from .tokenizer import TextEncoder
from .worker import WorkerSpec, attention_kernel_mask
from .workers import WorkerHandle

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Embedder"].full_name
# Default token budgets per batch: CPUs gain nothing from huge batches, GPUs do.
DEFAULT_BATCH_TOKENS = {"cpu": 8192, "cuda": 32768}
# A batch's fixed cost in tokens: a CPU run costs little beyond its tokens; a GPU
# run has kernel launches and copies worth many tokens.
DEFAULT_BATCH_OVERHEAD = {"cpu": 64, "cuda": 2048}


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    model: str = "demo"
    onnx_file: str | None = None
    # Checkpoints (safetensors, no ONNX graph): the precision they are prepared in
    # (auto: fp16 on GPUs, fp32 on CPUs) and where prepared graphs are kept.
    precision: str = "auto"
    cache_dir: str | None = None  # None: $XDG_CACHE_HOME/embedrpc or ~/.cache/embedrpc
    device: str = "auto"
    workers: int = 1  # per device
    host: str = "0.0.0.0"
    port: int = 50051
    max_length: int | None = None
    max_batch_tokens: int | None = None  # None: by device
    max_batch_size: int = 64
    max_wait_ms: float = 0.0
    batch_overhead_tokens: int | None = None  # None: by device
    max_queue_tokens: int | None = None  # None: 64 batches' worth
    max_inputs: int = 2048
    max_message_bytes: int = 64 << 20
    grace_seconds: float = 10.0
    backend: str = "onnx"  # "fake": deterministic vectors, no model run (tests)
    cuda_graphs: bool = False  # capture short batches as CUDA graphs (prepared models)
    cuda_graph_max_tokens: int = 4096  # padded tokens of the largest batch captured
    attention_kernel: str = "auto"  # CUDA: attention kernels ONNX Runtime may use (sdpa_kernel)
    static_shapes: bool = False  # tests: the bucketed path of cuda_graphs, on any device
    fake_delay_ms: float = 0.0  # fake backend: simulated compute per batch
    fake_crash_token: int = -1  # fake backend: a batch with this token id kills its worker
    fake_crash_mode: str = "kill"  # kill | segv | exit
    startup_timeout_s: float = 600.0
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (worker processes log the same way)
    metrics_port: int | None = None  # Prometheus /metrics; None: off, 0: any free port
    metrics_host: str | None = None  # None: same as host
    http_port: int | None = None  # OpenAI-compatible HTTP; None: off, 0: any free port
    tls_cert: str | None = None  # PEM; with tls_key, the port speaks TLS only
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM; mutual TLS: clients need a cert signed by it
    api_keys: tuple[str, ...] = ()  # calls need `authorization: Bearer <key>`
    api_keys_file: str | None = None  # one key per line, '#' comments
    auth_health: bool = False  # health needs a key too (default: open for probes)
    auth_reflection: bool = False

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.max_inputs < 1:
            raise ValueError("--max-inputs must be at least 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: use one of "
                             f"{', '.join(PRECISIONS)}")
        if self.cuda_graph_max_tokens < 8:
            raise ValueError("--cuda-graph-max-tokens must be at least 8")
        try:
            attention_kernel_mask(self.attention_kernel)
        except ValueError as exc:
            raise ValueError(f"--attention-kernel: {exc}") from None
        if self.backend not in ("onnx", "fake"):
            raise ValueError("backend must be 'onnx' or 'fake'")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        for name in ("metrics_port", "http_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"--{name.replace('_', '-')} {port} is not a port (0..65535)")


def cuda_device_count() -> int:
    """GPUs the CUDA driver sees (0 without a driver), without importing a framework."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0:
            return count.value
        return 0
    return 0


def resolve_devices(device: str) -> list[str]:
    """`cpu`, `cuda`, `cuda:0,1`, or `auto` → ["cpu"] or ["cuda:0", ...]."""
    device = device.strip().lower()
    if device == "cpu":
        return ["cpu"]
    if device in ("auto", "cuda"):
        import onnxruntime as ort

        gpus = cuda_device_count() if "CUDAExecutionProvider" in \
            ort.get_available_providers() else 0
        if gpus:
            return [f"cuda:{i}" for i in range(gpus)]
        if device == "cuda":
            raise ModelError("--device cuda: no GPU usable by ONNX Runtime (needs "
                             "onnxruntime-gpu and a CUDA driver); use --device cpu")
        log.warning("--device auto: no GPU found, running on CPU")
        return ["cpu"]
    if device.startswith("cuda:"):
        try:
            ids = [int(x) for x in device[5:].split(",") if x.strip()]
        except ValueError:
            ids = []
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
            raise ModelError(f"--device {device!r}: use cuda:N or cuda:N,M,... (distinct ids)")
        return [f"cuda:{i}" for i in ids]
    raise ModelError(f"--device {device!r}: use cpu, auto, cuda, or cuda:0,1,...")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class EmbedServer:
    """The whole server in one object: `await start()`, then `await stop()`."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.security = ServerSecurity.from_config(config)  # read and check files first
        self.devices = resolve_devices(config.device) if config.backend == "onnx" else ["cpu"]
        # A checkpoint (no ONNX graph) is prepared into the cache first, or found there.
        name, directory = serving_directory(
            config.model, onnx_file=config.onnx_file, precision=config.precision,
            device=self.devices[0], cache_dir=config.cache_dir)
        self.spec: ModelSpec = load_model_spec(str(directory), onnx_file=config.onnx_file,
                                               max_length=config.max_length, name=name)
        self.encoder = TextEncoder(self.spec)
        kind = "cuda" if self.devices[0].startswith("cuda") else "cpu"
        budget = config.max_batch_tokens or max(DEFAULT_BATCH_TOKENS[kind], self.spec.max_length)
        if budget < self.spec.max_length:
            raise ModelError(f"--max-batch-tokens {budget} is below max_length "
                             f"{self.spec.max_length}: the longest input would never fit")
        self.batch_config = BatchConfig(
            max_batch_tokens=budget,
            max_batch_size=config.max_batch_size,
            max_wait_ms=config.max_wait_ms,
            max_queue_tokens=config.max_queue_tokens or 64 * budget,
            batch_overhead_tokens=(DEFAULT_BATCH_OVERHEAD[kind]
                                   if config.batch_overhead_tokens is None
                                   else config.batch_overhead_tokens),
        )
        cuda_graphs = config.cuda_graphs and config.backend == "onnx"
        if cuda_graphs and kind == "cpu":
            if config.device != "auto":
                raise ModelError(f"--cuda-graphs needs a CUDA device, not --device "
                                 f"{config.device}")
            log.warning("--cuda-graphs: no GPU, so no CUDA graphs")
            cuda_graphs = False
        cpu_workers = config.workers if kind == "cpu" else 0
        threads = max(1, available_cores() // max(cpu_workers, 1))
        self.workers: list[WorkerHandle] = []
        for device in self.devices:
            spec = WorkerSpec(
                backend=config.backend, onnx_path=str(self.spec.onnx_path), device=device,
                threads=threads, pooling=self.spec.pooling, pad_id=self.encoder.pad_id,
                hidden_size=self.spec.hidden_size, fake_delay_ms=config.fake_delay_ms,
                fake_crash_token=config.fake_crash_token, fake_crash_mode=config.fake_crash_mode,
                log_level=config.log_level, log_format=config.log_format,
                cuda_graphs=cuda_graphs, static_shapes=config.static_shapes,
                graph_max_tokens=config.cuda_graph_max_tokens, max_length=self.spec.max_length,
                attention_kernel=config.attention_kernel,
            )
            for i in range(config.workers):
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

    def _info(self) -> pb.InfoResponse:
        precision = {w.info.get("precision", "float32") for w in self.workers}
        return pb.InfoResponse(
            model=self.spec.name, dimensions=self.spec.hidden_size,
            min_dimensions=self.spec.min_dimensions, max_length=self.spec.max_length,
            prompt_names=sorted(self.spec.prompts), pooling=self.spec.pooling,
            precision=",".join(sorted(precision)), devices=self.devices,
            max_batch_tokens=self.batch_config.max_batch_tokens, version=__version__,
            max_inputs=self.config.max_inputs, workers=len(self.workers),
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
                 self.spec.max_length, ",".join(self.devices), cfg.workers)
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
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on the same port fails loudly
        ]
        self.server = grpc.aio.server(
            options=options, interceptors=[ObservingInterceptor(self.metrics, self.spec.name),
                                           *self.security.interceptors()])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{cfg.host}:{cfg.port}" if ":" not in cfg.host else f"[{cfg.host}]:{cfg.port}"
        try:
            tls = self.security.tls
            self.port = (self.server.add_secure_port(address, self.security.server_credentials())
                         if tls else self.server.add_insecure_port(address))
        except RuntimeError as exc:
            await self._stop_workers()
            raise ModelError(f"cannot listen on {address}: {exc}") from exc
        await self._start_side_ports()  # now: a busy port should not wait for the warm-up
        try:
            infos = await asyncio.wait_for(asyncio.gather(*ready), cfg.startup_timeout_s)
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
        self.service = service = EmbedderService(
            spec=self.spec, encoder=self.encoder, router=self.router,
            limits=ServiceLimits(max_inputs=cfg.max_inputs,
                                 max_message_bytes=cfg.max_message_bytes),
            info=self._info())
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
        cfg = self.config
        what = "metrics"
        try:
            if cfg.metrics_port is not None:
                host = cfg.metrics_host or cfg.host
                self.metrics_port = self.metrics.serve(host, cfg.metrics_port)
                log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)
            if cfg.http_port is not None:
                what = "HTTP"
                self.http = HttpServer(service=lambda: self.service, model=self.spec.name,
                                       metrics=self.metrics,
                                       serving=lambda: self._serving is True,
                                       max_body_bytes=cfg.max_message_bytes,
                                       authorize=keys.authorize_header
                                       if (keys := self.security.keys) else None,
                                       auth_health=cfg.auth_health)
                tls = self.security.tls  # HTTPS with the same certificate (and client CAs)
                if tls and cfg.tls_cert and cfg.tls_key:
                    self._http_tls = tls_context(cfg.tls_cert, cfg.tls_key, tls.client_ca)
                self.http_port = await self.http.start(cfg.host, cfg.http_port,
                                                       tls=self._http_tls)
                log.info("HTTP (OpenAI-compatible) on %s://%s:%d/v1/embeddings",
                         "https" if tls else "http", cfg.host, self.http_port)
        except OSError as exc:
            await self._stop_workers()
            raise ModelError(f"cannot listen for {what}: {exc}") from exc

    def reload(self) -> list[str]:
        """Read --api-keys-file and the TLS files again (SIGHUP): new calls and handshakes
        use them, gRPC and HTTP alike. On a problem, ValueError and nothing changes."""
        done = self.security.reload(self.config)
        tls, cfg = self.security.tls, self.config
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
        grace = self.config.grace_seconds if grace is None else grace
        self._serving = None
        await self.health.enter_graceful_shutdown()
        http_stopping = asyncio.ensure_future(self.http.stop(grace) if self.http else
                                              asyncio.sleep(0))
        if self.server is not None:
            stopping = asyncio.ensure_future(self.server.stop(grace))
            # Calls in flight finish within the grace period; once none is left, streams
            # that never end by themselves (health watchers, idle EmbedStreams) are closed
            # instead of holding the process for the whole grace period.
            while not stopping.done() and self.service is not None and self.service.active:
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


def _reload(server: EmbedServer) -> None:
    try:
        done = server.reload()
    except ValueError as exc:
        log.error("SIGHUP: nothing reloaded, the current keys and certificates stay: %s", exc)
        return
    log.info("SIGHUP: reloaded %s", ", ".join(done) if done else "nothing (no "
             "--api-keys-file and no TLS files to read again)")


async def serve(config: ServeConfig) -> None:
    """Run until SIGTERM or SIGINT; a second signal stops at once."""
    server = EmbedServer(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: stopping now")
            os._exit(1)
        log.info("%s: shutting down (grace %.0fs)", signal.Signals(signum).name,
                 config.grace_seconds)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, _reload, server)
    port = await server.start()
    log.info("embedrpc %s serving %s on %s:%d (%s)", __version__, server.spec.name,
             config.host, port, server.security.describe())
    await stop.wait()
    await server.stop()
    log.info("stopped")
