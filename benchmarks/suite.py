"""embedrpc vs raw ONNX Runtime vs sentence-transformers: same machine, same texts, one run.

    python benchmarks/suite.py                      # full run (about 8 minutes on 2 cores)
    python benchmarks/suite.py --quick              # a development run (about 2 minutes)
    python benchmarks/suite.py --models demo --rounds 2 --seconds 3 --readme

For each model it measures, on the same texts (a long-tailed multilingual mix):

- raw ONNX Runtime in-process (the ceiling): the worker's own session code, tokenization
  excluded, with the server's thread layouts (one session per core; one session with all
  cores, with and without ORT's spin-waiting threads), on the clients' batches and on the
  batches the server cut for the same load (recorded from it, then replayed);
- embedrpc through gRPC (a whole EmbedServer, 127.0.0.1): unary Embed with `--batch` texts
  per call from `--concurrency` clients, and one EmbedStream with as many requests in
  flight, for each `--workers` setting;
- sentence-transformers in-process on torch CPU, all cores, on the same directory and
  the clients' batches (what `encode(texts_in_flight, batch_size=batch)` runs);
- on the demo model, single-text unary latency.

Measurements are interleaved: each round measures every setup once, in a rotating order,
and the figures are medians over rounds, so a burst of load from elsewhere on a shared
machine hits every setup alike. Each side runs in its own process; the gRPC load generator
runs at `--client-nice` so that on few cores it yields the CPU to the server it measures
(its own CPU use is reported). Writes JSON (`--json`) and, with `--readme`, regenerates the
docs/performance.md from it (benchmarks/render_readme.py).

Models: `demo` is regenerated with its weights by scripts/make_demo_model.py (its
model.onnx is checked byte-identical to the bundled one) because sentence-transformers
needs the safetensors; `qwen3-0.6b` is Qwen3-Embedding-0.6B's architecture with
`--qwen-layers` layers and random weights. Both are cached under `--models-dir`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from runners import runner_main
from workload import client_batches, corpus

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_DEMO = ROOT / "server" / "models" / "demo"
MAKE_MODEL = ROOT / "scripts" / "make_demo_model.py"
SUITE_VERSION = 1
# Targets from issue 3 (the server against the best raw layout; against sentence-transformers).
TARGET_VS_RAW = 0.90
TARGET_VS_ST = 1.2
TARGET_P50_MS = 2.0
BATCHINGS = {"client": "the clients' batches", "server": "the server's batches"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- processes -------------------------------------------------------------------


class Side:
    """A runner process (benchmarks/runners.py) answering method calls over a pipe."""

    def __init__(self, side: str, timeout: float = 900, **kwargs: Any) -> None:
        ctx = mp.get_context("spawn")
        self.name = side
        self.conn, child = ctx.Pipe()
        # Not daemonic: the server side starts worker processes of its own.
        self.proc = ctx.Process(target=runner_main, args=(child, side, kwargs),
                                name=f"suite-{side}")
        self.proc.start()
        child.close()
        self.recv(timeout)

    def send(self, method: str, **kwargs: Any) -> None:
        self.conn.send((method, kwargs))

    def recv(self, timeout: float = 900) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.name} did not answer within {timeout:.0f}s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.name} failed:\n{value}")
        return value

    def call(self, method: str, timeout: float = 900, **kwargs: Any) -> Any:
        self.send(method, **kwargs)
        return self.recv(timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# -- models ----------------------------------------------------------------------


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_model(name: str, models_dir: Path, qwen_layers: int) -> tuple[str, Path, dict]:
    """A full model directory (ONNX + safetensors + tokenizer + ST files), made once."""
    if name == "demo":
        args: list[str] = []
        target = models_dir / "demo"
        label = "demo"
    elif name == "qwen3-0.6b":
        args = ["--preset", "qwen3-0.6b", "--layers", str(qwen_layers)]
        target = models_dir / f"qwen3-0.6b-{qwen_layers}l"
        label = f"qwen3-0.6b-{qwen_layers}l"
    else:
        path = Path(name)
        if not (path / "model.safetensors").exists() or not (path / "model.onnx").exists():
            raise SystemExit(f"--models {name}: use demo, qwen3-0.6b, or a directory with both "
                             "model.onnx and model.safetensors (sentence-transformers needs it)")
        return path.name, path, describe_model(path)
    if not (target / ".complete").exists():
        log(f"making model {label} in {target} (scripts/make_demo_model.py {' '.join(args)})")
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="embedrpc-suite-") as tmp:
            subprocess.run([sys.executable, str(MAKE_MODEL), *args, "--no-reference",
                            "--out", str(Path(tmp) / "out"), "--keep-weights", str(target)],
                           check=True, stdout=subprocess.DEVNULL)
        (target / ".complete").write_text("made by benchmarks/suite.py\n")
    info = describe_model(target)
    if name == "demo":
        info["same_onnx_as_bundled"] = sha256(target / "model.onnx") == sha256(
            BUNDLED_DEMO / "model.onnx")
        if not info["same_onnx_as_bundled"]:
            log("WARNING: the regenerated demo model.onnx differs from server/models/demo")
    return label, target, info


def describe_model(path: Path) -> dict[str, Any]:
    config = json.loads((path / "config.json").read_text())
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "vocab_size")
    info: dict[str, Any] = {k: config.get(k) for k in keys}
    weights = path / "model.safetensors"
    if weights.exists():
        info["parameters"] = count_parameters(weights)
    st_config = path / "sentence_bert_config.json"
    if st_config.exists():
        info["max_seq_length"] = json.loads(st_config.read_text()).get("max_seq_length")
    return info


def count_parameters(path: Path) -> int:
    """Parameters in a safetensors file, from its JSON header."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")


