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
  [rows, H] on the device and nothing else is copied back;
- batches over `max_tokens` padded tokens run with their exact shape: there the
  kernels are long and launch overhead is small beside them.

Every bucket is checked once, when it is first used: it runs once ordinarily (the
memory arena grows to the shape), then on pad rows (the capture), then on the real
batch (a replay), and the replay must agree with the
ordinary path on that batch. A replay that reads stale inputs, or any other
disagreement, turns graphs off for this worker with a warning; the batch is
answered by the ordinary path. With `capture` off (the CPU provider has no
graphs) the same bucketed path runs with fixed bindings, which is what the CPU
tests check against the reference.
"""

from __future__ import annotations

import itertools
import logging
from bisect import bisect_left
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ModelError

if TYPE_CHECKING:
    from .worker import OrtBackend

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
LENGTH_BUCKETS = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# The replay must agree with the ordinary path on the same batch: the same kernels
# on the same data, except padding to the bucket (fp16 rounding differs a little).
AGREE_COSINE = 0.9995
CAPTURE_RUNS = 3  # ONNX Runtime may run a graph id normally a few times before capturing


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


class _Slot:
    """One bucket: its input and output buffers on the device, bound once."""

    def __init__(self, backend: OrtBackend, rows: int, width: int, graph_id: int) -> None:
        import onnxruntime as ort

        self.backend, self.rows, self.width = backend, rows, width
        device, index = backend.device_type, backend.device_id
        ids, mask = self._padded(np.zeros(0, np.int32), np.zeros(0, np.int32))
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(array, device, index)
                       for name, array in backend.feeds(ids, mask).items()}
        self.output = ort.OrtValue.ortvalue_from_shape_and_type(
            [rows, backend.hidden_size], np.float32, device, index)
        self.binding = backend.session.io_binding()
        for name, value in self.values.items():
            self.binding.bind_ortvalue_input(name, value)
        self.binding.bind_ortvalue_output(backend.output, self.output)
        self.run_options = ort.RunOptions()
        if graph_id:
            self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def _padded(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from .worker import right_pad

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
        self.backend.session.run_with_iobinding(self.binding, options)
        return self.binding.copy_outputs_to_cpu()[0][:len(lengths)]


class StaticShapes:
    """Bucketed runs on fixed bindings; with `capture`, each bucket is a CUDA graph."""

    def __init__(self, backend: OrtBackend, *, capture: bool, max_tokens: int) -> None:
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

    def describe(self) -> dict[str, Any]:
        return {"cuda_graphs" if self.capture else "static_shapes": self.off is None,
                "buckets": sorted(self.slots)}

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
        return slot.run(ids, lengths)

    def _first_use(self, shape: tuple[int, int], ids: np.ndarray,
                   lengths: np.ndarray) -> np.ndarray | None:
        what = "CUDA graphs" if self.capture else "static shapes"
        try:
            slot = _Slot(self.backend, *shape, next(self._graph_ids) if self.capture else 0)
            empty = np.zeros(0, np.int32)
            # An ordinary run at this shape first: ONNX Runtime's memory arena grows to what
            # the shape needs, so nothing is allocated while a capture is under way.
            slot.run(empty, empty, eager=True)
            for _ in range(CAPTURE_RUNS if self.capture else 0):
                slot.run(empty, empty)  # pad rows only: captured on other data than the batch
            got = slot.run(ids, lengths)
        except Exception as exc:
            self.off = f"bucket {shape[0]}x{shape[1]} failed: {type(exc).__name__}: {exc}"
            log.warning("%s: %s; running every batch with its exact shape from now on",
                        what, self.off)
            return None
        want = self.backend.embed_exact(ids, lengths)
        cosine = float(np.min(np.sum(got * want, 1) / np.maximum(
            np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1), 1e-30)))
        if not np.isfinite(got).all() or not cosine >= AGREE_COSINE:
            self.off = (f"bucket {shape[0]}x{shape[1]} disagreed with the ordinary path "
                        f"(min cosine {cosine:.6f})")
            log.warning("%s: %s; running every batch with its exact shape from now on",
                        what, self.off)
            return want
        self.slots[shape] = slot
        log.debug("bucket %dx%d ready (min cosine to the ordinary path %.7f)",
                  *shape, cosine)
        return got
