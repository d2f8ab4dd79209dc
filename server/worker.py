"""The worker process: one model session on one device, embedding batches.

Everything here runs inside a process started with the `spawn` context by
WorkerHandle (workers.py). The contract with the main process is small:

    main → worker:  Batch(id, ids, lengths)   or None to stop
    worker → main:  ("ready", info) | ("error", message)       once, after start-up
                    ("ok", batch_id, vectors[B, H] float32) | ("fail", batch_id, message)

A backend embeds one batch: `embed(ids, lengths) -> [B, H]` and `warmup()`.
`OrtBackend` runs the ONNX graph; `FakeBackend` is deterministic and fast, for
tests of everything above the worker.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import signal
import time
import zlib
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

import numpy as np

from .errors import ModelError
from .graphs import StaticShapes
from .logs import configure_logging, worker_text_format
from .pooling import pool

log = logging.getLogger(__name__)

_PAST = re.compile(r"^past_key_values\.\d+\.(key|value)$|^past_(key|value)s?\.\d+$")
_HIDDEN_OUTPUTS = ("last_hidden_state", "token_embeddings")
_POOLED_OUTPUT = "sentence_embedding"
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}
_PRECISION = {"tensor(float)": "float32", "tensor(float16)": "float16",
              "tensor(bfloat16)": "bfloat16"}
# ONNX Runtime's CUDA provider option `sdpa_kernel`: a bitmask of the attention kernels
# it may use (AttentionBackend in onnxruntime's attention_common.h); 0 lets it choose.
ATTENTION_KERNELS = {"auto": 0, "flash": 1, "efficient": 2, "cudnn": 8, "math": 16}
PREPARED_INFO = "embedrpc_prepared.json"  # what `embedrpc prepare` writes beside its graph


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """What a worker process needs to build its backend (pickled to the child)."""

    backend: str = "onnx"  # "onnx" or "fake"
    onnx_path: str = ""
    device: str = "cpu"  # "cpu" or "cuda:N"
    threads: int = 1
    # CPU: let idle intra-op threads spin-wait for work (ONNX Runtime's default). Off in
    # the server: its main process and the other workers share these cores, and threads
    # spinning while a batch waits on them took up to 3x the CPU per text under load.
    spin: bool = False
    pooling: str = "lasttoken"
    pad_id: int = 0
    hidden_size: int = 0
    # Static shapes (graphs.py): batches padded up to (rows, length) buckets and run
    # on bindings allocated once per bucket, which CUDA graphs need; with `cuda_graphs`
    # each bucket is captured once and replayed. For graphs that pool inside (prepared
    # models) and batches of at most `graph_max_tokens` padded tokens.
    cuda_graphs: bool = False
    static_shapes: bool = False  # the bucketed path without capture (CPU tests)
    graph_max_tokens: int = 4096
    # CUDA: the attention kernels ONNX Runtime may pick (ATTENTION_KERNELS names, comma-
    # separated; "auto": its own choice). A way out when one kernel misbehaves on a GPU
    # (e.g. per-shape plan building that stalls the first runs of each shape).
    attention_kernel: str = "auto"
    max_length: int = 0  # the model's longest input; no bucket is longer (0: no limit)
    fake_delay_ms: float = 0.0  # FakeBackend: simulated compute time per batch
    # FakeBackend fault injection (tests): a batch holding this token id kills the
    # process the way `fake_crash_mode` says: "kill" (SIGKILL, as the OOM killer
    # does), "segv" (a real segmentation fault) or "exit" (exit code 3).
    fake_crash_token: int = -1
    fake_crash_mode: str = "kill"
    log_level: str = "INFO"
    log_format: str = "text"


@dataclass(frozen=True, slots=True)
class Batch:
    """Token ids of B texts, concatenated; row i is ids[offsets[i]:offsets[i] + lengths[i]]."""

    id: int
    ids: np.ndarray  # int32, flat
    lengths: np.ndarray  # int32, [B]


class Backend(Protocol):
    def embed(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray: ...
    def warmup(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...


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


def cuda_provider_options(spec: WorkerSpec, *, cuda_graphs: bool) -> dict[str, str]:
    """Options of ONNX Runtime's CUDA execution provider for this worker."""
    _, _, index = spec.device.partition(":")
    # TF32 (on by default in the CUDA provider) rounds float32 matrix products to a 10-bit
    # mantissa: a float32 graph would no longer compute float32 (max abs 6e-4 on the demo
    # model). fp16 and bf16 graphs have no float32 products, so it costs them nothing.
    options = {"device_id": str(int(index or 0)), "use_tf32": "0"}
    if cuda_graphs:
        options["enable_cuda_graph"] = "1"
    mask = attention_kernel_mask(spec.attention_kernel)
    if mask:
        options["sdpa_kernel"] = str(mask)
    return options


