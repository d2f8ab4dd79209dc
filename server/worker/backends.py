"""Backends: what embeds one batch inside a worker process.

A backend embeds one batch: `embed(ids, lengths) -> [B, H]`, `warmup()` and
`describe()`. `OrtBackend` runs the ONNX graph through IOBinding on its device;
`FakeBackend` is deterministic and fast, for tests of everything above the worker.
A reranker's graph (Qwen3-Reranker, prepared by `embedrpc prepare`) outputs one score
per row, `score` [B]; it comes back as [B, 1], a vector of width 1, so the router and
the IPC treat it like any other.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import re
import signal
import time
import zlib
from typing import Any, Protocol

import numpy as np

from ..config import attention_kernel_mask
from ..errors import ModelError
from ..pooling import pool
from .cuda import cuda_precision_check, prepared_precision, providers, run_bound, session_options
from .cuda_graphs import StaticShapes
from .spec import WorkerSpec, right_pad

log = logging.getLogger(__name__)

_PAST = re.compile(r"^past_key_values\.\d+\.(key|value)$|^past_(key|value)s?\.\d+$")
_HIDDEN_OUTPUTS = ("last_hidden_state", "token_embeddings")
_POOLED_OUTPUT = "sentence_embedding"
_SCORE_OUTPUT = "score"
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}
_PRECISION = {"tensor(float)": "float32", "tensor(float16)": "float16",
              "tensor(bfloat16)": "bfloat16"}


class Backend(Protocol):
    def embed(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray: ...
    def warmup(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...


class OrtBackend:
    """An ONNX Runtime session driven through IOBinding; pooling per ModelSpec."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device_type, _, index = spec.device.partition(":")
        self.device_id = int(index or 0)
        if spec.options.cuda_graphs and self.device_type != "cuda":
            raise ModelError(f"--cuda-graphs needs a CUDA device, not {spec.device}")
        try:
            attention_kernel_mask(spec.options.attention_kernel)
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        self.cuda_graphs = spec.options.cuda_graphs
        self.broken: str | None = None  # set when the backend cannot run any more
        self.warnings: list[str] = []  # said once in the log, kept for describe()
        self._warned = False
        prepared = prepared_precision(spec.onnx_path)
        if self.device_type == "cuda":
            # Before loading: a session with CUDA graphs would refuse a CPU-only precision
            # with a message that does not say why.
            self._check_precision(prepared)
        elif prepared == "bf16":
            # ONNX Runtime would say "Could not find an implementation for MatMul(13)".
            raise ModelError(f"{spec.onnx_path}: a bf16 prepared graph runs on a GPU only "
                             "(ONNX Runtime's CPU provider has no bf16 MatMul); serve it "
                             "with --device cuda, or prepare --precision fp32 (exact) or "
                             "int8 (fastest) for the CPU")
        self.session = self._load(cuda_graphs=self.cuda_graphs)
        self._inspect()
        if self.device_type == "cuda":
            self._check_precision(self.precision)
        self.run_options = self._run_options()
        self.static: StaticShapes | None = None
        if spec.options.cuda_graphs or spec.hooks.static_shapes:
            self.static = StaticShapes(self, capture=spec.options.cuda_graphs,
                                       max_tokens=spec.options.cuda_graph_max_tokens)

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
        self.scores = self.spec.task == "rerank"
        if self.scores:
            if _SCORE_OUTPUT not in outputs:
                raise ModelError(f"{self.spec.onnx_path}: served as a reranker, but the graph "
                                 f"has no {_SCORE_OUTPUT!r} output (it has "
                                 f"{', '.join(outputs)}); make a reranker graph with "
                                 "`embedrpc prepare --task rerank`")
            name: str | None = _SCORE_OUTPUT
        elif _SCORE_OUTPUT in outputs and not any(
                n in outputs for n in (*_HIDDEN_OUTPUTS, _POOLED_OUTPUT)):
            raise ModelError(f"{self.spec.onnx_path}: the graph outputs reranker scores "
                             f"({_SCORE_OUTPUT}), not vectors; serve it as a reranker "
                             "(--task rerank, or auto)")
        else:
            name = _POOLED_OUTPUT if _POOLED_OUTPUT in outputs else next(
                (n for n in _HIDDEN_OUTPUTS if n in outputs), None)
        if name is None:
            raise ModelError(f"{self.spec.onnx_path}: no usable output (need one of "
                        f"{', '.join((*_HIDDEN_OUTPUTS, _POOLED_OUTPUT))}; the graph has "
                        f"{', '.join(outputs)}). Export the feature-extraction task, not "
                        "text-generation.")
        self.output = name
        # A score is computed whole by the graph, as a pooled vector is.
        self.pooled_by_graph = name in (_POOLED_OUTPUT, _SCORE_OUTPUT)
        dim = 1 if self.scores else outputs[name].shape[-1]
        self.hidden_size = dim if isinstance(dim, int) else self.spec.hidden_size
        # A prepared graph says what it computes in (its output is float32 whatever it is).
        meta = self.session.get_modelmeta().custom_metadata_map
        self.precision = meta.get("embedrpc.precision") or _PRECISION.get(
            outputs[name].type, outputs[name].type)

    def describe(self) -> dict[str, Any]:
        info = {"hidden_size": self.hidden_size, "precision": self.precision,
                "task": self.spec.task, "output": self.output, "inputs": sorted(self.inputs),
                "providers": self.session.get_providers(), "device": self.spec.device}
        if self.device_type == "cuda":
            info["attention_kernel"] = self.spec.options.attention_kernel
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
            return np.ascontiguousarray(out, dtype=np.float32).reshape(len(lengths), -1)
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
        self.scores = spec.task == "rerank"
        self.hidden_size = 1 if self.scores else spec.hidden_size

    def describe(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "precision": "float32", "output": "fake",
                "task": self.spec.task, "inputs": ["input_ids"], "providers": ["fake"],
                "device": self.spec.device}

    def embed(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        hooks = self.spec.hooks
        if hooks.fake_crash_token >= 0 and (ids == hooks.fake_crash_token).any():
            crash(hooks.fake_crash_mode)
        if hooks.fake_hang_token >= 0 and (ids == hooks.fake_hang_token).any():
            while True:  # as a kernel that never returns: only a kill ends it
                time.sleep(3600)
        if self.spec.options.fake_delay_ms:
            time.sleep(self.spec.options.fake_delay_ms / 1000)
        vectors = fake_vectors(ids, lengths, self.hidden_size)
        if self.scores:  # a reranker's score is in (0, 1)
            return (1 / (1 + np.exp(-vectors))).astype(np.float32)
        return vectors

    def warmup(self) -> None:
        if self.spec.hooks.fake_warmup_ms:
            time.sleep(self.spec.hooks.fake_warmup_ms / 1000)
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
    """FakeBackend's vector for one text (the formula tests compute expected vectors by):
    the CRC-32 of its ids (int32, little-endian) picks four rows of a fixed table of
    standard normal draws, one by each of its bytes, lowest first; the vector is
    row0 + row1 / 2 + row2 / 4 + row3 / 8. Distinct ids give distinct vectors but for
    CRC collisions; a text's vector does not depend on its batch-mates."""
    ids = np.ascontiguousarray(ids, dtype="<i4")
    return fake_vectors(ids, np.array([len(ids)], dtype=np.int32), hidden_size)[0]


def fake_vectors(ids: np.ndarray, lengths: np.ndarray, hidden_size: int) -> np.ndarray:
    """fake_vector of every row of a batch (flat int32 ids, row lengths), at once: the
    fake backend stands in for a device that costs nothing, so its own cost per text
    must be small beside the front end's (a seeded generator per text cost ~40 µs)."""
    flat = np.ascontiguousarray(ids, dtype="<i4").tobytes()
    crc = zlib.crc32
    seeds = np.empty(len(lengths), dtype="<u4")
    start = 0
    for i, n in enumerate(lengths.tolist()):
        seeds[i] = crc(flat[4 * start:4 * (start + n)])
        start += n
    table = _fake_table(hidden_size)
    picks = seeds.view(np.uint8).reshape(-1, 4)  # little-endian: the lowest byte first
    out = table[picks[:, 0]]
    for k in (1, 2, 3):
        out += table[picks[:, k]] * np.float32(0.5 ** k)
    return out


@functools.cache
def _fake_table(hidden_size: int) -> np.ndarray:
    table = np.random.default_rng(20240605).standard_normal((256, hidden_size))
    table = table.astype(np.float32)
    table.flags.writeable = False
    return table


def make_backend(spec: WorkerSpec) -> Backend:
    if spec.options.backend == "fake":
        return FakeBackend(spec)
    return OrtBackend(spec)
