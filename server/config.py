"""Serve options, each defined once: here.

Every option is a field of one of the frozen dataclasses below, grouped by where it
goes (the model loader, the device workers, the router, the request limits, the
listening sockets, security, logging). A field's metadata holds its help text and,
where the type does not say it, its choices and how to parse it. From these fields
alone come the `embedrpc serve` flags (`--max-batch-tokens`), the environment
variables (`EMBEDRPC_MAX_BATCH_TOKENS`) and the `--config` file keys
(`max-batch-tokens = 16384`): embedrpc.cli.options.add_config_options reads them,
and tests/test_config.py checks that docs/configuration.md's flag table lists the same flags.

Knobs that exist only for tests (fault injection, the bucketed path without a GPU)
are in DebugHooks, which has no flags and is not part of ServeConfig.

This module imports nothing heavy: the CLI reads it before anything else loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any

from .logs import LOG_FORMATS
from .tasks import TASK_CHOICES

PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
BACKENDS = ("onnx", "fake")
# ONNX Runtime's CUDA provider option `sdpa_kernel`: a bitmask of the attention kernels
# it may use (AttentionBackend in onnxruntime's attention_common.h); 0 lets it choose.
ATTENTION_KERNELS = {"auto": 0, "flash": 1, "efficient": 2, "cudnn": 8, "math": 16}
# Default token budgets per batch: CPUs gain nothing from huge batches, GPUs do.
DEFAULT_BATCH_TOKENS = {"cpu": 8192, "cuda": 32768}
# A batch's fixed cost in tokens: a CPU run costs little beyond its tokens; a GPU
# run has kernel launches and copies worth many tokens.
DEFAULT_BATCH_OVERHEAD = {"cpu": 64, "cuda": 2048}
QUEUE_BATCHES = 64  # --max-queue-tokens by default: this many full batches
# Models one server serves at most (--model given several times): each has its own
# workers on every device, so this also bounds the processes and the device memory.
MAX_MODELS = 8
# Front-end processes at most (--frontends): each holds every model's tokenizer and a
# connection to every device worker.
MAX_FRONTENDS = 64


def option(default: Any = MISSING, *, help: str, default_factory: Any = MISSING,
           choices: tuple[str, ...] | None = None, shown: str | None = None,
           flag: str | None = None, secret: bool = False, cli: bool = True) -> Any:
    """A config field with what the command line needs to know about it.

    shown: the default as --help and docs/configuration.md say it, where the value alone does not
    (None meaning "chosen by device"); flag: the flag's name when it is not the field's;
    secret: never echoed (API keys); cli: False for fields that are not options."""
    metadata = {"help": help, "choices": choices, "shown": shown, "flag": flag,
                "secret": secret, "cli": cli}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def attention_kernel_mask(names: str) -> int:
    """"auto", or kernel names joined by commas ("flash,efficient") → the `sdpa_kernel`
    bitmask of ONNX Runtime's CUDA provider. ValueError for an unknown name."""
    mask = 0
    for name in (n.strip().lower() for n in names.split(",")):
        if name not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel {name!r}: use auto, or one or more of "
                             f"{', '.join(k for k in ATTENTION_KERNELS if k != 'auto')} "
                             "joined by commas")
        mask |= ATTENTION_KERNELS[name]
    return mask


