"""examples/node's npm packages for the tests (Node client, buf), installed on demand.

examples/node/node_modules is used when it is there (`npm ci --prefix examples/node`);
otherwise `npm ci` installs the locked versions once into a cache folder keyed by the
lock file, so the README's plain `pytest` needs no extra step. Without node/npm, or when
the npm registry cannot be reached, the callers skip with the reason.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NODE_CLIENT = ROOT / "examples" / "node"


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "embedrpc-tests"


@functools.cache
def node_modules() -> tuple[Path | None, str]:
    """(node_modules folder, "") or (None, why it is missing)."""
    local = NODE_CLIENT / "node_modules"
    if (local / "@grpc" / "grpc-js").is_dir():
        return local, ""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        return None, "node and npm are not installed"
    lock = (NODE_CLIENT / "package-lock.json").read_bytes()
    key = hashlib.sha256(lock + (NODE_CLIENT / "package.json").read_bytes()).hexdigest()[:16]
    prefix = _cache_root() / f"node-{key}"
    installed = prefix / "node_modules"
    if (installed / "@grpc" / "grpc-js").is_dir():
        return installed, ""
    prefix.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(NODE_CLIENT / name, prefix / name)
    try:
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--prefix", str(prefix)],
                                capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return None, "npm ci timed out (is the npm registry reachable?)"
    if result.returncode != 0:
        shutil.rmtree(installed, ignore_errors=True)
        return None, f"npm ci failed: {result.stderr.strip()[-500:]}"
    return installed, ""


def buf_binary() -> tuple[Path | None, str]:
    """The buf CLI locked by examples/node (npm @bufbuild/buf), else one on PATH, or why
    there is none."""
    modules, why = node_modules()
    if modules is not None and (modules / ".bin" / "buf").exists():
        return modules / ".bin" / "buf", ""
    found = shutil.which("buf")
    if found:
        return Path(found), ""
    return None, why or "no buf binary in node_modules (none for this platform?) nor on PATH"
