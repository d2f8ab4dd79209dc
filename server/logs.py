"""Logging set-up: text or one JSON object per line, with the request id of the current call.

The request id lives in a context variable: the gRPC interceptor and the HTTP
server set it for each call, and every record logged while that call runs
(in its task, or in tasks it starts) carries it, through `RequestIdFilter`.

A line repeated many times a second (a flood of refused connections, a failing
accept loop) is written at most once a second, through `RepeatFilter`: the next
copy let through says how many were left out.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

_ids = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))  # ids of its own
_request_id: ContextVar[str] = ContextVar("embedrpc_request_id", default="")


def new_request_id() -> str:
    """A fresh id for a call that brought none (32 hex digits): 128 random bits, as a
    uuid4's hex holds 122, from a generator seeded by the system at start (ids must not
    repeat, not be secret; uuid4 read the system's random source for each, ~3 µs)."""
    return f"{_ids.getrandbits(128):032x}"


def current_request_id() -> str:
    """The request id of the call being served ("" outside a call)."""
    return _request_id.get()


def set_request_id(request_id: str) -> None:
    """Tag the rest of the current task (and tasks it starts) with this request id."""
    _request_id.set(request_id)


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` (the current call's, or "") to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = _request_id.get()
        return True


class RepeatFilter(logging.Filter):
    """Lets the same line (logger, level and message) through at most once per
    `interval` seconds; the next copy let through ends with "(N more)", the copies
    left out since the last one. Thread-safe: worker supervisors log from threads."""

    def __init__(self, interval: float = 1.0, *, max_lines: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.max_lines = max_lines  # distinct lines remembered; older ones are forgotten
        self._clock = clock
        # (logger, level, message) → [when last let through, copies left out since]
        self._seen: dict[tuple[str, int, str], list[float | int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let logging report it as usual
            return True
        key = (record.name, record.levelno, message)
        now = self._clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self.interval:
                seen[1] += 1
                return False
            left_out = int(seen[1]) if seen is not None else 0
            self._seen[key] = [now, 0]
            if len(self._seen) > self.max_lines:
                self._forget(now)
        if left_out:
            record.msg, record.args = f"{message} ({left_out} more)", None
        return True

    def _forget(self, now: float) -> None:
        self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval}
        if len(self._seen) > self.max_lines:
            self._seen.clear()


class TextFormatter(logging.Formatter):
    """The plain format, with ` request_id=...` appended when a call is known."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", "")
        if request_id:
            head, sep, tail = text.partition("\n")  # keep a traceback below the line
            text = f"{head} request_id={request_id}{sep}{tail}"
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, pid,
    request_id when known, exception (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        millis = int((record.created - seconds) * 1000)
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            out["request_id"] = request_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str = "INFO", log_format: str = "text", *,
                      text_format: str = TEXT_FORMAT) -> None:
    """Send the root logger to stderr in the given format (replaces earlier handlers).

    Called once per process: by `embedrpc serve`, and by each worker process.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"--log-format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(text_format))
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)


def worker_text_format() -> str:
    return f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(message)s"


def frontend_text_format(index: int) -> str:
    return f"%(asctime)s frontend-{index}[{os.getpid()}] %(name)s %(levelname)s %(message)s"


_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:/+=@")


def clean_request_id(value: str) -> str:
    """A caller's id from a header or metadata, or "" when it is not 1..128 plain
    characters (letters, digits, -_.:/+=@): it goes back out in headers and logs."""
    if 0 < len(value) <= 128 and all(c in _ID_CHARS for c in value):
        return value
    return ""
