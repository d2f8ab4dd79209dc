"""Throughput of a model through the server vs raw ONNX Runtime in-process, side by side.

    python benchmarks/demo_throughput.py [--model demo] [--workers 1 2] [--batch 32]
        [--concurrency 4] [--duration 10] [--json bench-out/demo_throughput.json]

Both sides embed the same texts in the same batch size:
- raw ORT: one in-process session using all cores (the ceiling), tokenization
  excluded, pooling included, texts length-sorted within windows of 4 batches
  as the server's router does;
- server: `embedrpc serve` in a subprocess, closed-loop gRPC clients (threads)
  sending `--batch` texts per Embed call, float32-bytes encoding.
Prints a table and writes JSON. A benchmark, not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

WORDS = ("the of and to in is was for on that with as by at from his an were are which this "
         "be has had it or not but what all they their we one you there been more when will "
         "capital China Beijing gravity plants energy language model search query document "
         "北京 首都 天气 東京 Москва столица القاهرة Grüße München naïve café").split()


def corpus(n: int, seed: int = 0) -> list[str]:
    """Texts of 4..120 words (a long-tailed mix, like documents and queries)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(3.0, 0.7, n).astype(int), 4, 120)
    return [" ".join(rng.choice(WORDS, size=k)) for k in lengths]


def bench_raw(model: str, texts: list[str], batch: int, duration: float) -> dict:
    from embedrpc.server.model import load_model_spec
    from embedrpc.server.tokenizer import TextEncoder
    from embedrpc.server.worker import OrtBackend, WorkerSpec

    spec = load_model_spec(model)
    encoder = TextEncoder(spec)
    backend = OrtBackend(WorkerSpec(onnx_path=str(spec.onnx_path), threads=os.cpu_count() or 1,
                                    pooling=spec.pooling, pad_id=encoder.pad_id,
                                    hidden_size=spec.hidden_size))
    ids = encoder.encode(texts).ids
    # Length-sorted within windows of 4 batches, as the server's router does.
    window = 4 * batch
    ids = [a for i in range(0, len(ids), window) for a in sorted(ids[i:i + window], key=len)]
    batches = []
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch]
        batches.append((np.concatenate(chunk), np.array([len(a) for a in chunk], np.int32)))
    backend.warmup()
    done = tokens = 0
    start = time.perf_counter()
    while time.perf_counter() - start < duration:
        for flat, lengths in batches:
            backend.embed(flat, lengths)
            done += len(lengths)
            tokens += int(lengths.sum())
    elapsed = time.perf_counter() - start
    return {"embeddings_per_s": done / elapsed, "tokens_per_s": tokens / elapsed}


def bench_server(model: str, workers: int, texts: list[str], batch: int, concurrency: int,
                 duration: float) -> dict:
    from embedrpc.client import EmbedClient

    proc = subprocess.Popen([sys.executable, "-m", "embedrpc", "serve", "--model", model,
                             "--device", "cpu", "--workers", str(workers), "--host",
                             "127.0.0.1", "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        port = None
        assert proc.stderr is not None
        for line in proc.stderr:
            if match := re.search(r"serving \S+ on \S+:(\d+)", line):
                port = match.group(1)
                break
        if port is None:
            raise RuntimeError("server did not start")
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        target = f"127.0.0.1:{port}"
        requests = [texts[i:i + batch] for i in range(0, len(texts) - batch + 1, batch)]
        latencies: list[float] = []
        counts = {"embeddings": 0, "tokens": 0}
        lock = threading.Lock()
        with EmbedClient(target, timeout=60) as warm:
            for r in requests[:4]:
                warm.embed(r)
        start = time.perf_counter()
        stop_at = start + duration

        def loop(k: int) -> None:
            with EmbedClient(target, timeout=60) as client:
                i = k
                while time.perf_counter() < stop_at:
                    t0 = time.perf_counter()
                    response = client.embed_response(requests[i % len(requests)])
                    dt = time.perf_counter() - t0
                    with lock:
                        latencies.append(dt)
                        counts["embeddings"] += response.count
                        counts["tokens"] += response.usage.prompt_tokens
                    i += concurrency

        threads = [threading.Thread(target=loop, args=(k,)) for k in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        lat = np.array(latencies) * 1000
        return {"embeddings_per_s": counts["embeddings"] / elapsed,
                "tokens_per_s": counts["tokens"] / elapsed,
                "requests_per_s": len(latencies) / elapsed,
                "latency_ms": {"p50": float(np.percentile(lat, 50)),
                               "p99": float(np.percentile(lat, 99))}}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--json", type=Path, default=Path("bench-out/demo_throughput.json"))
    ns = parser.parse_args()
    texts = corpus(ns.texts)
    print(f"model {ns.model}: {len(texts)} texts, batch {ns.batch}, {ns.duration:.0f}s each, "
          f"{os.cpu_count()} cores", flush=True)
    rows = [{"name": "raw ONNX Runtime in-process", **bench_raw(ns.model, texts, ns.batch,
                                                                  ns.duration)}]
    for w in ns.workers:
        print(f"server, {w} worker(s)...", flush=True)
        rows.append({"name": f"embedrpc, {w} worker(s), {ns.concurrency} clients",
                     **bench_server(ns.model, w, texts, ns.batch, ns.concurrency,
                                    ns.duration)})
    ceiling = rows[0]["embeddings_per_s"]
    print(f"\n{'setup':48} {'emb/s':>9} {'tokens/s':>10} {'vs raw':>7} {'p50 ms':>7} "
          f"{'p99 ms':>7}")
    for row in rows:
        lat = row.get("latency_ms", {})
        print(f"{row['name']:48} {row['embeddings_per_s']:9.0f} {row['tokens_per_s']:10.0f} "
              f"{row['embeddings_per_s'] / ceiling:7.2f} {lat.get('p50', float('nan')):7.1f} "
              f"{lat.get('p99', float('nan')):7.1f}")
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps({
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor()},
        "model": ns.model, "batch": ns.batch, "concurrency": ns.concurrency,
        "duration_s": ns.duration, "rows": rows}, indent=2))
    print(f"\nwrote {ns.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