# -- machine ---------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("embedrpc", "onnxruntime-gpu", "onnxruntime", "torch", "sentence-transformers",
                 "transformers", "tokenizers", "grpcio", "protobuf", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    commit = ""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                check=True, capture_output=True, text=True).stdout.strip()
    return {"cores": len(os.sched_getaffinity(0)), "cpu_model": cpu,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                / (1 << 30), 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "versions": versions, "git_commit": commit}


# -- the setups ------------------------------------------------------------------


@dataclass
class Setup:
    id: str
    name: str
    kind: str  # raw | server | st | latency
    params: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float:
        values = [r[key] for r in self.rounds if key in r]
        return float(statistics.median(values)) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def measure_server(load: Side, server: Side, target: str, mode: str,
                   requests: list[list[str]], concurrency: int, warmup: float,
                   seconds: float) -> dict[str, Any]:
    """Run the load generator and sample the server's CPU and batches over the same interval."""
    load.send("measure", target=target, mode=mode, requests=requests, concurrency=concurrency,
              warmup=warmup, seconds=seconds)
    start = time.perf_counter()
    time.sleep(warmup)
    before = server.call("sample")
    time.sleep(max(0.0, start + warmup + seconds - time.perf_counter()))
    after = server.call("sample")
    out = load.recv()
    span = after["t"] - before["t"]
    batches = after["batches"] - before["batches"]
    out["client_cpu_cores"] = out.pop("cpu_cores")
    out["main_cpu_cores"] = (after["main_cpu_s"] - before["main_cpu_s"]) / span
    out["workers_cpu_cores"] = (after["workers_cpu_s"] - before["workers_cpu_s"]) / span
    out["cpu_cores"] = out["main_cpu_cores"] + out["workers_cpu_cores"]
    if out["embeddings_per_s"]:
        # The main process's cost per text: what the server adds to the model's work.
        out["main_cpu_us_per_embedding"] = 1e6 * out["main_cpu_cores"] / out["embeddings_per_s"]
    if batches:
        tokens = after["batched_tokens"] - before["batched_tokens"]
        padded = after["padded_tokens"] - before["padded_tokens"]
        out["batch_rows"] = (out["embeddings_per_s"] * span) / batches
        out["padding"] = padded / tokens - 1 if tokens else 0.0
    out["restarts"] = after["restarts"] - before["restarts"]
    latencies = out.pop("latencies_ms", [])
    out["latency_ms"] = {"p50": percentile(latencies, 50), "p90": percentile(latencies, 90),
                         "p99": percentile(latencies, 99),
                         "max": max(latencies) if latencies else float("nan")}
    out["_latencies"] = latencies
    return out