def session_options(spec: WorkerSpec) -> Any:
    """ONNX Runtime session options: CPU threads by device."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    on_cpu = spec.device == "cpu"
    # On a GPU the session's CPU threads only launch kernels: one is enough, and spinning
    # threads would take cores from the main process and the other workers for nothing.
    options.intra_op_num_threads = spec.threads if on_cpu else 1
    options.inter_op_num_threads = 1
    if not (on_cpu and spec.spin):
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def providers(spec: WorkerSpec, *, cuda_graphs: bool) -> list[Any]:
    if spec.device == "cpu":
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", cuda_provider_options(spec, cuda_graphs=cuda_graphs)),
            "CPUExecutionProvider"]


def cuda_precision_check(precision: str, *, cuda_graphs: bool) -> tuple[str, str] | None:
    """Whether a prepared graph of this precision runs on ONNX Runtime's CUDA provider:
    None when it does, else ("refuse" or "warn", why). From the provider's kernel
    registrations (1.31): GroupQueryAttention has CUDA kernels for fp16 and bf16 only, and
    CUDA MatMulInteger takes int8 × int8 only, while the int8 graph's are uint8 × int8.
    Graphs that are not prepared (plain exports: MatMul and Softmax attention) run whole."""
    if precision == "int8":
        return "refuse", (
            "an int8 prepared graph is for the CPU: ONNX Runtime's CUDA MatMulInteger takes "
            "int8 × int8 and this graph's products are uint8 × int8, so every one of them "
            "would run on the CPU. Serve it with --device cpu, or prepare --precision fp16 "
            "or bf16 for a GPU")
    if precision == "fp32" or precision.endswith("-emulated"):
        why = (f"a {precision} prepared graph has no CUDA attention: ONNX Runtime's "
               "GroupQueryAttention runs on CUDA in fp16 and bf16 only, so in this graph it "
               "runs on the CPU, with copies to and from the GPU in every layer")
        if cuda_graphs:
            return "refuse", (f"--cuda-graphs: {why}, and a CUDA graph needs every node on "
                              "the GPU. Prepare --precision fp16 or bf16, or serve without "
                              "--cuda-graphs")
        return "warn", (f"{why} (correct, but slow). Prepare --precision fp16 or bf16 "
                        "for a GPU")
    return None


def prepared_precision(onnx_path: str) -> str | None:
    """The precision `embedrpc prepare` recorded for this graph file, if it made it."""
    path = os.path.join(os.path.dirname(onnx_path), PREPARED_INFO)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        if info["graph"]["file"] != os.path.basename(onnx_path):
            return None  # another graph of the same directory
        return str(info["precision"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_bound(session: Any, binding: Any, run_options: Any, *, sync_inputs: bool) -> None:
    """One run on bound inputs and outputs."""
    if sync_inputs:
        # Copies of inputs from pageable host memory may still be in flight on ONNX
        # Runtime's stream when the run starts; this waits for them.
        binding.synchronize_inputs()
    session.run_with_iobinding(binding, run_options)


def right_pad(ids: np.ndarray, lengths: np.ndarray, pad_id: int,
              dtype: type = np.int64, width: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flat ids → ([B, L] ids, [B, L] attention mask), padding on the right to
    `width` (default: the longest row)."""
    width = max(width, int(lengths.max()))
    mask = np.arange(width)[None, :] < lengths[:, None]
    padded = np.full((len(lengths), width), pad_id, dtype=dtype)
    padded[mask] = ids  # row-major fill matches the concatenation order
    return padded, mask.astype(dtype)


