"""What crosses the process boundary: a worker's spec, and the batches it runs.

Both the main process (server/worker/handle.py, server/router.py) and the worker
process (server/worker/process.py) import this module, so it stays light.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import DebugHooks, DeviceOptions, LogOptions


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """What a worker process needs to build its backend (pickled to the child): the serve
    options that concern workers, as given, and what the main process worked out."""

    options: DeviceOptions = field(default_factory=DeviceOptions)
    logging: LogOptions = field(default_factory=LogOptions)
    hooks: DebugHooks = field(default_factory=DebugHooks)
    onnx_path: str = ""
    device: str = "cpu"  # "cpu" or "cuda:N" (options.device is the unresolved --device)
    threads: int = 1
    # CPU: let idle intra-op threads spin-wait for work (ONNX Runtime's default). Off in
    # the server: its main process and the other workers share these cores, and threads
    # spinning while a batch waits on them took up to 3x the CPU per text under load.
    spin: bool = False
    # "embed": the graph outputs vectors [B, H]; "rerank": a Qwen3-Reranker graph that
    # outputs one score per row (`score` [B]), returned as [B, 1].
    task: str = "embed"
    pooling: str = "lasttoken"
    pad_id: int = 0
    hidden_size: int = 0
    max_length: int = 0  # the model's longest input; no CUDA-graph bucket is longer
    # Several front ends (`serve --frontends N`): the worker also listens on this Unix
    # socket, each front end connects, and batches from several front ends that are
    # waiting together run as one when they fit `merge` (tokens, rows, overhead: the
    # router's own budget, row limit and padding rule). "": only the parent's pipe.
    listen: str = ""
    merge: tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def of(cls, **values: Any) -> WorkerSpec:
        """Fields and options by name alike (tests, benchmarks): `WorkerSpec.of(device=
        "cpu", cuda_graphs=True, static_shapes=True)`."""
        groups = {"options": DeviceOptions, "logging": LogOptions, "hooks": DebugHooks}
        nested: dict[str, dict[str, Any]] = {name: {} for name in groups}
        own = {f.name for f in dataclasses.fields(cls)}
        for key in [k for k in values if k not in own]:  # `device`: the resolved one
            for name, group in groups.items():
                if key in {f.name for f in dataclasses.fields(group)}:
                    nested[name][key] = values.pop(key)
        return cls(**values, **{name: groups[name](**nested[name]) for name in groups})


@dataclass(frozen=True, slots=True)
class Batch:
    """Token ids of B texts, concatenated; row i is ids[offsets[i]:offsets[i] + lengths[i]]."""

    id: int
    ids: np.ndarray  # int32, flat
    lengths: np.ndarray  # int32, [B]
    # Holds a light client's text (one whose whole backlog is in it): the worker runs it
    # before the batches already waiting in its pipe, so a flooding client's prefetched
    # work does not stand in front of it (fair share, see router.py).
    priority: bool = False
    # A text retried after a batch it was in crashed a worker: the worker runs it by
    # itself, never merged with another front end's batch, so a poison input is found
    # alone and the texts beside it are not blamed for its crashes.
    alone: bool = False

    def __reduce__(self) -> tuple[Any, ...]:
        # Its arrays as raw bytes: pickling an ndarray the standard way cost ~5 µs each,
        # about half of what sending one small batch cost the main process.
        return (_batch, (self.id, self.ids.dtype.str, self.ids.tobytes(),
                         self.lengths.dtype.str, self.lengths.tobytes(), self.priority,
                         self.alone))


def _batch(batch_id: int, ids_type: str, ids: bytes, lengths_type: str, lengths: bytes,
           priority: bool, alone: bool = False) -> Batch:
    return Batch(batch_id, np.frombuffer(ids, ids_type), np.frombuffer(lengths, lengths_type),
                 priority, alone)


class Rows:
    """A worker's answer to a batch, [B, H], pickled as its raw bytes (see Batch); it
    unpickles as a plain read-only ndarray."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __reduce__(self) -> tuple[Any, ...]:
        a = self.array
        return (_rows, (a.dtype.str, a.shape, a.tobytes()))


def _rows(dtype: str, shape: tuple[int, ...], data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype).reshape(shape)


def right_pad(ids: np.ndarray, lengths: np.ndarray, pad_id: int,
              dtype: type = np.int64, width: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flat ids → ([B, L] ids, [B, L] attention mask), padding on the right to
    `width` (default: the longest row)."""
    width = max(width, int(lengths.max()))
    mask = np.arange(width)[None, :] < lengths[:, None]
    padded = np.full((len(lengths), width), pad_id, dtype=dtype)
    padded[mask] = ids  # row-major fill matches the concatenation order
    return padded, mask.astype(dtype)