def run_model(model: str, ns: argparse.Namespace, texts: list[str],
              seconds: float) -> dict[str, Any]:
    from embedrpc.server.model import load_model_spec
    from embedrpc.server.tokenizer import TextEncoder

    label, path, info = prepare_model(model, ns.models_dir, ns.qwen_layers)
    spec = load_model_spec(str(path))
    ids = TextEncoder(spec).encode(texts).ids
    batch_sets = {"client": client_batches(texts, ids, batch=ns.batch,
                                           window=ns.batch * ns.concurrency)}
    requests = [texts[i:i + ns.batch] for i in range(0, len(texts) - ns.batch + 1, ns.batch)]
    cores = len(os.sched_getaffinity(0))
    log(f"model {label}: {info.get('parameters', 0) / 1e6:.1f}M parameters, "
        f"{len(texts)} texts, {sum(map(len, ids)) / len(ids):.1f} tokens/text on average")

    sides: list[Side] = []
    try:
        log("starting raw ONNX Runtime, sentence-transformers, load generator, "
            f"servers ({', '.join(map(str, ns.workers))} workers)")
        raw = Side("raw", model_dir=str(path), cores=cores, batch_sets=batch_sets)
        sides.append(raw)
        st = None
        if not ns.skip_st:
            st = Side("st", model_dir=str(path), cores=cores, batches=batch_sets["client"])
            sides.append(st)
        load = Side("load", nice=ns.client_nice)
        sides.append(load)
        servers: dict[int, tuple[Side, str]] = {}
        for w in ns.workers:
            log_file = ns.json.parent / f"server-{label}-{w}w.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            host = Side("server", log_file=str(log_file), model=str(path), device="cpu",
                        workers=w, log_level="WARNING")
            sides.append(host)
            servers[w] = (host, f"127.0.0.1:{host.call('info')['port']}")

        if "server" in ns.raw_batching:
            # The batches the server cuts for this load, for raw ORT to replay.
            w = max(servers)
            host, target = servers[w]
            host.call("start_recording")
            load.call("measure", target=target, mode="unary", requests=requests,
                      concurrency=ns.concurrency, warmup=0.5, seconds=max(2.0, seconds))
            recorded = host.call("stop_recording")
            n = raw.call("add_batches", name="server", batches=recorded)
            log(f"recorded {n} batches from the {w}-worker server "
                f"({sum(map(len, recorded)) / max(n, 1):.1f} texts each) for raw ORT to replay")

        parity = None
        if st is not None:
            sample = texts[:16]
            a = np.asarray(st.call("embed", texts=sample), dtype=np.float32)
            b = load.call("embed", target=next(iter(servers.values()))[1], texts=sample)
            cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            parity = float(cos.min())
            log(f"parity: server vs sentence-transformers, min cosine over 16 texts "
                f"{parity:.6f}")

        setups: list[Setup] = []
        # Raw layouts with the threads the server's workers use in all: one session per
        # core, and one session with every core, without spin-waiting threads (as the
        # server's workers run) and with them (ORT's default, as a plain user runs it).
        for sessions, spin in [(cores, False), (1, False), (1, True)] if cores > 1 else \
                [(1, False)]:
            for batching in ns.raw_batching:
                if sessions == 1 and batching != ns.raw_batching[-1]:
                    continue  # the clients' batches once (one session per core) is enough
                threads = cores // sessions
                name = f"raw ORT {sessions}×{threads} thread{'s' * (threads > 1)}"
                setups.append(Setup(
                    f"raw-{sessions}x{threads}{'-spin' if spin else ''}-{batching}",
                    f"{name}{', spinning' if spin else ''}, {BATCHINGS[batching]}", "raw",
                    {"sessions": sessions, "batching": batching, "spin": spin}))
        for w in ns.workers:
            setups.append(Setup(f"server-{w}w-unary",
                                f"embedrpc {w}w, unary, {ns.concurrency} clients",
                                "server", {"workers": w, "mode": "unary"}))
            if not ns.skip_stream:
                setups.append(Setup(f"server-{w}w-stream",
                                    f"embedrpc {w}w, stream, {ns.concurrency} in flight",
                                    "server", {"workers": w, "mode": "stream"}))
        if st is not None:
            setups.append(Setup("st", "sentence-transformers (torch)", "st", {}))
        if model == "demo" and not ns.skip_latency:
            for w in ns.workers:
                setups.append(Setup(f"latency-{w}w", f"embedrpc {w}w, single-text unary",
                                    "latency", {"workers": w}))

        for r in range(ns.rounds):
            order = setups[r % len(setups):] + setups[:r % len(setups)]
            for setup in order:
                warmup = ns.warmup * (3 if r == 0 else 1)
                if setup.kind == "raw":
                    res = raw.call("measure", warmup=warmup, seconds=seconds, **setup.params)
                elif setup.kind == "st":
                    assert st is not None
                    res = st.call("measure", warmup=warmup, seconds=seconds)
                else:
                    host, target = servers[setup.params["workers"]]
                    if setup.kind == "latency":
                        res = measure_server(load, host, target, "latency",
                                             [[t] for t in texts], 1, warmup, seconds)
                    else:
                        res = measure_server(load, host, target, setup.params["mode"], requests,
                                             ns.concurrency, warmup, seconds)
                res["round"] = r
                setup.rounds.append(res)
                log(f"{label} round {r + 1}/{ns.rounds}: {progress_line(setup, res)}")
    finally:
        for side in reversed(sides):
            side.close()
    out = summarise(label, path, info, parity, setups)
    out["seconds"] = seconds
    return out


