"""Which devices the workers run on: `--device` → ["cpu"] or ["cuda:0", ...].

Counting GPUs asks the CUDA driver directly (no framework import), so `prepare`,
the tests and the server can all ask cheaply.
"""

from __future__ import annotations

import ctypes
import logging
import os

from .errors import ModelError

log = logging.getLogger(__name__)


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
