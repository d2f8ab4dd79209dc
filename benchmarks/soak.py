"""Soak test: mixed load against a real `embedrpc serve` for a given time.

Starts the server as a subprocess on loopback (the demo model unless --model is
given), drives a mix of unary batches, queries with prompts, streams, Tokenize
calls, deliberately invalid requests, too-short deadlines and cancellations, and
every --interval seconds records: requests answered, errors by status code
(expected ones, from the invalid/deadline/cancel share, apart from unexpected
ones), latency p50/p99 of the valid embed calls, and the resident memory of the
server and its workers (from /proc). Prints a table and writes JSON.

    python benchmarks/soak.py --duration 600 --json bench-out/soak.json

The run is bounded in time and talks only to the server it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from embedrpc.client import AsyncEmbedClient, make_request
from embedrpc.client.bench import LengthSpec, TextGenerator
from embedrpc.v1 import embedder_pb2_grpc as pb_grpc

SERVING = re.compile(r"serving .* on .*:(\d+)")
WORDS = ("embedding server latency vector search retrieval query document passage token "
         "batch worker queue model graph runtime kernel memory network health shutdown "
         "données recherche modèle 向量 检索 模型 запрос документ").split()
# About 28 words on average with a long tail (one text in 200 over 150 words, no cap to
# speak of): long batches now and then are part of what grows a worker's memory.
LENGTHS = "lognormal:20.5:0.8:1:1000"
# Drawn from by every client with its own seed.
TEXTS = TextGenerator(words=WORDS, seed=0).texts(4096, LengthSpec.parse(LENGTHS))


def rss_by_process(pid: int) -> dict[str, float]:
    """Resident memory (MiB) of a process and each of its descendants, by pid."""
    found: dict[str, float] = {}
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            with open(f"/proc/{p}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        found[str(p)] = int(line.split()[1]) / 1024
            for task in Path(f"/proc/{p}/task").iterdir():  # any thread may be a parent
                pids.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def text(rng: random.Random) -> str:
    return rng.choice(TEXTS)


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.ok = 0
        self.expected_errors: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()

    def reset(self) -> Stats:
        old, fresh = Stats(), self
        old.latencies, old.ok = fresh.latencies, fresh.ok
        old.expected_errors, old.unexpected = fresh.expected_errors, fresh.unexpected
        self.latencies, self.ok = [], 0
        self.expected_errors, self.unexpected = Counter(), Counter()
        return old


async def client_loop(target: str, seed: int, stats: Stats, until: float) -> None:
    rng = random.Random(seed)
    async with AsyncEmbedClient(target, timeout=30) as client, \
            grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        while time.monotonic() < until:
            kind = rng.random()
            started = time.monotonic()
            try:
                if kind < 0.55:  # documents, a few per call, varied Matryoshka sizes
                    n = rng.randint(1, 16)
                    await client.embed([text(rng) for _ in range(n)],
                                       dimensions=rng.choice([0, 32, 64, 128]))
                elif kind < 0.70:  # single queries with the model's prompt
                    await client.embed([text(rng)], prompt_name="query")
                elif kind < 0.78:  # a short stream
                    batches = [[text(rng)] * rng.randint(1, 4) for _ in range(8)]
                    async for result in client.stream(batches):
                        result.unwrap()
                elif kind < 0.84:
                    await client.tokenize([text(rng) for _ in range(4)])
                elif kind < 0.90:  # invalid: dimensions out of range
                    try:
                        await client.embed(["bad"], dimensions=7)
                    except grpc.aio.AioRpcError as exc:
                        stats.expected_errors[exc.code().name] += 1
                    continue
                elif kind < 0.95:  # a deadline far too short for a big request
                    try:
                        await stub.Embed(make_request([text(rng)] * 64), timeout=0.002)
                    except grpc.aio.AioRpcError as exc:
                        stats.expected_errors[exc.code().name] += 1
                    continue
                else:  # cancelled by the client mid-way
                    call = stub.Embed(make_request([text(rng)] * 32))
                    await asyncio.sleep(0.001)
                    call.cancel()
                    stats.expected_errors["CANCELLED"] += 1
                    continue
                stats.ok += 1
                stats.latencies.append(time.monotonic() - started)
            except grpc.aio.AioRpcError as exc:
                stats.unexpected[exc.code().name] += 1


async def drive(target: str, pid: int, args: argparse.Namespace) -> list[dict]:
    stats = Stats()
    start = time.monotonic()
    until = start + args.duration
    rows: list[dict] = []
    clients = [asyncio.create_task(client_loop(target, i, stats, until))
               for i in range(args.concurrency)]
    next_tick = start + args.interval
    while time.monotonic() < until:
        await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
        now = time.monotonic()
        window = stats.reset()
        rss = rss_by_process(pid)  # the server's pid first, then its workers
        lat = np.array(window.latencies) * 1000 if window.latencies else np.array([np.nan])
        row = {
            "t_s": round(now - start, 1), "ok": window.ok,
            "requests_per_s": round(window.ok / args.interval, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "expected_errors": dict(window.expected_errors),
            "unexpected_errors": dict(window.unexpected),
            "rss_mb": round(sum(rss.values()), 1),
            "rss_mb_by_pid": {k: round(v, 1) for k, v in rss.items()},
        }
        rows.append(row)
        print(f"{row['t_s']:>7.0f}s {row['requests_per_s']:>8.1f}/s "
              f"p50 {row['p50_ms']:>7.2f} ms p99 {row['p99_ms']:>8.2f} ms "
              f"rss {row['rss_mb']:>7.1f} MiB unexpected {row['unexpected_errors'] or 0}",
              file=sys.stderr, flush=True)
        next_tick += args.interval
    await asyncio.gather(*clients)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds per row")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    parser.add_argument("--json", default="bench-out/soak.json")
    args = parser.parse_args()

    proc = subprocess.Popen(
        [sys.executable, "-m", "embedrpc", "serve", "--model", args.model, "--device", "cpu",
         "--workers", str(args.workers), "--host", "127.0.0.1", "--port", "0"],
        stderr=subprocess.PIPE, text=True)
    port = 0
    assert proc.stderr is not None
    for line in proc.stderr:
        if m := SERVING.search(line):
            port = int(m.group(1))
            break
    if not port:
        print("the server did not start", file=sys.stderr)
        return 1
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    try:
        rows = asyncio.run(drive(f"127.0.0.1:{port}", proc.pid, args))
    finally:
        proc.terminate()
        code = proc.wait(30)

    first, last = rows[0], rows[-1]
    steady = rows[len(rows) // 4:] or rows
    growth = last["rss_mb"] - steady[0]["rss_mb"]
    summary = {
        "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
        "config": vars(args),
        "requests_ok": sum(r["ok"] for r in rows),
        "expected_errors": sum(sum(r["expected_errors"].values()) for r in rows),
        "unexpected_errors": sum(sum(r["unexpected_errors"].values()) for r in rows),
        "rss_mb_first": first["rss_mb"], "rss_mb_last": last["rss_mb"],
        "rss_mb_growth_after_warmup": round(growth, 1),
        "p50_ms_first": first["p50_ms"], "p50_ms_last": last["p50_ms"],
        "p99_ms_first": first["p99_ms"], "p99_ms_last": last["p99_ms"],
        "server_exit_code": code,
        "rows": rows,
    }
    print("\n| t (s) | req/s | p50 ms | p99 ms | RSS MiB | unexpected errors |\n"
          "|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['t_s']:.0f} | {r['requests_per_s']:.1f} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['rss_mb']:.1f} | {r['unexpected_errors'] or 0} |")
    print(f"\n{summary['requests_ok']} requests ok, {summary['expected_errors']} expected "
          f"errors, {summary['unexpected_errors']} unexpected; RSS {first['rss_mb']} → "
          f"{last['rss_mb']} MiB ({growth:+.1f} after warm-up); server exit code {code}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if summary["unexpected_errors"] == 0 and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