def progress_line(setup: Setup, res: dict[str, Any]) -> str:
    if setup.kind == "latency":
        lat = res["latency_ms"]
        return (f"{setup.name}: p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, "
                f"{res['requests_per_s']:.0f} req/s")
    text = f"{setup.name}: {res['embeddings_per_s']:.1f} emb/s, {res['cpu_cores']:.2f} cores"
    if setup.kind == "server":
        text += (f" (main {res['main_cpu_cores']:.2f}, workers {res['workers_cpu_cores']:.2f}, "
                 f"client {res['client_cpu_cores']:.2f}; main "
                 f"{res.get('main_cpu_us_per_embedding', 0):.0f} us/text; "
                 f"{res.get('batch_rows', 0):.1f} rows/batch)")
    return text


def summarise(label: str, path: Path, info: dict[str, Any], parity: float | None,
              setups: list[Setup]) -> dict[str, Any]:
    def rates(setup: Setup) -> list[float]:
        return [r["embeddings_per_s"] for r in setup.rounds]

    def ratio(setup: Setup, per_round: list[float]) -> float:
        # Per round (the same minutes on a shared machine), then the median.
        return statistics.median(x / y for x, y in zip(rates(setup), per_round, strict=True))

    def efficiency(setup: Setup) -> list[float]:
        return [r["embeddings_per_s"] / max(r["cpu_cores"], 1e-9) for r in setup.rounds]

    raw = [s for s in setups if s.kind == "raw"]
    st = next((s for s in setups if s.kind == "st"), None)
    # The ceiling is the raw setup with the best median (not each round's best raw
    # figure: the maximum of several noisy figures is biased upwards).
    ceiling = max(raw, key=lambda s: s.median("embeddings_per_s")) if raw else None
    best_raw = rates(ceiling) if ceiling else []
    best_raw_eff = efficiency(max(raw, key=lambda s: statistics.median(efficiency(s)))) \
        if raw else []
    rows = []
    for setup in setups:
        if setup.kind == "latency":
            continue
        row: dict[str, Any] = {"id": setup.id, "name": setup.name, "kind": setup.kind,
                               **setup.params}
        for key in ("embeddings_per_s", "tokens_per_s", "requests_per_s", "cpu_cores",
                    "main_cpu_cores", "workers_cpu_cores", "client_cpu_cores", "batch_rows",
                    "padding", "main_cpu_us_per_embedding"):
            if any(key in r for r in setup.rounds):
                row[key] = setup.median(key)
        row["embeddings_per_s_rounds"] = rates(setup)
        if setup.kind == "server":
            lats = [x for r in setup.rounds for x in r["_latencies"]]
            row["latency_ms"] = {"p50": percentile(lats, 50), "p99": percentile(lats, 99)}
        # Embeddings per CPU-second of everything the setup ran (server: main process and
        # workers): robust to other load on a shared machine, which throughput is not.
        row["embeddings_per_cpu_s"] = statistics.median(efficiency(setup))
        if raw:
            row["vs_raw"] = ratio(setup, best_raw)
            same = [s for s in raw if setup.kind == "server"
                    and s.params["sessions"] == setup.params["workers"]]
            if same:  # raw ORT with the server's own thread layout
                twin = max(same, key=lambda s: s.median("embeddings_per_s"))
                row["vs_raw_same_layout"] = ratio(setup, rates(twin))
                row["raw_same_layout"] = twin.id
            row["vs_raw_per_cpu_s"] = statistics.median(
                x / y for x, y in zip(efficiency(setup), best_raw_eff, strict=True))
        if st is not None and setup is not st:
            row["vs_st"] = ratio(setup, rates(st))
        rows.append(row)
    latency = {}
    for setup in setups:
        if setup.kind == "latency":
            lats = [x for r in setup.rounds for x in r["_latencies"]]
            latency[setup.id] = {"name": setup.name, "workers": setup.params["workers"],
                                 "requests": len(lats),
                                 "requests_per_s": setup.median("requests_per_s"),
                                 "p50_ms": percentile(lats, 50), "p90_ms": percentile(lats, 90),
                                 "p99_ms": percentile(lats, 99),
                                 "max_ms": max(lats) if lats else float("nan")}
    out: dict[str, Any] = {"name": label, "path": str(path), "model": info,
                           "parity_min_cosine_vs_st": parity, "rows": rows, "latency": latency}
    server_rows = [r for r in rows if r["kind"] == "server"]
    if server_rows:
        out["best_server"] = max(server_rows, key=lambda r: r["embeddings_per_s"])["id"]
    if ceiling is not None:
        out["best_raw"] = ceiling.id
    return out


