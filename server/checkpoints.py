"""Which directory `serve` loads: an ONNX model directory as given, or a checkpoint
(safetensors, no graph) prepared into a cached ONNX directory first.

The preparing itself is `embedrpc.prepare` (imported only when a checkpoint is
served); its progress goes to the log.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import ModelError
from .model import BUNDLED, find_onnx, resolve_model_path
from .tasks import model_task

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")


def has_graph(path: Path) -> bool:
    try:
        find_onnx(path)
    except ModelError:
        return False
    return True


def serving_directory(model: str, *, onnx_file: str | None, precision: str, device: str,
                      cache_dir: str | None, task: str = "auto") -> tuple[str, Path, str]:
    """(name, directory to serve, task) for one `--model`: checkpoints are prepared (or
    taken from the cache) with `precision` (auto: fp16 on a GPU, fp32 on the CPU) for
    `task` (auto: embedrpc.server.tasks decides, a hub id's "reranker" included);
    `device` is the first device the server runs on, where validation runs. The task is
    what the served directory is: a prepared one records it."""
    name, path = resolve_model_path(model, onnx_file)
    # The hub id, when `model` is one: a hub snapshot's own directory is a commit hash.
    hub_id = None if model in BUNDLED or Path(model).expanduser().is_dir() else model
    from embedrpc.prepare.cache import is_checkpoint

    if onnx_file or has_graph(path) or not is_checkpoint(path):
        if precision != "auto":
            log.warning("--precision %s applies to checkpoints only; %s has an ONNX graph, "
                        "served as it is", precision, path)
        return name, path, model_task(path, name=hub_id, task=task)
    from embedrpc.prepare import PrepareError
    from embedrpc.prepare.cache import default_cache_dir, prepared_checkpoint

    if precision == "auto":
        precision = "fp32" if device == "cpu" else "fp16"
    if precision == "bf16" and device == "cpu":
        raise ModelError(f"{model}: --precision bf16 runs on a GPU only (ONNX Runtime's CPU "
                         "provider has no bf16 MatMul); on the CPU use --precision fp32 "
                         "(exact) or int8 (fastest)")
    where = "cpu" if precision == "int8" or device == "cpu" else device
    try:
        directory = prepared_checkpoint(
            path, precision=precision, device=where,
            cache_dir=Path(cache_dir).expanduser() if cache_dir else default_cache_dir(),
            say=lambda message: log.info("prepare: %s", message), task=task, name=hub_id)
    except PrepareError as exc:
        raise ModelError(f"{model}: a checkpoint, which must be prepared before it can be "
                         f"served, and preparing it failed: {exc}") from exc
    return name, directory, model_task(directory)
