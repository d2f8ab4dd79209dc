"""`--processes P`: the load spread over P spawned processes that start at one instant,
each running its share (engine.py) and sending back progress and its result."""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import time
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections

from .engine import Share, WorkerResult, run_share, shares
from .options import BenchConfig, BenchError
from .progress import Progress
from .workload import Workload


def _child_main(conn: Connection, config: BenchConfig, share: Share) -> None:
    """A load-generating process: workload in → ready → start instant in → progress → result.

    The workload comes over the pipe rather than as a Process argument: a child that
    dies while starting then gives the parent an EOF, not a write blocked forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    workload: Workload = conn.recv()

    def start() -> float:
        conn.send(("ready", None))
        return float(conn.recv())

    try:
        result = asyncio.run(run_share(config, share, workload, start,
                                       lambda snapshot: conn.send(("progress", snapshot))))
        conn.send(("result", result))
    except BenchError as exc:
        conn.send(("error", str(exc)))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def run_processes(config: BenchConfig, workload: Workload,
                  progress: Progress | None) -> WorkerResult:
    ctx = multiprocessing.get_context("spawn")
    conns: list[Connection] = []
    procs = []
    try:
        for share in shares(config):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child_main, args=(child, config, share),
                               name=f"embedrpc-bench-{share.index}", daemon=True)
            proc.start()
            child.close()
            conns.append(parent)
            procs.append(proc)
        for i, conn in enumerate(conns):
            try:
                conn.send(workload)
            except (BrokenPipeError, ConnectionResetError):
                raise BenchError(f"load process {i} exited while starting (a script that "
                                 "runs several processes needs an `if __name__ == '__main__':` "
                                 "guard)") from None
        owner = {conn: i for i, conn in enumerate(conns)}
        ready: set[Connection] = set()
        results: dict[int, WorkerResult] = {}
        deadline = time.monotonic() + 120.0  # start-up: imports, connect, serialise
        started = False
        while len(results) < len(conns):
            waiting = [c for c in conns if owner[c] not in results]
            readable = wait_connections(waiting, timeout=max(0.0, deadline - time.monotonic()))
            if not readable:
                raise BenchError("load processes did not answer in time")
            for conn in readable:
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    raise BenchError(f"load process {owner[conn]} exited unexpectedly") \
                        from None
                if kind == "error":
                    raise BenchError(payload)
                if kind == "ready":
                    ready.add(conn)
                elif kind == "progress" and progress is not None:
                    progress.add(owner[conn], payload)
                elif kind == "result":
                    results[owner[conn]] = payload
            if not started and len(ready) == len(conns):
                start_at = time.monotonic() + 0.2
                for conn in conns:
                    conn.send(start_at)
                started = True
                deadline = start_at + config.time_limit + config.timeout + 30.0
        merged = WorkerResult()
        for i in sorted(results):
            merged.merge(results[i])
        return merged
    finally:
        for conn in conns:
            conn.close()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
