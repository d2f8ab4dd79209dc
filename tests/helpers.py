"""Helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any

EMBEDRPC = [sys.executable, "-m", "embedrpc"]
SERVING = re.compile(r"serving \S+ on \S+:(\d+)")


def start_server(*args: str, env: dict[str, str] | None = None,
                 **popen: Any) -> tuple[subprocess.Popen, str]:
    """`embedrpc serve` in a process on 127.0.0.1, any free port; returns (process,
    target) once it serves. Its log keeps being read (the last 200 lines are in
    `proc.log_tail`), so a chatty server never blocks on a full pipe."""
    proc = subprocess.Popen([*EMBEDRPC, "serve", "--host", "127.0.0.1", "--port", "0",
                             "--device", "cpu", *args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, **popen)
    assert proc.stderr is not None
    deadline = time.monotonic() + 90
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if match := SERVING.search(line):
            tail: deque[str] = deque(seen, maxlen=200)
            reader = threading.Thread(target=tail.extend, args=(proc.stderr,), daemon=True)
            reader.start()
            proc.log_tail = tail  # type: ignore[attr-defined]
            proc.log_reader = reader  # type: ignore[attr-defined]
            return proc, f"127.0.0.1:{match.group(1)}"
    proc.kill()
    raise AssertionError("server did not start:\n" + "".join(seen))


def server_log(proc: subprocess.Popen) -> str:
    """What a process from start_server logged (its last 200 lines), once it exited."""
    proc.wait(30)
    proc.log_reader.join(10)  # type: ignore[attr-defined]
    return "".join(proc.log_tail)  # type: ignore[attr-defined]
