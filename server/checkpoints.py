"""Which directory `serve` loads: an ONNX model directory as given, or a checkpoint
(safetensors, no graph) prepared into a cached ONNX directory first.

The preparing itself is `embedrpc.prepare` (imported only when a checkpoint is
served); its progress goes to the log.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import ModelError
from .model import find_onnx, resolve_model_path

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")


def has_graph(path: Path) -> bool:
    try:
        find_onnx(path)
    except ModelError:
        return False
    return True


def serving_directory(model: str, *, onnx_file: str | None, precision: str, device: str,
                      cache_dir: str | None) -> tuple[str, Path]:
    """(name, directory to serve) for `--model`: checkpoints are prepared (or taken from
    the cache) with `precision` (auto: fp16 on a GPU, fp32 on the CPU); `device` is the
    first device the server runs on, where validation runs."""
    name, path = resolve_model_path(model, onnx_file)
    from embedrpc.prepare.cache import is_checkpoint

    if onnx_file or has_graph(path) or not is_checkpoint(path):
        if precision != "auto":
            log.warning("--precision %s applies to checkpoints only; %s has an ONNX graph, "
                        "served as it is", precision, path)
        return name, path
    from embedrpc.prepare import PrepareError
    from embedrpc.prepare.cache import default_cache_dir, prepared_checkpoint

    if precision == "auto":
        precision = "fp32" if device == "cpu" else "fp16"
    where = "cpu" if precision == "int8" or device == "cpu" else device
    try:
        return name, prepared_checkpoint(
            path, precision=precision, device=where,
            cache_dir=Path(cache_dir).expanduser() if cache_dir else default_cache_dir(),
            say=lambda message: log.info("prepare: %s", message))
    except PrepareError as exc:
        raise ModelError(f"{model}: a checkpoint, which must be prepared before it can be "
                         f"served, and preparing it failed: {exc}") from exc