class OrtBackend:
    """An ONNX Runtime session driven through IOBinding; pooling per ModelSpec."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device_type, _, index = spec.device.partition(":")
        self.device_id = int(index or 0)
        if spec.cuda_graphs and self.device_type != "cuda":
            raise ModelError(f"--cuda-graphs needs a CUDA device, not {spec.device}")
        try:
            attention_kernel_mask(spec.attention_kernel)
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        self.cuda_graphs = spec.cuda_graphs
        self.broken: str | None = None  # set when the backend cannot run any more
        self.warnings: list[str] = []  # said once in the log, kept for describe()
        self._warned = False
        if self.device_type == "cuda":
            # Before loading: a session with CUDA graphs would refuse a CPU-only precision
            # with a message that does not say why.
            self._check_precision(prepared_precision(spec.onnx_path))
        self.session = self._load(cuda_graphs=self.cuda_graphs)
        self._inspect()
        if self.device_type == "cuda":
            self._check_precision(self.precision)
        self.run_options = self._run_options()
        self.static: StaticShapes | None = None
        if spec.cuda_graphs or spec.static_shapes:
            self.static = StaticShapes(self, capture=spec.cuda_graphs,
                                       max_tokens=spec.graph_max_tokens)

    def _check_precision(self, precision: str | None) -> None:
        verdict = cuda_precision_check(precision or "", cuda_graphs=self.cuda_graphs)
        if verdict is None:
            return
        level, why = verdict
        if level == "refuse":
            raise ModelError(f"{self.spec.onnx_path} on {self.spec.device}: {why}")
        if not self._warned:
            log.warning("%s on %s: %s", self.spec.onnx_path, self.spec.device, why)
            self.warnings.append(why)
            self._warned = True

    def _load(self, *, cuda_graphs: bool) -> Any:
        import onnxruntime as ort

        if self.device_type == "cuda" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        try:
            session = ort.InferenceSession(self.spec.onnx_path, session_options(self.spec),
                                           providers=providers(self.spec,
                                                               cuda_graphs=cuda_graphs))
        except Exception as exc:
            hint = (" (--cuda-graphs needs every node of the graph on the CUDA provider; "
                    "serve it without --cuda-graphs)" if cuda_graphs else "")
            raise ModelError(f"{self.spec.onnx_path}: ONNX Runtime cannot load it{hint}: "
                             f"{exc}") from exc
        if self.device_type == "cuda" and session.get_providers()[0] != \
                "CUDAExecutionProvider":
            raise ModelError(f"{self.spec.device}: the CUDA execution provider is not usable "
                             "(onnxruntime-gpu, CUDA and cuDNN are needed)")
        return session

    def _run_options(self) -> Any:
        import onnxruntime as ort

        options = ort.RunOptions()
        if self.cuda_graphs:
            # A session with CUDA graphs captures every run unless told not to (id -1).
            options.add_run_config_entry("gpu_graph_id", "-1")
        return options

    def drop_cuda_graphs(self) -> None:
        """A new session without CUDA graphs. After a kernel fails during a capture, the
        session's CUDA stream may stay unusable, so the old session cannot even run the
        exact shapes any more. If no new session can be made, `broken` says why (the
        worker process then exits and is restarted)."""
        self.session = None
        gc.collect()  # the old session's device memory, before the new one takes its own
        self.cuda_graphs = False
        try:
            self.session = self._load(cuda_graphs=False)
        except ModelError as exc:
            self.broken = f"no session after CUDA graphs were dropped: {exc}"
            raise
        self.run_options = self._run_options()

    def run(self, binding: Any, run_options: Any) -> None:
        run_bound(self.session, binding, run_options, sync_inputs=self.device_type == "cuda")

    def _inspect(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if "input_ids" not in inputs:
            raise ModelError(f"{self.spec.onnx_path}: the graph has no input_ids input "
                        f"(inputs: {', '.join(inputs)})")
        self.ids_dtype = _ORT_TYPES.get(inputs["input_ids"].type, np.int64)
        self.past = {}
        known = {"input_ids", "attention_mask", "position_ids", "token_type_ids"}
        for name, arg in inputs.items():
            if _PAST.match(name):
                shape = arg.shape
                if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
                    raise ModelError(f"{name}: cannot tell KV heads and head size from {shape}")
                self.past[name] = (shape[1], shape[3], _ORT_TYPES.get(arg.type, np.float32))
            elif name not in known:
                raise ModelError(f"{self.spec.onnx_path}: unknown graph input {name!r}; embedrpc "
                            f"feeds {', '.join(sorted(known))} and past_key_values.*")
        self.inputs = inputs
        name = _POOLED_OUTPUT if _POOLED_OUTPUT in outputs else next(
            (n for n in _HIDDEN_OUTPUTS if n in outputs), None)
        if name is None:
            raise ModelError(f"{self.spec.onnx_path}: no usable output (need one of "
                        f"{', '.join((*_HIDDEN_OUTPUTS, _POOLED_OUTPUT))}; the graph has "
                        f"{', '.join(outputs)}). Export the feature-extraction task, not "
                        "text-generation.")
        self.output = name
        self.pooled_by_graph = name == _POOLED_OUTPUT
        dim = outputs[name].shape[-1]
        self.hidden_size = dim if isinstance(dim, int) else self.spec.hidden_size
        # A prepared graph says what it computes in (its output is float32 whatever it is).
        meta = self.session.get_modelmeta().custom_metadata_map
        self.precision = meta.get("embedrpc.precision") or _PRECISION.get(
            outputs[name].type, outputs[name].type)

    def describe(self) -> dict[str, Any]:
        info = {"hidden_size": self.hidden_size, "precision": self.precision,
                "output": self.output, "inputs": sorted(self.inputs),
                "providers": self.session.get_providers(), "device": self.spec.device}
        if self.device_type == "cuda":
            info["attention_kernel"] = self.spec.attention_kernel
        if self.warnings:
            info["warnings"] = list(self.warnings)
        if self.static is not None:
            info.update(self.static.describe())
        return info

    def int_type(self, name: str) -> type:
        """The graph's own integer type for an input (int64 or int32)."""
        return _ORT_TYPES.get(self.inputs[name].type, np.int64)

    def _bind(self, binding: Any, name: str, array: np.ndarray) -> None:
        if self.device_type == "cpu":
            binding.bind_cpu_input(name, array)
        else:
            import onnxruntime as ort

            value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", self.device_id)
            binding.bind_ortvalue_input(name, value)

    def embed(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if self.static is not None:
            out = self.static.embed(ids, lengths)
            if out is not None:
                return out
        return self.embed_exact(ids, lengths)

    def feeds(self, padded: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """Every graph input for right-padded [B, L] ids and their attention mask."""
        batch, width = padded.shape
        feeds: dict[str, np.ndarray] = {"input_ids": padded}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = mask.astype(self.int_type("attention_mask"), copy=False)
        if "position_ids" in self.inputs:
            # Right padding: real tokens sit at 0..len-1 in every row.
            feeds["position_ids"] = np.ascontiguousarray(np.broadcast_to(
                np.arange(width, dtype=self.int_type("position_ids")), (batch, width)))
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = np.zeros((batch, width),
                                               dtype=self.int_type("token_type_ids"))
        for name, (heads, head_dim, dtype) in self.past.items():
            feeds[name] = np.zeros((batch, heads, 0, head_dim), dtype=dtype)
        return feeds

    def embed_exact(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One batch at its own shape: padded to its longest row, no more."""
        padded, mask = right_pad(ids, lengths, self.spec.pad_id, self.ids_dtype)
        binding = self.session.io_binding()
        for name, array in self.feeds(padded, mask).items():
            self._bind(binding, name, array)
        binding.bind_output(self.output, "cpu")
        self.run(binding, self.run_options)
        out = binding.copy_outputs_to_cpu()[0]
        if self.pooled_by_graph:
            return np.ascontiguousarray(out, dtype=np.float32)
        return pool(out, lengths.astype(np.int64), self.spec.pooling)

    def warmup(self) -> None:
        if self.static is not None:
            self.static.warm()
        lengths = np.array([3, 8], dtype=np.int32)
        ids = np.full(int(lengths.sum()), self.spec.pad_id, dtype=np.int32)
        out = self.embed(ids, lengths)
        if out.shape != (2, self.hidden_size) or not np.isfinite(out).all():
            raise RuntimeError(f"warm-up batch gave shape {out.shape}, finite="
                               f"{bool(np.isfinite(out).all())}")


class FakeBackend:
    """Deterministic vectors from token ids alone, independent of batch-mates."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.hidden_size = spec.hidden_size

    def describe(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "precision": "float32", "output": "fake",
                "inputs": ["input_ids"], "providers": ["fake"], "device": self.spec.device}

    def embed(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if self.spec.fake_crash_token >= 0 and (ids == self.spec.fake_crash_token).any():
            crash(self.spec.fake_crash_mode)
        if self.spec.fake_delay_ms:
            time.sleep(self.spec.fake_delay_ms / 1000)
        return np.stack([fake_vector(row, self.hidden_size)
                         for row in np.split(ids, np.cumsum(lengths)[:-1])])

    def warmup(self) -> None:
        self.embed(np.zeros(4, dtype=np.int32), np.array([4], dtype=np.int32))


def crash(mode: str) -> None:
    """Die like a broken native library would (fault injection for tests)."""
    logging.shutdown()
    if mode == "segv":
        import ctypes

        ctypes.string_at(0)  # reads address 0: SIGSEGV
    elif mode == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)


def fake_vector(ids: np.ndarray, hidden_size: int) -> np.ndarray:
    """FakeBackend's vector for one text: seeded by a CRC of its ids."""
    seed = zlib.crc32(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
    return np.random.default_rng(seed).standard_normal(hidden_size).astype(np.float32)


def make_backend(spec: WorkerSpec) -> Backend:
    if spec.backend == "fake":
        return FakeBackend(spec)
    return OrtBackend(spec)


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """Entry point of a worker process."""
    configure_logging(spec.log_level, spec.log_format, text_format=worker_text_format())
    try:
        backend = make_backend(spec)
        backend.warmup()
    except ModelError as exc:  # a clear message already; the main process reports it
        conn.send(("error", str(exc)))
        return
    except Exception as exc:
        log.exception("worker start-up failed")
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", backend.describe()))
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return  # the main process is gone
        if batch is None:
            return
        try:
            vectors = backend.embed(batch.ids, batch.lengths)
        except Exception as exc:
            log.exception("batch %d failed", batch.id)
            conn.send(("fail", batch.id, f"{type(exc).__name__}: {exc}"))
            broken = getattr(backend, "broken", None)
            if broken:  # a new process (WorkerHandle restarts it) is the way out
                log.error("worker exits: %s", broken)
                return
            continue
        conn.send(("ok", batch.id, vectors))
