"""Checkpoints given straight to `embedrpc serve`: prepared once, reused on every start.

A Hugging Face checkpoint directory (config.json + safetensors, as
`Qwen/Qwen3-Embedding-0.6B` downloads) has no ONNX graph. `serve` builds one with
the prepare pipeline into a cache directory named by a key of

    what the checkpoint holds (every file prepare reads, by content),
    the precision, the graph builder's version and embedrpc's,
    the task when it is not embedding (a reranker's graph ends in a score),

so the next start, or another replica sharing the cache, finds it and starts at
once, and an edited checkpoint is prepared again. Content digests of large files
are remembered by (path, size, mtime) so a restart does not read gigabytes again.
Two processes preparing the same key take turns on a lock file; the second finds
the first one's result.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import PrepareError

# Bump when prepare's output for the same checkpoint and precision changes in a way a
# version number would not show (e.g. a development build).
FORMAT = 1
INFO_FILE = "embedrpc_prepared.json"
_WEIGHT_SUFFIXES = {".safetensors"}
# Files in a checkpoint directory that prepare does not read (other formats' weights).
_IGNORED_SUFFIXES = {".bin", ".pt", ".pth", ".onnx", ".onnx_data", ".data", ".msgpack", ".h5",
                     ".ot", ".gguf", ".lock", ".incomplete"}
_IGNORED_DIRS = {".git", ".cache", "onnx", "openvino", ".huggingface"}


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/embedrpc, else ~/.cache/embedrpc."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "embedrpc"


def is_checkpoint(path: Path) -> bool:
    """A Hugging Face checkpoint: config.json and safetensors weights."""
    return (path / "config.json").is_file() and (
        (path / "model.safetensors.index.json").is_file()
        or any(p.suffix in _WEIGHT_SUFFIXES for p in path.iterdir() if p.is_file()))


def _checkpoint_files(source: Path) -> list[Path]:
    files = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if any(part in _IGNORED_DIRS for part in rel.parts[:-1]) or not path.is_file():
            continue
        if path.suffix in _IGNORED_SUFFIXES or rel.name.startswith("."):
            continue
        files.append(path)
    return files


def _file_digest(path: Path, memo: dict[str, list], say: Callable[[str], None]) -> str:
    real = path.resolve()
    stat = real.stat()
    seen = memo.get(str(real))
    if seen and seen[0] == stat.st_size and seen[1] == stat.st_mtime_ns:
        return str(seen[2])
    if stat.st_size > 256 << 20:
        say(f"hashing {path.name} ({stat.st_size / 1e9:.1f} GB, once)")
    with real.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    memo[str(real)] = [stat.st_size, stat.st_mtime_ns, digest]
    return digest


def checkpoint_key(source: Path, precision: str, cache_dir: Path,
                   say: Callable[[str], None] = lambda _: None, task: str = "embed") -> str:
    """The cache key: content of the checkpoint's files, precision, builder and embedrpc
    versions, and the task unless it is "embed" (so embedding keys stay as they were)."""
    from embedrpc import __version__

    from .builder import BUILDER_VERSION

    memo_path = cache_dir / "digests.json"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    whole = hashlib.sha256()
    whole.update(f"embedrpc {__version__} builder {BUILDER_VERSION} format {FORMAT} "
                 f"precision {precision}\n".encode())
    if task != "embed":
        whole.update(f"task {task}\n".encode())
    for path in _checkpoint_files(source):
        rel = path.relative_to(source).as_posix()
        whole.update(f"{rel} {_file_digest(path, memo, say)}\n".encode())
    with contextlib.suppress(OSError):  # a read-only cache still works, only slower
        tmp = memo_path.with_name(f".digests.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo), encoding="utf-8")
        tmp.replace(memo_path)
    return whole.hexdigest()[:20]


@contextlib.contextmanager
def _locked(path: Path, say: Callable[[str], None]) -> Iterator[None]:
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another process is preparing this model ({path.name}); waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepared_checkpoint(source: Path, *, precision: str, device: str, cache_dir: Path,
                        say: Callable[[str], None], reference: bool = True,
                        task: str = "auto", name: str | None = None) -> Path:
    """The prepared model directory for checkpoint `source`: from the cache when it is
    there, else built now (progress through `say`) and kept there.

    task: "embed", "rerank", or "auto" (embedrpc.server.tasks.model_task decides; `name`
    is the hub id `source` was downloaded as, whose "reranker" counts where the
    snapshot's directory name cannot). The prepared directory records the task."""
    from .pipeline import PrepareConfig, prepare, source_task

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrepareError(f"cache directory {cache_dir}: {exc} (set --cache-dir or "
                           "EMBEDRPC_CACHE_DIR to a writable directory)") from exc
    task = source_task(name or str(source), source, task)
    key = checkpoint_key(source, precision, cache_dir, say, task=task)
    entry = f"{_safe(source.name)}-{precision}{'-rerank' if task == 'rerank' else ''}-{key}"
    target = cache_dir / "prepared" / entry
    if (target / INFO_FILE).is_file():
        say(f"using the prepared {precision} graph in {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / "prepared" / f".{entry}.lock", say):
        if (target / INFO_FILE).is_file():  # the process we waited for made it
            say(f"using the prepared {precision} graph in {target}")
            return target
        for stale in target.parent.glob(f".{entry}.partial-*"):  # a run that was killed
            shutil.rmtree(stale, ignore_errors=True)
        say(f"{source} is a checkpoint without an ONNX graph: preparing it ({precision}, "
            f"validated on {device}) into {target}; the next start reuses it")
        started = time.perf_counter()
        prepare(PrepareConfig(model=str(source), out=target, precision=precision,
                              device=device, force=True, reference=reference, task=task),
                say=say)
        say(f"prepared in {time.perf_counter() - started:.0f}s")
    return target


def _safe(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return cleaned.strip("._")[:60] or "model"
