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
        import onnxruntime as ort

        self.spec = spec
        self.device_type, _, index = spec.device.partition(":")
        self.device_id = int(index or 0)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if self.device_type == "cpu":
            options.intra_op_num_threads = spec.threads
            options.inter_op_num_threads = 1
            if not spec.spin:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            providers: list[Any] = ["CPUExecutionProvider"]
        else:
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()
            cuda: dict[str, Any] = {"device_id": self.device_id}
            if spec.cuda_graphs:
                cuda["enable_cuda_graph"] = "1"
            providers = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(spec.onnx_path, options, providers=providers)
        except Exception as exc:
            hint = (" (--cuda-graphs needs every node of the graph on the CUDA provider; "
                    "serve it without --cuda-graphs)" if spec.cuda_graphs else "")
            raise ModelError(f"{spec.onnx_path}: ONNX Runtime cannot load it{hint}: "
                             f"{exc}") from exc
        if self.device_type == "cuda" and self.session.get_providers()[0] != \
                "CUDAExecutionProvider":
            raise ModelError(f"{spec.device}: the CUDA execution provider is not usable "
                             "(onnxruntime-gpu, CUDA and cuDNN are needed)")
        self._inspect()
        # A session with CUDA graphs captures every run unless told not to (id -1).
        self.run_options = ort.RunOptions()
        if spec.cuda_graphs and self.device_type == "cuda":
            self.run_options.add_run_config_entry("gpu_graph_id", "-1")
        self.static: StaticShapes | None = None
        if spec.cuda_graphs and self.device_type != "cuda":
            raise ModelError(f"--cuda-graphs needs a CUDA device, not {spec.device}")
        if spec.cuda_graphs or spec.static_shapes:
            self.static = StaticShapes(self, capture=spec.cuda_graphs,
                                       max_tokens=spec.graph_max_tokens)

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
        self.session.run_with_iobinding(binding, self.run_options)
        out = binding.copy_outputs_to_cpu()[0]
        if self.pooled_by_graph:
            return np.ascontiguousarray(out, dtype=np.float32)
        return pool(out, lengths.astype(np.int64), self.spec.pooling)

    def warmup(self) -> None:
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
            continue
        conn.send(("ok", batch.id, vectors))