# -- output ----------------------------------------------------------------------


def print_tables(result: dict[str, Any]) -> None:
    for model in result["models"]:
        info = model["model"]
        print(f"\n{model['name']}: {info.get('parameters', 0) / 1e6:.1f}M parameters, hidden "
              f"{info.get('hidden_size')}, {info.get('num_hidden_layers')} layers; parity vs "
              f"sentence-transformers: min cosine {model['parity_min_cosine_vs_st']}")
        header = (f"{'setup':46} {'emb/s':>8} {'tokens/s':>9} {'vs raw':>6} {'vs ST':>6} "
                  f"{'cores':>5} {'emb/cpu-s':>9} {'vs raw':>6} {'main us':>7} {'rows':>5} "
                  f"{'p50 ms':>7} {'p99 ms':>7}")
        print(header)
        print("-" * len(header))
        for row in model["rows"]:
            lat = row.get("latency_ms", {})
            print(f"{row['name']:46} {row['embeddings_per_s']:8.1f} {row['tokens_per_s']:9.0f} "
                  f"{fmt(row.get('vs_raw'), 6, 2)} {fmt(row.get('vs_st'), 6, 2)} "
                  f"{fmt(row.get('cpu_cores'), 5, 2)} {fmt(row.get('embeddings_per_cpu_s'), 9, 0)} "
                  f"{fmt(row.get('vs_raw_per_cpu_s'), 6, 2)} "
                  f"{fmt(row.get('main_cpu_us_per_embedding'), 7, 0)} "
                  f"{fmt(row.get('batch_rows'), 5, 1)} {fmt(lat.get('p50'), 7, 1)} "
                  f"{fmt(lat.get('p99'), 7, 1)}")
        for lat in model["latency"].values():
            print(f"{lat['name']}: p50 {lat['p50_ms']:.2f} ms, p90 {lat['p90_ms']:.2f} ms, "
                  f"p99 {lat['p99_ms']:.2f} ms, max {lat['max_ms']:.1f} ms "
                  f"({lat['requests']} requests, {lat['requests_per_s']:.0f}/s)")
    for line in result["targets"]:
        print(line)


def fmt(value: float | None, width: int, digits: int) -> str:
    if value is None or value != value:
        return " " * width
    return f"{value:{width}.{digits}f}"


