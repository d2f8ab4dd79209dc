"""Router units against a fake async worker: no processes, no model, milliseconds each.

The fake stands in for WorkerHandle (the router touches `failed`, `free_slots` and
`submit`). Its vector for a text with ids `a` is the formula

    [len(a), sum(a), a[0], a[-1]]

so every expected result is computed here, text by text, from the request alone.
All values stay below 2**24, where float32 holds integers exactly: results are
compared with tolerance 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest

from embedrpc.server.errors import (
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    Unavailable,
    WorkerFailed,
)
from embedrpc.server.router import MAX_ATTEMPTS, BatchConfig, Router
from embedrpc.server.worker.handle import WorkerCrashed
from embedrpc.server.worker.spec import Batch

HIDDEN = 4
POISON = 99_999  # a token id that crashes the fake worker whenever a batch holds it
BAD = 88_888  # a token id that makes the fake worker raise a plain exception


def formula(ids: np.ndarray) -> np.ndarray:
    return np.array([len(ids), ids.sum(), ids[0], ids[-1]], dtype=np.float32)


def expected(texts: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack([formula(a) for a in texts])


def request(tag: int, lengths: Sequence[int]) -> list[np.ndarray]:
    """Texts whose first id names them: tag * 10_000 + index * 100 (lengths < 100)."""
    return [np.arange(length, dtype=np.int32) + tag * 10_000 + i * 100
            for i, length in enumerate(lengths)]


def tag_of(row: np.ndarray) -> tuple[int, int]:
    return int(row[0]) // 10_000, int(row[0]) % 10_000 // 100


@dataclass
class Seen:
    """One batch as the fake worker received it."""

    rows: list[np.ndarray]
    at: float  # time.monotonic() of submit
    outcome: str = "pending"  # ok | crash | error | pending
    priority: bool = False

    @property
    def padded(self) -> int:
        return len(self.rows) * max(len(r) for r in self.rows)

    def holds(self, tag: int) -> bool:
        return any(tag_of(r)[0] == tag for r in self.rows)


@dataclass
class FakeWorker:
    slots: int = 2
    delay_s: float = 0.0  # resolve each batch this long after submit
    hold: bool = False  # keep batches pending until release()
    crash_first: int = 0  # crash (WorkerCrashed) this many batches, then behave
    wrong_shape: bool = False  # return [B, HIDDEN - 1]
    error: Exception = field(default_factory=lambda: RuntimeError("boom"))
    failed: bool = False
    extra_slot: bool = True  # the priority slot for light clients' batches
    restarts: int = 0
    info: dict[str, Any] = field(default_factory=lambda: {"hidden_size": HIDDEN})
    on_change: Callable[[], None] = lambda: None
    seen: list[Seen] = field(default_factory=list)
    _pending: list[tuple[Seen, asyncio.Future[np.ndarray]]] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return not self.failed

    @property
    def free_slots(self) -> int:
        return self.slots - len(self._pending) if self.alive else 0

    @property
    def free_priority_slot(self) -> bool:  # as WorkerHandle: one more, for priority only
        return (self.extra_slot and self.alive and len(self._pending) <= self.slots
                and not any(seen.priority for seen, _ in self._pending))

    def submit(self, batch: Batch) -> asyncio.Future[np.ndarray]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        rows = np.split(batch.ids, np.cumsum(batch.lengths)[:-1])
        seen = Seen(rows=[r.copy() for r in rows], at=time.monotonic(), priority=batch.priority)
        self.seen.append(seen)
        self._pending.append((seen, future))
        if not self.hold:
            loop.call_later(self.delay_s, self._finish, seen, future)
        return future

    def release(self, *, hold: bool = False) -> None:
        self.hold = hold
        for seen, future in list(self._pending):
            self._finish(seen, future)

    def _finish(self, seen: Seen, future: asyncio.Future[np.ndarray]) -> None:
        self._pending = [p for p in self._pending if p[1] is not future]
        flat = np.concatenate(seen.rows)
        if self.crash_first > 0 or POISON in flat:
            self.crash_first = max(self.crash_first - 1, 0)
            seen.outcome = "crash"
            future.set_exception(WorkerCrashed("fake worker died"))
        elif BAD in flat:
            seen.outcome = "error"
            future.set_exception(self.error)
        else:
            seen.outcome = "ok"
            vectors = expected(seen.rows)
            future.set_result(vectors[:, :-1] if self.wrong_shape else vectors)
        self.on_change()  # as WorkerHandle does when a slot frees


@contextlib.asynccontextmanager
async def running(workers: Sequence[FakeWorker], **config: Any) -> AsyncIterator[Router]:
    router = Router(workers, BatchConfig(**config), HIDDEN)  # type: ignore[arg-type]
    for worker in workers:
        worker.on_change = router.wake
    router.start()
    try:
        yield router
    finally:
        await router.close()


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    # A router bug must fail the test, not hang it.
    asyncio.run(asyncio.wait_for(main(), timeout=5))


async def until(condition: Callable[[], bool], timeout: float = 1.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.001)


def exact(actual: np.ndarray, texts: Sequence[np.ndarray]) -> None:
    np.testing.assert_allclose(actual, expected(texts), rtol=0, atol=0)


# -- order, budgets, sorting -------------------------------------------------


def test_order_kept_across_many_batches_and_workers() -> None:
    rng = np.random.default_rng(1)
    texts = request(1, rng.integers(1, 21, size=40).tolist())
    workers = [FakeWorker(delay_s=0.001), FakeWorker(delay_s=0.001)]

    async def main() -> None:
        async with running(workers, max_batch_tokens=32, max_batch_size=4) as router:
            out = await router.embed(texts)
        assert out.shape == (40, HIDDEN)
        exact(out, texts)

    run(main)
    assert all(w.seen for w in workers), "the work did not spread over both workers"
    batches = [s for w in workers for s in w.seen]
    assert len(batches) >= 10  # 40 texts, at most 4 rows each
    # Every text reached a worker exactly once.
    assert sorted(tag_of(r) for s in batches for r in s.rows) == [(1, i) for i in range(40)]


@pytest.mark.parametrize("lengths", [
    pytest.param(np.random.default_rng(2).integers(1, 33, size=60).tolist(), id="mixed"),
    pytest.param([1] * 23, id="short-rows-hit-max-batch-size"),
    pytest.param([32, *([3] * 10), 32, 31], id="texts-at-the-budget"),
])
def test_batches_respect_token_budget_and_row_limit(lengths: list[int]) -> None:
    budget, max_rows = 32, 5
    texts = request(1, lengths)
    worker = FakeWorker()

    async def main() -> None:
        async with running([worker], max_batch_tokens=budget, max_batch_size=max_rows,
                           batch_overhead_tokens=10**6) as router:
            exact(await router.embed(texts), texts)

    run(main)
    for seen in worker.seen:
        assert len(seen.rows) <= max_rows
        assert seen.padded <= budget, [len(r) for r in seen.rows]
        if any(len(r) == budget for r in seen.rows):
            assert len(seen.rows) == 1  # a text of exactly the budget goes alone


def test_length_sorting_pads_less_than_fifo() -> None:
    budget, max_rows = 64, 8
    lengths = [2, 30] * 8
    texts = request(1, lengths)
    worker = FakeWorker()

    async def main() -> None:
        async with running([worker], max_batch_tokens=budget, max_batch_size=max_rows,
                           batch_overhead_tokens=10**6) as router:
            exact(await router.embed(texts), texts)

    run(main)

    # The cut a FIFO batcher would make: input order, the same two limits.
    fifo: list[list[int]] = [[]]
    for n in lengths:
        rows = fifo[-1]
        if rows and (len(rows) >= max_rows or (len(rows) + 1) * max(*rows, n) > budget):
            fifo.append(rows := [])
        rows.append(n)
    fifo_padded = sum(len(b) * max(b) for b in fifo)
    sorted_padded = sum(s.padded for s in worker.seen)
    real = sum(lengths)
    assert fifo_padded == 8 * 2 * 30  # [2, 30] pairs: 480 padded for 256 real tokens
    assert sorted_padded < fifo_padded
    # Sorted, the eight 2-token texts share one batch and the 30s pair up: no padding.
    assert sorted_padded == real


@pytest.mark.parametrize(("overhead", "expected_rows"), [
    # Four 2-token texts, then a 30-token one: adding it pads the four by 4 * 28 = 112.
    (111, [[2, 2, 2, 2], [30]]),  # 112 > 111: padding costs more than a batch
    (112, [[2, 2, 2, 2, 30]]),  # 112 <= 112: one batch
    (0, [[2, 2, 2, 2], [30]]),
])
def test_window_split_where_padding_costs_more_than_a_batch(
        overhead: int, expected_rows: list[list[int]]) -> None:
    texts = request(1, [30, 2, 2, 2, 2])
    worker = FakeWorker(slots=1, hold=True)

    async def main() -> None:
        async with running([worker], batch_overhead_tokens=overhead) as router:
            task = asyncio.create_task(router.embed(texts))
            await until(lambda: len(worker.seen) == 1)
            while not task.done():
                worker.release(hold=True)
                await asyncio.sleep(0.001)
            exact(task.result(), texts)

    run(main)
    assert sorted(sorted(len(r) for r in s.rows) for s in worker.seen) == sorted(expected_rows)


# -- dropping entries: cancel, deadline ----------------------------------------


def test_cancelled_request_never_reaches_a_worker() -> None:
    worker = FakeWorker(slots=1, hold=True)
    first, cancelled, later = request(1, [3]), request(2, [3, 4, 5]), request(3, [2, 6])

    async def main() -> None:
        async with running([worker]) as router:
            a = asyncio.create_task(router.embed(first))
            await until(lambda: len(worker.seen) == 1)  # the only slot is taken
            b = asyncio.create_task(router.embed(cancelled))
            await until(lambda: router.queued_tokens == 12)
            b.cancel()
            with pytest.raises(asyncio.CancelledError):
                await b
            worker.release()
            exact(await a, first)
            exact(await router.embed(later), later)
            assert router.queued_tokens == 0

    run(main)
    assert not any(s.holds(2) for s in worker.seen)


def test_past_deadline_is_refused_without_reaching_a_worker() -> None:
    worker = FakeWorker()

    async def main() -> None:
        async with running([worker]) as router:
            with pytest.raises(DeadlineExceeded) as info:
                await router.embed(request(1, [3, 4]), deadline=time.monotonic() - 0.001)
            assert info.value.grpc_code == grpc.StatusCode.DEADLINE_EXCEEDED

    run(main)
    assert worker.seen == []


def test_deadline_passing_while_queued() -> None:
    worker = FakeWorker(slots=1, hold=True)
    first, late = request(1, [3]), request(2, [4, 5])

    async def main() -> None:
        async with running([worker]) as router:
            a = asyncio.create_task(router.embed(first))
            await until(lambda: len(worker.seen) == 1)
            b = asyncio.create_task(router.embed(late, deadline=time.monotonic() + 0.01))
            await asyncio.sleep(0.02)
            worker.release()
            exact(await a, first)
            with pytest.raises(DeadlineExceeded):
                await b

    run(main)
    assert not any(s.holds(2) for s in worker.seen)


# -- overload ------------------------------------------------------------------


def test_full_queue_refuses_at_once() -> None:
    worker = FakeWorker(slots=1, hold=True)
    first = request(1, [4, 4, 4])  # one row per batch: 8 tokens stay queued

    async def main() -> None:
        async with running([worker], max_batch_size=1, max_queue_tokens=12) as router:
            a = asyncio.create_task(router.embed(first))
            await until(lambda: len(worker.seen) == 1)
            assert router.queued_tokens == 8
            # 8 + 5 > 12. The worker is held, so a queued request would time out instead.
            with pytest.raises(Overloaded) as info:
                await asyncio.wait_for(router.embed(request(2, [5])), timeout=0.5)
            assert info.value.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
            worker.release()
            exact(await a, first)

    run(main)
    assert not any(s.holds(2) for s in worker.seen)


def test_a_request_larger_than_the_whole_queue_is_refused() -> None:
    # One request may take at most --max-queue-tokens (a RerankBatch that repeats long
    # queries per document could otherwise queue 30 times the limit at once, locking
    # every other client out for minutes). At the bound, on an empty queue, it gets in.
    worker = FakeWorker()
    at_bound, over = request(1, [4, 3, 3]), request(2, [4, 4, 3])  # 10 and 11 tokens

    async def main() -> None:
        async with running([worker], max_queue_tokens=10) as router:
            exact(await router.embed(at_bound), at_bound)
            with pytest.raises(InvalidInput, match=r"this request is 11 tokens, more than "
                               r"the whole queue may hold \(--max-queue-tokens 10\); send "
                               r"it as smaller requests") as info:
                await router.embed(over)
            assert info.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT

    run(main)


# -- worker failures -----------------------------------------------------------


def test_crashed_batch_is_retried_alone() -> None:
    worker = FakeWorker(crash_first=1)
    texts = request(1, [3, 4, 5, 6, 7, 8])

    async def main() -> None:
        async with running([worker], max_batch_size=3) as router:
            exact(await router.embed(texts), texts)

    run(main)
    crashed = worker.seen[0]
    assert crashed.outcome == "crash" and len(crashed.rows) == 3
    for row in crashed.rows:
        retries = [s for s in worker.seen[1:] if any(tag_of(r) == tag_of(row) for r in s.rows)]
        assert [len(s.rows) for s in retries] == [1]
        assert retries[0].outcome == "ok"


def test_poison_text_fails_its_request_only() -> None:
    poisoned = [*request(1, [3]), np.array([5, POISON, 7], dtype=np.int32), *request(1, [4])]
    other = request(2, [2, 3, 4, 5, 6])
    workers = [FakeWorker(), FakeWorker()]

    async def main() -> None:
        async with running(workers, max_batch_size=4) as router:
            bad, good = await asyncio.gather(router.embed(poisoned), router.embed(other),
                                             return_exceptions=True)
        assert isinstance(bad, WorkerFailed) and not isinstance(bad, WorkerCrashed)
        assert bad.grpc_code == grpc.StatusCode.INTERNAL
        assert isinstance(good, np.ndarray)
        exact(good, other)

    run(main)
    hits = [s for w in workers for s in w.seen if any(POISON in r for r in s.rows)]
    hits.sort(key=lambda s: s.at)
    assert len(hits) == MAX_ATTEMPTS
    assert all(s.outcome == "crash" for s in hits)
    assert all(len(s.rows) == 1 for s in hits[1:])  # after the first crash it goes alone


def test_worker_exception_fails_only_its_batch() -> None:
    worker = FakeWorker()
    broken = request(1, [3, 4])
    broken[1][1] = BAD
    fine = request(2, [5, 6])

    async def main() -> None:
        async with running([worker], max_batch_size=1) as router:
            bad, good = await asyncio.gather(router.embed(broken), router.embed(fine),
                                             return_exceptions=True)
        assert isinstance(bad, WorkerFailed)
        assert bad.grpc_code == grpc.StatusCode.INTERNAL
        assert "boom" in str(bad)
        assert isinstance(good, np.ndarray)
        exact(good, fine)

    run(main)
    assert [s.outcome for s in worker.seen].count("error") == 1  # not retried


def test_worker_exception_fails_every_request_in_the_batch() -> None:
    worker = FakeWorker(slots=1, hold=True)
    first, broken, neighbour, after = (request(1, [3]), request(2, [3]), request(3, [3]),
                                       request(4, [3]))
    broken[0][2] = BAD

    async def main() -> None:
        async with running([worker]) as router:
            a = asyncio.create_task(router.embed(first))
            await until(lambda: len(worker.seen) == 1)
            b = asyncio.create_task(router.embed(broken))
            c = asyncio.create_task(router.embed(neighbour))
            await until(lambda: router.queued_tokens == 6)
            worker.release()
            results = await asyncio.gather(a, b, c, return_exceptions=True)
            exact(results[0], first)
            assert isinstance(results[1], WorkerFailed)
            assert isinstance(results[2], WorkerFailed)
            exact(await router.embed(after), after)

    run(main)
    shared = worker.seen[1]
    assert shared.outcome == "error" and shared.holds(2) and shared.holds(3)


def test_wrong_shaped_result_fails_the_request() -> None:
    worker = FakeWorker(wrong_shape=True)

    async def main() -> None:
        async with running([worker]) as router:
            with pytest.raises(WorkerFailed, match="returned"):
                await router.embed(request(1, [3, 4]))

    run(main)


# -- waiting for company -------------------------------------------------------


def test_max_wait_gathers_close_requests_into_one_batch() -> None:
    wait_ms = 100  # B comes 1 ms after A: ample margin on a loaded machine
    worker = FakeWorker()
    a_texts, b_texts = request(1, [3]), request(2, [4])

    async def main() -> None:
        async with running([worker], max_wait_ms=wait_ms) as router:
            started = time.monotonic()
            a = asyncio.create_task(router.embed(a_texts))
            await asyncio.sleep(0.001)
            assert worker.seen == []  # idle worker, thin batch: it waits
            b = asyncio.create_task(router.embed(b_texts))
            exact(await a, a_texts)
            exact(await b, b_texts)
        assert len(worker.seen) == 1 and len(worker.seen[0].rows) == 2
        # Timer granularity: allow 1 ms early against the stated wait.
        assert worker.seen[0].at - started >= wait_ms / 1000 - 0.001

    run(main)


def test_no_wait_sends_the_first_request_at_once() -> None:
    worker = FakeWorker()
    a_texts, b_texts = request(1, [3]), request(2, [4])

    async def main() -> None:
        async with running([worker], max_wait_ms=0) as router:
            a = asyncio.create_task(router.embed(a_texts))
            await asyncio.sleep(0.001)
            assert len(worker.seen) == 1
            b = asyncio.create_task(router.embed(b_texts))
            exact(await a, a_texts)
            exact(await b, b_texts)
        assert [len(s.rows) for s in worker.seen] == [1, 1]

    run(main)


def test_busy_wait_never_delays_a_lone_client() -> None:
    """--busy-wait-ms 200: one client, one request at a time (the next sent when the
    last is answered), is never held for company: each batch reaches the worker at once
    (well under the 200 ms it would otherwise wait)."""
    worker = FakeWorker()

    async def main() -> None:
        async with running([worker], busy_wait_ms=200) as router:
            for i in range(5):
                texts = request(i + 1, [3])
                sent = time.monotonic()
                exact(await router.embed(texts, client="A"), texts)
                assert worker.seen[-1].at - sent < 0.1
        assert [len(s.rows) for s in worker.seen] == [1] * 5

    run(main)


@pytest.mark.parametrize("second", ["B", "A"])
def test_busy_wait_gathers_requests_that_overlap(second: str) -> None:
    """--busy-wait-ms 200: A's request goes at once (nothing else is under way); a second
    one, from another client within the wait or from A while A's is in flight, marks the
    server busy: it waits for company, and a third, 5 ms later, shares its batch."""
    worker = FakeWorker(delay_s=0.05)
    first, later, third = request(1, [3]), request(2, [4]), request(3, [5])

    async def main() -> None:
        async with running([worker], busy_wait_ms=200) as router:
            a = asyncio.create_task(router.embed(first, client="A"))
            await until(lambda: len(worker.seen) == 1)
            b = asyncio.create_task(router.embed(later, client=second))
            await asyncio.sleep(0.005)
            assert len(worker.seen) == 1  # the thin batch waits
            c = asyncio.create_task(router.embed(third, client="C"))
            exact(await a, first)
            exact(await b, later)
            exact(await c, third)
        assert [len(s.rows) for s in worker.seen] == [1, 2]

    run(main)


def test_busy_wait_off_sends_at_once() -> None:
    worker = FakeWorker(delay_s=0.05)

    async def main() -> None:
        async with running([worker], busy_wait_ms=0) as router:
            a = asyncio.create_task(router.embed(request(1, [3]), client="A"))
            await until(lambda: len(worker.seen) == 1)
            b = asyncio.create_task(router.embed(request(2, [4]), client="B"))
            await until(lambda: len(worker.seen) == 2)
            await asyncio.gather(a, b)

    run(main)


# -- shutdown and dead workers --------------------------------------------------


def test_close_fails_queued_requests_and_refuses_new_ones() -> None:
    worker = FakeWorker(slots=1, hold=True)

    async def main() -> None:
        router = Router([worker], BatchConfig(), HIDDEN)  # type: ignore[list-item]
        worker.on_change = router.wake
        router.start()
        a = asyncio.create_task(router.embed(request(1, [3])))
        await until(lambda: len(worker.seen) == 1)
        b = asyncio.create_task(router.embed(request(2, [3])))
        await until(lambda: router.queued_tokens == 3)
        await router.close()
        with pytest.raises(Unavailable) as info:
            await b
        assert info.value.grpc_code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(Unavailable):
            await router.embed(request(3, [3]))
        worker.release()
        await asyncio.gather(a, return_exceptions=True)

    run(main)
    assert not any(s.holds(2) or s.holds(3) for s in worker.seen)


def test_all_workers_failed_is_unavailable() -> None:
    workers = [FakeWorker(failed=True), FakeWorker(failed=True)]

    async def main() -> None:
        async with running(workers) as router:
            with pytest.raises(Unavailable):
                await router.embed(request(1, [3]))

    run(main)
    assert not any(w.seen for w in workers)


def test_queued_requests_fail_when_the_last_worker_fails() -> None:
    # A worker whose restart failed never serves again: what waits for it must not hang.
    worker = FakeWorker(slots=1, hold=True)

    async def main() -> None:
        async with running([worker]) as router:
            a = asyncio.create_task(router.embed(request(1, [3])))
            await until(lambda: len(worker.seen) == 1)
            b = asyncio.create_task(router.embed(request(2, [4])))
            await until(lambda: router.queued_tokens == 4)
            worker.failed = True
            worker.crash_first = 1
            worker.release(hold=True)  # the in-flight batch dies with the worker
            _, pending = await asyncio.wait([a, b], timeout=0.5)
            for task in pending:
                task.cancel()
            assert not pending, "requests still wait for a worker that will never serve"
            for task in (a, b):
                assert isinstance(task.exception(), Unavailable)

    run(main)
    assert len(worker.seen) == 1


# -- config ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["max_batch_tokens", "max_batch_size", "max_queue_tokens"])
@pytest.mark.parametrize("value", [0, -1])
def test_batch_config_rejects_values_below_one(name: str, value: int) -> None:
    # The message names the command-line flag.
    with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must be at least 1"):
        BatchConfig(**{name: value})
    BatchConfig(**{name: 1})  # the smallest allowed


@pytest.mark.parametrize("name", ["max_wait_ms", "busy_wait_ms"])
def test_batch_config_rejects_negative_wait(name: str) -> None:
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=flag):
        BatchConfig(**{name: -1})
    assert getattr(BatchConfig(**{name: 0}), name) == 0


# -- queue accounting after cancellation ------------------------------------------


def test_cancelled_request_frees_its_queue_budget_at_once() -> None:
    """A cancelled request's tokens stop counting before the batcher pops them, so it
    does not make later requests RESOURCE_EXHAUSTED."""
    worker = FakeWorker(slots=1, hold=True)

    async def main() -> None:
        async with running([worker], max_batch_size=1, max_queue_tokens=10) as router:
            a = asyncio.create_task(router.embed(request(1, [2])))
            await until(lambda: len(worker.seen) == 1)
            b = asyncio.create_task(router.embed(request(2, [4, 4])))
            await until(lambda: router.queued_tokens == 8)
            b.cancel()
            await asyncio.gather(b, return_exceptions=True)
            assert router.queued_tokens == 0 and router.queued_entries == 0
            c = asyncio.create_task(router.embed(request(3, [5, 5])))  # 10 tokens: fits
            await until(lambda: router.queued_tokens == 10)
            worker.release()
            exact(await a, request(1, [2]))
            exact(await c, request(3, [5, 5]))
            assert router.queued_tokens == 0

    run(main)
    assert not any(s.holds(2) for s in worker.seen)


def test_many_cancelled_requests_are_freed_while_workers_are_busy() -> None:
    worker = FakeWorker(slots=1, hold=True)

    async def main() -> None:
        async with running([worker], max_batch_size=1) as router:
            first = asyncio.create_task(router.embed(request(1, [1])))
            await until(lambda: len(worker.seen) == 1)
            tasks = [asyncio.create_task(router.embed(request(2, [1] * 10)))
                     for _ in range(300)]
            await until(lambda: router.queued_entries == 3000)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0)
            # The dead entries are dropped from memory, not kept until a worker frees up.
            assert router.held_entries < 1024
            assert router.queued_tokens == 0
            worker.release()
            exact(await first, request(1, [1]))

    run(main)
    assert len(worker.seen) == 1


def test_batches_waiting_behind_a_crash_are_not_suspects() -> None:
    """Only the batch a worker was running when it died counts a crash against its
    texts; a batch that waited in the pipe behind it is re-queued unmarked. Here the
    same two texts are in flight at each of MAX_ATTEMPTS crashes: the running one fails,
    the waiting one is embedded."""
    worker = FakeWorker(slots=2, hold=True)

    async def main() -> None:
        async with running([worker], max_batch_size=1) as router:
            suspect = asyncio.create_task(router.embed(request(1, [3])))
            waiting = asyncio.create_task(router.embed(request(2, [3])))
            for crash in range(MAX_ATTEMPTS):
                await until(lambda n=crash: len(worker.seen) == 2 * (n + 1))
                pending = {seen.rows[0][0] // 10_000: f for seen, f in worker._pending}
                running_f, waiting_f = pending[1], pending[2]
                worker._pending.clear()
                running_f.set_exception(WorkerCrashed("died", ran=True))
                waiting_f.set_exception(WorkerCrashed("died", ran=False))
                worker.on_change()
            with pytest.raises(WorkerFailed, match="crashed a worker 3 times"):
                await suspect
            await until(lambda: len(worker.seen) == 2 * MAX_ATTEMPTS + 1)
            worker.release()
            exact(await waiting, request(2, [3]))

    run(main)


# -- fair share between clients --------------------------------------------------


def test_clients_take_turns() -> None:
    # A's backlog of 10 texts does not stand before B's single text: texts are taken from
    # the clients in turn, so B's goes in the next batch but one (A's turn was already
    # due when B came), not the eleventh. (Without the worker's extra slot for light
    # clients, which would take B's text at once: see the next test but two.)
    worker = FakeWorker(slots=1, hold=True, extra_slot=False)
    flood, single = request(1, [5] * 10), request(2, [5])

    async def main() -> None:
        async with running([worker], max_batch_size=1) as router:
            a = asyncio.create_task(router.embed(flood, client="A"))
            await until(lambda: len(worker.seen) == 1 and router.queued_entries == 9)
            b = asyncio.create_task(router.embed(single, client="B"))
            await until(lambda: router.client_tokens("B") == 5)
            for _ in range(11):
                await until(lambda: bool(worker._pending))
                worker.release(hold=True)
            exact(await a, flood)
            exact(await b, single)

    run(main)
    order = [tag_of(s.rows[0])[0] for s in worker.seen]
    assert order[:4] == [1, 1, 2, 1] and order.count(1) == 10


def test_a_client_over_its_share_is_refused_and_others_are_not() -> None:
    worker = FakeWorker(slots=1, hold=True, extra_slot=False)  # admission only

    async def main() -> None:
        async with running([worker], max_batch_size=1, max_queue_tokens=100,
                           max_client_queue_tokens=30) as router:
            a = asyncio.create_task(router.embed(request(1, [10] * 4), client="A"))
            await until(lambda: router.client_tokens("A") == 30)  # one is in the worker
            with pytest.raises(Overloaded, match=r"this client already has 30 tokens queued "
                               r"\(limit per client 30\)"):
                await router.embed(request(3, [5]), client="A")
            b = asyncio.create_task(router.embed(request(2, [10] * 2), client="B"))
            await until(lambda: router.client_tokens("B") == 20)
            worker.release()
            await asyncio.gather(a, b)

    run(main)


def test_a_client_with_nothing_queued_gets_in_when_the_queue_is_full() -> None:
    worker = FakeWorker(slots=1, hold=True, extra_slot=False)  # admission only

    async def main() -> None:
        async with running([worker], max_batch_size=1, max_queue_tokens=40,
                           max_client_queue_tokens=100) as router:
            a = asyncio.create_task(router.embed(request(1, [8] * 5), client="A"))
            await until(lambda: router.queued_tokens == 32)  # 4 × 8 queued, one running
            with pytest.raises(Overloaded, match="the queue is full"):  # 32 + 10 > 40
                await router.embed(request(3, [10]), client="A")
            # B has nothing queued: one request gets in although the queue is full.
            b = asyncio.create_task(router.embed(request(2, [10]), client="B"))
            await until(lambda: router.queued_tokens == 42)
            with pytest.raises(Overloaded, match="the queue is full"):
                await router.embed(request(4, [10]), client="B")
            # So do C and D, while the queue holds less than twice the limit (80 tokens):
            # D's one token at 79. At 80, E, with nothing queued either, is refused: many
            # clients (one per connection) cannot grow the queue without bound.
            c = asyncio.create_task(router.embed(request(5, [37]), client="C"))
            await until(lambda: router.queued_tokens == 79)
            d = asyncio.create_task(router.embed(request(6, [1]), client="D"))
            await until(lambda: router.queued_tokens == 80)
            with pytest.raises(Overloaded, match=r"the queue is full \(80 tokens waiting, "
                               r"limit 40; a client with nothing queued gets in below 80\)"):
                await router.embed(request(7, [1]), client="E")
            worker.release()
            await asyncio.gather(a, b, c, d)

    run(main)


def test_a_light_client_gets_a_priority_batch_when_the_worker_is_busy() -> None:
    # Both of the worker's slots hold A's batches; B (nothing in flight, one text) gets a
    # batch of its own in the worker's extra slot, marked priority: the worker runs it
    # before A's prefetched batch. A never gets the extra slot.
    worker = FakeWorker(slots=2, hold=True)
    flood, single = request(1, [5] * 10), request(2, [5])

    async def main() -> None:
        async with running([worker], max_batch_size=1) as router:
            a = asyncio.create_task(router.embed(flood, client="A"))
            await until(lambda: len(worker.seen) == 2)
            assert not worker.seen[-1].priority and router.queued_entries == 8
            b = asyncio.create_task(router.embed(single, client="B"))
            await until(lambda: len(worker.seen) == 3)
            assert worker.seen[2].priority and tag_of(worker.seen[2].rows[0])[0] == 2
            worker.release(hold=False)
            exact(await b, single)
            exact(await a, flood)

    run(main)
    assert [s.priority for s in worker.seen].count(True) == 1


def test_a_suspect_text_of_a_light_client_goes_alone_in_priority_batches() -> None:
    """Light clients' texts share a priority batch; when it crashes a worker they are all
    suspect, and each is retried alone there too: B's poison text crashes the worker
    MAX_ATTEMPTS times and fails; C's text, which was in the first crashed batch with it,
    is embedded (it went back into the same priority batch with the poison text, and so
    failed beside it: seen with --frontends, where priority batches are common)."""
    worker = FakeWorker(slots=2, hold=True)
    flood = request(1, [5] * 6)
    poisoned = [np.array([5, POISON, 7], dtype=np.int32)]
    innocent = request(3, [4])

    async def main() -> None:
        async with running([worker], max_batch_size=4) as router:
            a = asyncio.create_task(router.embed(flood, client="A"))
            await until(lambda: len(worker.seen) == 2)  # A holds both slots
            b = asyncio.create_task(router.embed(poisoned, client="B"))
            c = asyncio.create_task(router.embed(innocent, client="C"))
            for _ in range(2 * MAX_ATTEMPTS + 2):
                await until(lambda: (b.done() and c.done())
                            or any(s.priority for s, _ in worker._pending))
                if b.done() and c.done():
                    break
                seen, future = next((s, f) for s, f in worker._pending if s.priority)
                worker._finish(seen, future)  # crashes it if it holds the poison
            with pytest.raises(WorkerFailed, match="crashed a worker 3 times"):
                await b
            exact(await c, innocent)
            worker.release(hold=False)
            exact(await a, flood)

    run(main)
    light = [s for s in worker.seen if s.priority]
    assert len(light[0].rows) == 2 and light[0].outcome == "crash"  # B's and C's texts
    hits = [s for s in light if any(POISON in r for r in s.rows)]
    assert len(hits) == MAX_ATTEMPTS and all(s.outcome == "crash" for s in hits)
    assert all(len(s.rows) == 1 for s in light[1:])  # after the crash: each text alone
