"""The event loop's end of a worker socket (server/worker/channel.py) against the blocking
multiprocessing.Connection API a worker process uses on the other end."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
from typing import Any

import numpy as np

from embedrpc.server.worker.channel import Channel
from embedrpc.server.worker.spec import Batch, Rows


def _echo(conn: Any) -> None:
    """What a worker does: conn.recv() until None, answering each message with conn.send()."""
    while (message := conn.recv()) is not None:
        conn.send(("echo", message))
    conn.close()


async def _round_trip(messages: list[Any]) -> tuple[list[Any], bool]:
    loop = asyncio.get_running_loop()
    parent, child = mp.Pipe(duplex=True)
    thread = threading.Thread(target=_echo, args=(child,), daemon=True)
    thread.start()
    received: list[Any] = []
    done = loop.create_future()
    closed = loop.create_future()

    def on_message(message: Any) -> None:
        received.append(message)
        if len(received) == len(messages) and not done.done():
            done.set_result(None)

    channel = Channel(parent, loop, on_message, lambda: closed.set_result(None))
    for message in messages:  # all at once: later ones queue behind a partial write
        channel.send(message)
    await asyncio.wait_for(done, 60)
    channel.send(None)  # the echo loop ends and closes its end: end of file here
    await asyncio.wait_for(closed, 10)
    thread.join(10)
    return received, channel.closed


def test_messages_larger_than_the_socket_buffers_arrive_whole_and_in_order() -> None:
    rng = np.random.default_rng(0)
    # 1 byte .. 8 MB: far beyond the socket's buffers, so writes and reads are partial.
    sizes = [1, 10, 1000, 65_536, 300_000, 2_000_000, 3, 50_000]
    arrays = [rng.standard_normal(n // 4 + 1).astype(np.float32) for n in sizes]
    messages: list[Any] = [("ok", i, a) for i, a in enumerate(arrays)]
    received, closed = asyncio.run(_round_trip(messages))
    assert closed
    assert [m[1][1] for m in received] == list(range(len(arrays)))
    for (kind, (status, i, got)), want in zip(received, arrays, strict=True):
        assert kind == "echo" and status == "ok"
        assert got.dtype == want.dtype and np.array_equal(got, want), i


def test_batches_and_rows_cross_as_raw_bytes_and_arrive_equal() -> None:
    """Batch and Rows pickle their arrays as raw bytes (cheaper than numpy's own
    pickling); what arrives is equal in values, dtypes and shapes."""
    rng = np.random.default_rng(1)
    batch = Batch(7, rng.integers(0, 151_669, 300, dtype=np.int32),
                  np.array([100, 150, 50], dtype=np.int32), priority=True)
    rows = rng.standard_normal((3, 1024)).astype(np.float32)
    received, _ = asyncio.run(_round_trip([batch, ("ok", 7, Rows(rows[1:]))]))
    got_batch, (status, batch_id, got_rows) = (m[1] for m in received)
    assert (got_batch.id, got_batch.priority) == (7, True)
    assert got_batch.ids.dtype == np.int32 and np.array_equal(got_batch.ids, batch.ids)
    assert np.array_equal(got_batch.lengths, batch.lengths)
    assert (status, batch_id) == ("ok", 7)
    assert got_rows.dtype == np.float32 and got_rows.shape == (2, 1024)
    assert np.array_equal(got_rows, rows[1:])


def test_many_small_messages_in_one_read() -> None:
    messages = [("ok", i, "x" * (i % 7)) for i in range(2000)]
    received, _ = asyncio.run(_round_trip(messages))
    assert [m[1] for m in received] == messages


def test_a_dead_peer_closes_the_channel_and_sending_does_not_raise() -> None:
    async def run() -> bool:
        loop = asyncio.get_running_loop()
        parent, child = mp.Pipe(duplex=True)
        closed = loop.create_future()
        channel = Channel(parent, loop, lambda m: None, lambda: closed.set_result(None))
        child.close()  # the worker died
        # Before the loop has seen end of file: the write fails (EPIPE) and closes it.
        channel.send(("ok", 1, np.zeros(1_000_000, dtype=np.float32)))
        await asyncio.wait_for(closed, 10)
        channel.send(("ok", 2, "after"))  # dropped, no error
        return channel.closed

    assert asyncio.run(run())


def test_what_a_dead_peer_sent_is_delivered_before_the_close_a_failed_write_finds() -> None:
    """A worker that answered, said what it runs next and died: the front end may write
    to its socket (EPIPE) before the loop has read those messages. They still arrive,
    in order, before on_closed: a front end that lost the worker's last words would
    blame the wrong batch for the crash (its oldest in flight, which had been answered)."""
    async def run() -> list[Any]:
        loop = asyncio.get_running_loop()
        parent, child = mp.Pipe(duplex=True)
        events: list[Any] = []
        closed = loop.create_future()

        def on_closed() -> None:
            events.append("closed")
            closed.set_result(None)

        channel = Channel(parent, loop, events.append, on_closed)
        child.send(("ok", 1, "answered"))
        child.send(("elsewhere", 0, True))
        child.close()  # the worker died; the loop has not read its socket yet
        channel.send(("ok", 2, np.zeros(1_000_000, dtype=np.float32)))  # EPIPE
        await asyncio.wait_for(closed, 10)
        return events

    assert asyncio.run(run()) == [("ok", 1, "answered"), ("elsewhere", 0, True), "closed"]