def check_targets(result: dict[str, Any]) -> list[str]:
    lines = []
    for model in result["models"]:
        rows = {r["id"]: r for r in model["rows"]}
        best = rows.get(model.get("best_server", ""))
        if best is None:
            continue
        for key, target, what in (("vs_raw", TARGET_VS_RAW, "the fastest raw ORT setup"),
                                  ("vs_st", TARGET_VS_ST, "sentence-transformers")):
            if key in best:
                ok = "PASS" if best[key] >= target else "MISS"
                lines.append(f"target {model['name']}: best embedrpc ({best['name']}) "
                             f"{best[key]:.2f}x {what} (target >= {target}) {ok}")
        for row in model["rows"]:
            if "vs_raw_same_layout" in row:
                ratio = row["vs_raw_same_layout"]
                ok = "PASS" if ratio >= TARGET_VS_RAW else "MISS"
                lines.append(f"target {model['name']}: {row['name']} {ratio:.2f}x raw ORT "
                             f"with the same threads ({rows[row['raw_same_layout']]['name']}) "
                             f"(target >= {TARGET_VS_RAW}) {ok}")
        for lat in model["latency"].values():
            ok = "PASS" if lat["p50_ms"] <= TARGET_P50_MS else "MISS"
            lines.append(f"target {model['name']}: {lat['name']} p50 {lat['p50_ms']:.2f} ms "
                         f"(target <= {TARGET_P50_MS} ms) {ok}")
    return lines


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,qwen3-0.6b",
                   help="comma-separated: demo, qwen3-0.6b, or full model directories")
    p.add_argument("--qwen-layers", type=int, default=2,
                   help="layers of the random Qwen3-0.6B-shaped model (28 in the real one)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                   help="server --workers settings to measure")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per setup")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per setup/round")
    p.add_argument("--qwen-seconds", type=float, default=6.0,
                   help="the same for the Qwen3-0.6B-shaped model (a batch takes about a second)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="seconds before each measurement (x3 in the first round)")
    p.add_argument("--batch", type=int, default=32, help="texts per Embed call / per batch")
    p.add_argument("--concurrency", type=int, default=4,
                   help="concurrent unary clients, and requests in flight on the stream")
    p.add_argument("--texts", type=int, default=2048, help="corpus size")
    p.add_argument("--raw-batching", nargs="+", default=["client", "server"],
                   choices=sorted(BATCHINGS),
                   help="batch shapes for raw ONNX Runtime: client (each request's texts, "
                   "length-sorted across concurrent requests) and/or server (the batches the "
                   "server cut for the same load, recorded and replayed)")
    p.add_argument("--client-nice", type=int, default=10,
                   help="niceness of the load generator process (0: as the server)")
    p.add_argument("--skip-st", action="store_true", help="no sentence-transformers")
    p.add_argument("--skip-stream", action="store_true", help="no EmbedStream")
    p.add_argument("--skip-latency", action="store_true", help="no single-text latency")
    p.add_argument("--quick", action="store_true",
                   help="development run: 1 round of 2 s (overrides --rounds/--seconds)")
    p.add_argument("--models-dir", type=Path, default=ROOT / "bench-out" / "models")
    p.add_argument("--json", type=Path, default=ROOT / "bench-out" / "suite.json")
    p.add_argument("--readme", action="store_true",
                   help="regenerate docs/performance.md from the JSON")
    ns = p.parse_args(argv)
    if ns.quick:
        ns.rounds, ns.seconds, ns.qwen_seconds, ns.warmup = 1, 2.0, 4.0, 0.5
    ns.models = [m.strip() for m in ns.models.split(",") if m.strip()]
    if ns.rounds < 1 or ns.seconds <= 0 or ns.batch < 1 or ns.concurrency < 1:
        p.error("--rounds, --seconds, --batch and --concurrency must be positive")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    started = time.perf_counter()
    texts = corpus(ns.texts)
    result: dict[str, Any] = {
        "suite_version": SUITE_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/suite.py", *(argv or sys.argv[1:])]),
        "machine": machine(), "load_average_start": load_average(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()
                     if k not in ("json", "models_dir", "readme", "quick")},
        "models": [],
    }
    cores = result["machine"]["cores"]
    log(f"{cores} cores ({result['machine']['cpu_model']}), load average "
        f"{result['load_average_start']}; models {', '.join(ns.models)}; {ns.rounds} round(s) "
        f"per setup")
    if result["load_average_start"][0] > 0.5 * cores:
        log(f"WARNING: the machine is busy (load average {result['load_average_start'][0]} on "
            f"{cores} cores): throughput will be noisy; per-CPU-second figures hold up better")
    for model in ns.models:
        seconds = ns.qwen_seconds if model == "qwen3-0.6b" else ns.seconds
        result["models"].append(run_model(model, ns, texts, seconds))
    result["load_average_end"] = load_average()
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["targets"] = check_targets(result)
    print_tables(result)
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {ns.json} ({result['elapsed_s']:.0f} s in all)")
    if ns.readme:
        from render_readme import update_readme

        update_readme(ROOT / "docs" / "performance.md", result)
        log("updated docs/performance.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
