"""The event loop's end of one worker's socket (no thread between them).

Messages are pickled and framed as multiprocessing.Connection frames them (what the
worker's conn.recv/conn.send use), so the worker side stays plain multiprocessing.
A batch is written without blocking (what the socket cannot take yet goes out when
it becomes writable); replies are read when it becomes readable.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

# Framing of multiprocessing.Connection (what the worker's conn.recv/conn.send use):
# a big-endian int32 length, or -1 followed by a uint64 length for huge messages.
_LEN32 = struct.Struct("!i")
_LEN64 = struct.Struct("!Q")
_READ_CHUNK = 256 << 10


class Channel:
    """The loop's end of one worker's socket: pickled messages, framed as
    multiprocessing.Connection frames them, sent and received without blocking."""

    def __init__(self, conn: Any, loop: asyncio.AbstractEventLoop,
                 on_message: Callable[[Any], None], on_closed: Callable[[], None]) -> None:
        self._conn = conn  # owns the file descriptor
        self._fd: int = conn.fileno()
        self._loop = loop
        self._on_message = on_message
        self._on_closed = on_closed
        self._inbuf = bytearray()
        self._chunk = bytearray(_READ_CHUNK)  # reused: no allocation per read
        self._outbuf: deque[memoryview] = deque()
        self._writing = False  # a writer callback is registered
        self.closed = False
        os.set_blocking(self._fd, False)
        loop.add_reader(self._fd, self._readable)

    def send(self, obj: Any) -> None:
        if self.closed:
            return  # the worker is gone; the supervisor reports it
        # Plain pickle: nothing sent here needs ForkingPickler's reducers (descriptors,
        # connections), and its per-call set-up cost more than small batches' pickling.
        payload = memoryview(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)).cast("B")
        n = len(payload)
        header = _LEN32.pack(n) if n <= 0x7FFFFFFF else _LEN32.pack(-1) + _LEN64.pack(n)
        if self._outbuf:  # behind what the socket could not take yet: in its turn
            self._outbuf.append(memoryview(header))
            self._outbuf.append(payload)
            return
        try:  # the usual case: the socket takes all of it at once
            sent = os.writev(self._fd, (header, payload))
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the worker died: its batches fail through the supervisor
            self._broken()
            return
        if sent == len(header) + n:
            return
        if sent < len(header):
            self._outbuf.append(memoryview(header)[sent:])
            self._outbuf.append(payload)
        else:
            self._outbuf.append(payload[sent - len(header):])
        self._writing = True
        self._loop.add_writer(self._fd, self._flush)

    def _flush(self) -> None:
        while self._outbuf:
            try:
                sent = os.writev(self._fd, list(self._outbuf)[:64])
            except (BlockingIOError, InterruptedError):
                return  # the writer callback (added by send) resumes here
            except OSError:  # the worker died: its batches fail through the supervisor
                self._broken()
                return
            while sent:
                head = self._outbuf[0]
                if sent >= len(head):
                    sent -= len(head)
                    self._outbuf.popleft()
                else:
                    self._outbuf[0] = head[sent:]
                    sent = 0
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _broken(self) -> None:
        """A write failed: the worker is gone. What it sent before it went still counts
        (answers, and what it said of the batch it ran last, by which a crash is blamed on
        the right batch): read all of it, then close."""
        self._outbuf.clear()
        self.read_available()  # to end of file, which closes the channel
        self.close()  # in case the socket would block instead

    def _readable(self) -> None:
        self.read_available(once=True)

    def read_available(self, *, once: bool = False) -> None:
        """Read what has arrived and hand over every complete message (until the socket
        would block, or after one read with `once`); end of file closes the channel."""
        while not self.closed:
            try:
                n = os.readv(self._fd, [self._chunk])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = 0
            if not n:
                self.close()
                return
            with memoryview(self._chunk) as view, view[:n] as data:
                self._inbuf += data
            self._deliver()
            if once:
                return

    def _deliver(self) -> None:
        buf = self._inbuf
        while len(buf) >= 4:
            (n,) = _LEN32.unpack_from(buf)
            start = 4
            if n == -1:
                if len(buf) < 12:
                    return
                (n,) = _LEN64.unpack_from(buf, 4)
                start = 12
            if len(buf) < start + n:
                return
            with memoryview(buf) as view, view[start:start + n] as body:
                message = pickle.loads(body)
            del buf[:start + n]
            self._on_message(message)
            if self.closed:
                return

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._outbuf.clear()
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        self._conn.close()
        self._on_closed()