def _at_least(owner: Any, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {minimum:g}")


def _port(owner: Any, *names: str) -> None:
    for name in names:
        port = getattr(owner, name)
        if port is not None and not 0 <= port <= 65535:
            raise ValueError(f"--{name.replace('_', '-')} {port} is not a port (0..65535)")


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """What to serve and how to load it (server/model.py, server/checkpoints.py)."""

    model: tuple[str, ...] = option(
        default_factory=lambda: ("demo",), shown="demo",
        help="'demo' (bundled tiny embedding model), 'demo-reranker' (bundled tiny "
        "Qwen3-Reranker), a model directory (ONNX export or Hugging Face checkpoint), or a "
        "Hugging Face id; repeat or comma-separate to serve several models (e.g. an "
        f"embedding model and a reranker; at most {MAX_MODELS}), each with its own workers")
    task: str = option("auto", choices=TASK_CHOICES, help="what --model is: embed "
                       "(vectors), rerank (Qwen3-Reranker scores), or auto (a prepared "
                       "directory says; sentence-transformers files or an embedding graph "
                       "mean embed; a 'score' graph, or 'reranker' in the directory name or "
                       "hub id, mean rerank); with several --model, applies to each")
    onnx_file: str | None = option(None, shown="model.onnx", help="ONNX file name in the "
                                   "model directory (at the top or under onnx/)")
    precision: str = option("auto", choices=PRECISIONS, help="for a checkpoint (safetensors, "
                            "no ONNX graph): the precision it is prepared in on first start "
                            "(auto: fp16 on a GPU, fp32 on the CPU); ignored for ONNX "
                            "directories")
    cache_dir: str | None = option(None, shown="~/.cache/embedrpc", help="where prepared "
                                   "checkpoints are kept and found again "
                                   "($XDG_CACHE_HOME/embedrpc when that is set)")
    max_length: int | None = option(None, shown="the model's limit, at most 8192",
                                    help="longest input in tokens")

    def __post_init__(self) -> None:
        models = self.model
        if isinstance(models, str):  # ServeConfig.of(model="demo"), as before lists
            models = tuple(part.strip() for part in models.split(","))
        object.__setattr__(self, "model", tuple(models))
        if not self.model or any(not m for m in self.model):
            raise ValueError("--model: give a model (demo, a directory or a Hugging Face "
                             "id); an empty name is not one")
        if len(self.model) > MAX_MODELS:
            raise ValueError(f"--model given {len(self.model)} times; one server serves at "
                             f"most {MAX_MODELS} models")
        if len(set(self.model)) != len(self.model):
            twice = sorted({m for m in self.model if self.model.count(m) > 1})
            raise ValueError(f"--model {', '.join(twice)} given more than once")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: use one of "
                             f"{', '.join(PRECISIONS)}")
        if self.task not in TASK_CHOICES:
            raise ValueError(f"--task {self.task!r}: use one of {', '.join(TASK_CHOICES)}")
        _at_least(self, 2, "max_length")


