"""Static shapes and CUDA graphs for short batches (runs inside a worker process).

A CUDA graph replays a captured sequence of kernels with one launch instead of
hundreds; ONNX Runtime captures one per `gpu_graph_id` when the session has
`enable_cuda_graph`. A replay reads its inputs from, and writes its output to,
the very buffers it was captured with, at the very shapes. So batches are padded
up to a (rows, length) bucket, and each bucket owns its buffers, bound once:

- length buckets step by about 1.5x, row buckets too: padding costs at most ~1.5x
  per axis, and a few dozen buckets cover every batch up to `max_tokens`;
- extra rows are one pad token each (attention sees a real token, so no row is
  all-masked); their outputs are dropped;
- only graphs that pool inside (prepared models) qualify, so a replay leaves
  [rows, H] on the device and nothing else is copied back (a reranker's graph leaves
  its scores, [rows]);
- batches over `max_tokens` padded tokens run with their exact shape: there the
  kernels are long and launch overhead is small beside them.

Every bucket is checked once, when it is first used: it runs once ordinarily (the
memory arena grows to the shape), then on pad rows (the capture), then on the real
batch (a replay), and the replay must agree with the ordinary path on that batch
(cosine, not equality: on a GPU a padded shape may pick other kernels, and fp16
rounds differently; a reranker's scores by their difference, AGREE_SCORE_DIFF). A
replay that reads stale inputs, or any other disagreement, turns graphs off for this
worker with a warning; the batch is answered by the ordinary path. A capture or
replay that fails also turns them off, and the session is rebuilt without CUDA
graphs first: a kernel that fails during a capture can leave the session's stream
unusable. With `capture` off (the CPU provider has no graphs) the same bucketed path
runs with fixed bindings, which is what the CPU tests check against the reference.

The common buckets (WARMUP_ROWS × every length within the limits) are made at the
worker's warm-up, before it takes traffic, so their captures cost no client any
latency; rarer ones are made on first use. How long the warm-up took is logged and
reported by describe().
"""

from __future__ import annotations

import itertools
import logging
import time
from bisect import bisect_left
from typing import Any, Protocol

import numpy as np

from ..errors import ModelError
from .spec import WorkerSpec, right_pad


class SessionBackend(Protocol):
    """What the bucketed path needs of the backend that owns it (backends.OrtBackend)."""

    spec: WorkerSpec
    session: Any
    device_type: str
    device_id: int
    hidden_size: int
    output: str
    pooled_by_graph: bool
    scores: bool
    ids_dtype: type
    run_options: Any

    def feeds(self, padded: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]: ...
    def int_type(self, name: str) -> type: ...
    def run(self, binding: Any, run_options: Any) -> None: ...
    def drop_cuda_graphs(self) -> None: ...
    def embed_exact(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray: ...

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
LENGTH_BUCKETS = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# The replay must agree with the ordinary path on the same batch, per row (cosine). On
# a GPU the padded shape may pick other kernels, i.e. other summation orders, so the two
# agree to rounding, not bit for bit. Both sides have the same weights and precision, so
# they are held closer than `prepare` holds fp16/bf16 to float32 (0.999); a replay that
# reads another batch's inputs gives cosines far below either. describe() reports the
# smallest cosine seen, so a GPU run shows the margin.
AGREE_COSINE = 0.9995
# A reranker's scores (in (0, 1)): replay and ordinary path at most this far apart, well
# inside prepare's 2e-3 for fp16 against float32.
AGREE_SCORE_DIFF = 1e-3
CAPTURE_RUNS = 3  # ONNX Runtime may run a graph id normally a few times before capturing
# Buckets made at warm-up: these row counts at every length bucket the limits allow.
# Light traffic (where graphs pay) gives small batches; larger ones are made on first use.
WARMUP_ROWS = (1, 2, 3, 4, 6, 8, 16, 32)


def bucket(rows: int, width: int, max_tokens: int,
           max_length: int = 0) -> tuple[int, int] | None:
    """The smallest (rows, length) bucket holding a batch, or None when the batch is
    larger than every bucket, its padded size exceeds `max_tokens`, or the bucket's
    length exceeds `max_length` (the model's limit; 0: none)."""
    r = bisect_left(ROW_BUCKETS, rows)
    w = bisect_left(LENGTH_BUCKETS, width)
    if r == len(ROW_BUCKETS) or w == len(LENGTH_BUCKETS):
        return None
    shape = ROW_BUCKETS[r], LENGTH_BUCKETS[w]
    if shape[0] * shape[1] > max_tokens or (max_length and shape[1] > max_length):
        return None
    return shape


def warmup_shapes(max_tokens: int, max_length: int = 0) -> list[tuple[int, int]]:
    """The buckets made at warm-up: WARMUP_ROWS × LENGTH_BUCKETS, within the limits."""
    return [(rows, width) for rows in WARMUP_ROWS for width in LENGTH_BUCKETS
            if bucket(rows, width, max_tokens, max_length) == (rows, width)]


def min_cosine(got: np.ndarray, want: np.ndarray) -> float:
    """The smallest cosine between corresponding rows (NaN when any is non-finite)."""
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    norms = np.linalg.norm(got64, axis=1) * np.linalg.norm(want64, axis=1)
    with np.errstate(invalid="ignore"):
        return float(np.min(np.sum(got64 * want64, 1) / np.maximum(norms, 1e-30)))


def agreement(got: np.ndarray, want: np.ndarray, scores: bool) -> float:
    """How well a replay agrees with the ordinary path: the smallest cosine between rows
    (min_cosine), or for a reranker's scores 1 − the largest score difference (NaN
    when any value is not finite)."""
    if not scores:
        return min_cosine(got, want)
    with np.errstate(invalid="ignore"):
        return 1.0 - float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))


def warmup_batch(rows: int, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch that fills bucket (rows, width): the first row `width` tokens, the others
    shorter, ids spread over 0..pad_id (all valid: the pad token is in the vocabulary).
    Its lengths differ from the pad rows a capture runs on, so a replay that reads stale
    inputs gives other vectors."""
    lengths = np.array([max(1, width - i * width // (2 * rows)) for i in range(rows)],
                       np.int32)
    ids = (np.arange(int(lengths.sum()), dtype=np.int64) * 7919 + 11) % (pad_id + 1)
    return ids.astype(np.int32), lengths


class _Slot:
    """One bucket: its input and output buffers on the device, bound once."""

    def __init__(self, backend: SessionBackend, rows: int, width: int, graph_id: int) -> None:
        import onnxruntime as ort

        self.backend, self.rows, self.width = backend, rows, width
        device, index = backend.device_type, backend.device_id
        ids, mask = self._padded(np.zeros(0, np.int32), np.zeros(0, np.int32))
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(array, device, index)
                       for name, array in backend.feeds(ids, mask).items()}
        self.output = ort.OrtValue.ortvalue_from_shape_and_type(
            [rows] if backend.scores else [rows, backend.hidden_size], np.float32, device,
            index)
        self.binding = backend.session.io_binding()
        for name, value in self.values.items():
            self.binding.bind_ortvalue_input(name, value)
        self.binding.bind_ortvalue_output(backend.output, self.output)
        self.run_options = ort.RunOptions()
        if graph_id:
            self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def _padded(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:

        extra = self.rows - len(lengths)
        pad_id = self.backend.spec.pad_id
        all_lengths = np.concatenate([lengths, np.ones(extra, np.int32)])
        all_ids = np.concatenate([ids, np.full(extra, pad_id, np.int32)])
        return right_pad(all_ids, all_lengths, pad_id, self.backend.ids_dtype, self.width)

    def run(self, ids: np.ndarray, lengths: np.ndarray, *, eager: bool = False) -> np.ndarray:
        """Fill the buffers and run: as this bucket's graph, or (`eager`) as an ordinary
        run on the same buffers, which captures nothing."""
        padded, mask = self._padded(ids, lengths)
        self.values["input_ids"].update_inplace(padded)
        if "attention_mask" in self.values:
            self.values["attention_mask"].update_inplace(
                mask.astype(self.backend.int_type("attention_mask"), copy=False))
        options = self.backend.run_options if eager else self.run_options
        self.backend.run(self.binding, options)
        out = self.binding.copy_outputs_to_cpu()[0][:len(lengths)]
        return out[:, None] if out.ndim == 1 else out  # a reranker's scores: [B, 1]


class StaticShapes:
    """Bucketed runs on fixed bindings; with `capture`, each bucket is a CUDA graph."""

    def __init__(self, backend: SessionBackend, *, capture: bool, max_tokens: int) -> None:
        if not backend.pooled_by_graph:
            raise ModelError(f"{backend.spec.onnx_path}: CUDA graphs need a graph that pools "
                             f"inside (output sentence_embedding), not {backend.output}; "
                             "make one with `embedrpc prepare`")
        self.backend = backend
        self.capture = capture
        self.max_tokens = max_tokens
        self.slots: dict[tuple[int, int], _Slot] = {}
        self.off: str | None = None  # why graphs were turned off, once they are
        self._graph_ids = itertools.count(1)
        self.warmup_s: float | None = None
        self.warmup_buckets = 0  # made and checked at warm-up
        # Smallest replay-vs-ordinary agreement seen (agreement(): a cosine, or for a
        # reranker 1 − its largest score difference).
        self.min_agreement: float | None = None
        self.least_agreement = 1.0 - AGREE_SCORE_DIFF if backend.scores else AGREE_COSINE

    @property
    def what(self) -> str:
        return "CUDA graphs" if self.capture else "static shapes"

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "cuda_graphs" if self.capture else "static_shapes": self.off is None,
            "buckets": sorted(self.slots), "warmup_buckets": self.warmup_buckets,
            "warmup_s": None if self.warmup_s is None else round(self.warmup_s, 3),
            "min_agreement": self.min_agreement}
        if self.off is not None:
            info["graphs_off"] = self.off
        return info

    def warm(self) -> None:
        """Make and check the common buckets (warmup_shapes) before any traffic."""
        started = time.perf_counter()
        pad_id = self.backend.spec.pad_id
        for shape in warmup_shapes(self.max_tokens, self.backend.spec.max_length):
            if self.off is not None:
                break
            if shape not in self.slots:
                self._first_use(shape, *warmup_batch(*shape, pad_id))
        self.warmup_s = time.perf_counter() - started
        self.warmup_buckets = len(self.slots)
        if self.off is None:
            log.info("%s: %d buckets made and checked at warm-up in %.1fs", self.what,
                     self.warmup_buckets, self.warmup_s)
        else:
            log.warning("%s: off after %.1fs of warm-up (%s)", self.what, self.warmup_s,
                        self.off)

    def embed(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
        """[B, H] from the bucketed path, or None: the caller runs the exact shape."""
        if self.off is not None:
            return None
        shape = bucket(len(lengths), int(lengths.max()), self.max_tokens,
                       self.backend.spec.max_length)
        if shape is None:
            return None
        slot = self.slots.get(shape)
        if slot is None:
            return self._first_use(shape, ids, lengths)
        try:
            return slot.run(ids, lengths)
        except Exception as exc:
            self._turn_off(f"bucket {shape[0]}x{shape[1]} failed on replay: "
                           f"{type(exc).__name__}: {exc}", failed=True)
            return None

    def _turn_off(self, why: str, *, failed: bool) -> None:
        """From now on every batch runs with its exact shape. After a failure with
        capture on, on a new session without CUDA graphs (the old stream may be broken)."""
        self.off = why
        self.slots.clear()
        log.warning("%s: %s; running every batch with its exact shape from now on",
                    self.what, why)
        if failed and self.capture:
            self.backend.drop_cuda_graphs()
            log.warning("%s: session rebuilt without CUDA graphs", self.what)

    def _first_use(self, shape: tuple[int, int], ids: np.ndarray,
                   lengths: np.ndarray) -> np.ndarray | None:
        try:
            slot = _Slot(self.backend, *shape, next(self._graph_ids) if self.capture else 0)
            empty = np.zeros(0, np.int32)
            # An ordinary run at this shape first: ONNX Runtime's memory arena grows to what
            # the shape needs, and kernels that plan per shape (cuDNN attention) make their
            # plans, so nothing is allocated or planned while a capture is under way.
            slot.run(empty, empty, eager=True)
            for _ in range(CAPTURE_RUNS if self.capture else 0):
                slot.run(empty, empty)  # pad rows only: captured on other data than the batch
            got = slot.run(ids, lengths)
        except Exception as exc:
            self._turn_off(f"bucket {shape[0]}x{shape[1]} failed: {type(exc).__name__}: "
                           f"{exc}", failed=True)
            return None
        want = self.backend.embed_exact(ids, lengths)
        agree = agreement(got, want, self.backend.scores)
        if agree == agree:  # not NaN
            self.min_agreement = min(agree, self.min_agreement or 1.0)
        if not np.isfinite(got).all() or not agree >= self.least_agreement:
            self._turn_off(f"bucket {shape[0]}x{shape[1]} disagreed with the ordinary path "
                           f"(agreement {agree:.6f})", failed=False)
            return want
        self.slots[shape] = slot
        log.debug("bucket %dx%d ready (agreement with the ordinary path %.7f)",
                  *shape, agree)
        return got