@dataclass(frozen=True, kw_only=True)
class DeviceOptions:
    """Where and how the model runs: the device worker processes."""

    device: str = option("auto", help="cpu, auto (every GPU ONNX Runtime can use, else the "
                         "CPU), cuda, or cuda:0,1,...")
    workers: int = option(1, help="worker processes per device")
    backend: str = option("onnx", choices=BACKENDS, help="'fake' returns deterministic "
                          "vectors without running the model (for testing clients and load "
                          "balancers)")
    fake_delay_ms: float = option(0.0, help="with --backend fake: simulated inference time "
                                  "per batch")
    cuda_graphs: bool = option(False, help="replay short batches as CUDA graphs: batches are "
                               "padded up to (rows, length) buckets, each captured once and "
                               "checked against the ordinary path. Needs a prepared model "
                               "(embedrpc prepare) and a CUDA device")
    cuda_graph_max_tokens: int = option(4096, help="with --cuda-graphs: batches of up to this "
                                        "many padded tokens are replayed; larger ones run "
                                        "with their exact shape")
    attention_kernel: str = option("auto", help="CUDA: the attention kernels ONNX Runtime may "
                                   "use (its sdpa_kernel option): auto (its choice), or "
                                   "flash, efficient, cudnn, math, several joined by commas")
    worker_stall_seconds: float = option(60.0, help="a worker that answers no batch for this "
                                         "long, plus ten times its measured time per token "
                                         "of the batch, is killed and restarted (its batch is "
                                         "retried)")

    def __post_init__(self) -> None:
        _at_least(self, 1, "workers")
        _at_least(self, 8, "cuda_graph_max_tokens")
        _at_least(self, 0, "fake_delay_ms")
        _at_least(self, 0.1, "worker_stall_seconds")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}")
        try:
            attention_kernel_mask(self.attention_kernel)
        except ValueError as exc:
            raise ValueError(f"--attention-kernel: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """How the router cuts batches (server/router.py). None: chosen by device, filled in by
    `for_device` before the router gets it."""

    max_batch_tokens: int | None = option(None, shown="8192 CPU, 32768 GPU (≥ max length)",
                                          help="padded tokens per batch")
    max_batch_size: int = option(64, help="texts per batch")
    busy_wait_ms: float = option(1.0, help="while requests overlap (one came within this "
                                 "long of another client's, or while its own client's "
                                 "earlier ones were under way), a thin batch waits up to "
                                 "this long for company; a client alone, one request at a "
                                 "time, never waits (0: off)")
    max_wait_ms: float = option(0.0, help="wait up to this long for a fuller batch while "
                                "workers are idle")
    # The fixed cost of running one batch, in tokens' worth of compute. A length-sorted
    # window is split where the padding a longer text would add to the rows before it
    # costs more than starting another batch (0: split at every length change).
    batch_overhead_tokens: int | None = option(
        None, shown="64 CPU, 2048 GPU", help="a batch's fixed cost in tokens: length-sorted "
        "texts start another batch where the padding they add would cost more")
    max_queue_tokens: int | None = option(None, shown=f"{QUEUE_BATCHES} batches",
                                          help="queued tokens (per front end with "
                                          "--frontends) beyond which requests get "
                                          "RESOURCE_EXHAUSTED (a client with nothing queued "
                                          "still gets one request in while fewer than "
                                          "twice this are queued); a request of more "
                                          "tokens than this gets INVALID_ARGUMENT")
    max_client_queue_tokens: int | None = option(
        None, shown="half of --max-queue-tokens", help="queued tokens one client (an API "
        "key, else a connection) may have; beyond, its requests get RESOURCE_EXHAUSTED")

    def __post_init__(self) -> None:
        _at_least(self, 1, "max_batch_tokens", "max_batch_size", "max_queue_tokens",
                  "max_client_queue_tokens")
        _at_least(self, 0, "max_wait_ms", "busy_wait_ms", "batch_overhead_tokens")

    def for_device(self, kind: str, max_length: int) -> BatchConfig:
        """Every None replaced by the default for `kind` ("cpu" or "cuda")."""
        budget = self.max_batch_tokens or max(DEFAULT_BATCH_TOKENS[kind], max_length)
        queue = self.max_queue_tokens or QUEUE_BATCHES * budget
        return dataclasses.replace(
            self, max_batch_tokens=budget,
            batch_overhead_tokens=(DEFAULT_BATCH_OVERHEAD[kind]
                                   if self.batch_overhead_tokens is None
                                   else self.batch_overhead_tokens),
            max_queue_tokens=queue,
            max_client_queue_tokens=self.max_client_queue_tokens or max(1, queue // 2))


@dataclass(frozen=True, kw_only=True)
class ServiceLimits:
    """Bounds on one request (the embedding core and both front ends)."""

    max_inputs: int = option(2048, help="texts per request")
    max_message_bytes: int = option(64 << 20, shown="64 MiB", help="largest gRPC message "
                                    "received or sent (and HTTP request body)")
    stream_window: int = option(64, cli=False, help="requests of one EmbedStream processed "
                                "at once")

    def __post_init__(self) -> None:
        _at_least(self, 1, "max_inputs", "max_message_bytes", "stream_window")


@dataclass(frozen=True, kw_only=True)
class NetworkOptions:
    """Where the server listens, and how it stops."""

    host: str = option("0.0.0.0", help="address to listen on")
    port: int = option(50051, help="gRPC port (0: any free port, logged)")
    http_port: int | None = option(None, shown="off", help="serve the OpenAI-compatible "
                                   "HTTP API (POST /v1/embeddings, POST /v1/rerank, GET "
                                   "/v1/models, GET /health) on this port (0: any free "
                                   "port, logged)")
    metrics_port: int | None = option(None, shown="off", help="serve Prometheus metrics at "
                                      "/metrics on this port (0: any free port, logged)")
    metrics_host: str | None = option(None, shown="--host", help="address for "
                                      "--metrics-port")
    grace_seconds: float = option(10.0, help="on SIGTERM/SIGINT, time for in-flight calls "
                                  "to finish")
    max_grpc_connections: int = option(4096, help="gRPC connections open at once (idle ones "
                                       "included; per front end with --frontends); beyond "
                                       "it a new connection is closed at once (the client "
                                       "sees UNAVAILABLE and retries). Keep it well below "
                                       "the process's file descriptor limit (ulimit -n)")
    max_http_connections: int = option(512, help="HTTP connections open at once (idle "
                                       "keep-alive ones included; per front end with "
                                       "--frontends); beyond it a new connection "
                                       "is closed at once. Keep it well below the process's "
                                       "file descriptor limit (ulimit -n)")
    http_idle_seconds: float = option(75.0, help="an HTTP connection with no request under "
                                      "way is closed after this long")
    frontends: int | None = option(None, shown="auto: 1 on the CPU, min(8, cores / 4) "
                                   "with GPUs", help="front-end processes: each serves gRPC "
                                   "(and HTTP) on the same port (SO_REUSEPORT), tokenizes and "
                                   f"batches, and sends its batches to the same device "
                                   f"workers; 1: one process, as before (at most "
                                   f"{MAX_FRONTENDS})")
    startup_timeout_s: float = option(600.0, cli=False, help="workers must be ready within")

    def __post_init__(self) -> None:
        _port(self, "port", "http_port", "metrics_port")
        _at_least(self, 1, "frontends")
        if self.frontends is not None and self.frontends > MAX_FRONTENDS:
            raise ValueError(f"--frontends must be at most {MAX_FRONTENDS}")
        _at_least(self, 0, "grace_seconds")
        _at_least(self, 1, "max_http_connections", "max_grpc_connections")
        _at_least(self, 0.1, "http_idle_seconds")


@dataclass(frozen=True, kw_only=True)
class SecurityOptions:
    """TLS, mutual TLS and API keys (server/security.py)."""

    tls_cert: str | None = option(None, shown="off", help="PEM certificate (chain) of the "
                                  "server: the port speaks TLS only (needs --tls-key)")
    tls_key: str | None = option(None, help="PEM private key (unencrypted) of --tls-cert")
    tls_client_ca: str | None = option(None, help="PEM CA certificate(s): mutual TLS, every "
                                       "client must present a certificate signed by one "
                                       "(health included)")
    api_keys: tuple[str, ...] = option(
        default_factory=tuple, flag="api-key", secret=True, shown="off",
        help="require the metadata 'authorization: Bearer KEY' on every call; repeat or "
        "comma-separate for several keys. Flags show in ps: prefer the environment "
        "variable or --api-keys-file")
    api_keys_file: str | None = option(None, help="file of API keys, one per line ('#' "
                                       "starts a comment line); read at start and on SIGHUP "
                                       "(with the TLS files), added to --api-key")
    auth_health: bool = option(False, help="health checks need an API key too (by default "
                               "they stay open for probes and load balancers)")
    auth_reflection: bool = option(False, help="server reflection needs an API key too (by "
                                   "default it stays open)")


@dataclass(frozen=True, kw_only=True)
class LogOptions:
    """Logging, in the main process and the workers alike."""

    log_level: str = option("INFO", help="DEBUG, INFO, WARNING or ERROR (any case)")
    log_format: str = option("text", choices=LOG_FORMATS, help="'json': one JSON object per "
                             "line (ts, level, logger, message, request_id)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "log_level", self.log_level.upper())
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"--log-level {self.log_level!r}: use DEBUG, INFO, WARNING or "
                             "ERROR")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """All serve options, by group. `ServeConfig.of(max_batch_tokens=..., port=...)`
    takes them by name, as the command line does."""

    model: ModelOptions = field(default_factory=ModelOptions)
    devices: DeviceOptions = field(default_factory=DeviceOptions)
    batching: BatchConfig = field(default_factory=BatchConfig)
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    network: NetworkOptions = field(default_factory=NetworkOptions)
    security: SecurityOptions = field(default_factory=SecurityOptions)
    logging: LogOptions = field(default_factory=LogOptions)

    @classmethod
    def of(cls, **options: Any) -> ServeConfig:
        """Options by their own names, each put in its group; TypeError for unknown ones."""
        groups: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
        for name, value in options.items():
            group = OPTION_GROUPS.get(name)
            if group is None:
                raise TypeError(f"unknown serve option {name!r}")
            groups[group][name] = value
        return cls(**{name: GROUPS[name](**values) for name, values in groups.items()})

    def get(self, name: str) -> Any:
        """An option by its own name, whatever its group."""
        return getattr(getattr(self, OPTION_GROUPS[name]), name)


@dataclass(frozen=True, kw_only=True)
class DebugHooks:
    """Test-only knobs: no flags, not in ServeConfig."""

    # FakeBackend fault injection: a batch holding this token id kills the worker the way
    # `fake_crash_mode` says: "kill" (SIGKILL, as the OOM killer does), "segv" (a real
    # segmentation fault) or "exit" (exit code 3).
    fake_crash_token: int = -1
    fake_crash_mode: str = "kill"
    # A batch holding this token id makes the fake backend hang (a stuck kernel).
    fake_hang_token: int = -1
    fake_warmup_ms: float = 0.0  # the fake backend's start-up takes this long
    # The bucketed path of --cuda-graphs without capture, on any device (CPU tests).
    static_shapes: bool = False
    # --frontends: a front end that answers no ping for this long is killed (restarted).
    frontend_stall_s: float = 20.0
    # --frontends: a front end pauses this long once it has read its keys, before it
    # binds its ports (a SIGHUP in that window must still reload them).
    frontend_start_pause_s: float = 0.0


GROUPS: dict[str, type] = {
    "model": ModelOptions, "devices": DeviceOptions, "batching": BatchConfig,
    "limits": ServiceLimits, "network": NetworkOptions, "security": SecurityOptions,
    "logging": LogOptions,
}
assert list(GROUPS) == [f.name for f in dataclasses.fields(ServeConfig)]
# Option name → its group's attribute in ServeConfig; names are unique across groups.
OPTION_GROUPS: dict[str, str] = {}
for _name, _cls in GROUPS.items():
    for _f in dataclasses.fields(_cls):
        assert _f.name not in OPTION_GROUPS, f"option {_f.name} defined twice"
        OPTION_GROUPS[_f.name] = _name
