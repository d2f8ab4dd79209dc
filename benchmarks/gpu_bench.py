"""GPU throughput, accuracy, CUDA graphs and memory of embedrpc, in one run on one GPU.

    python benchmarks/gpu_bench.py [--json bench-out/gpu_bench.json]     # on a GPU machine
    python benchmarks/gpu_bench.py --smoke                               # CPU, tiny, ~2 min

What it does, in one process on one device (each step's figures go to the JSON as
soon as it ends, so a run cut short keeps them; --budget-s skips what no longer fits):

1. builds Qwen3-Embedding-0.6B's architecture with random weights (transformers'
   Qwen3Config: vocab 151669, hidden 1024, 28 layers, 16 heads / 8 KV heads × 128,
   intermediate 3072, rope θ 1e6), saved as a bf16 checkpoint with the bundled demo
   model's tokenizer and Qwen3-Embedding's sentence-transformers files (the weights'
   values do not change the cost; the tokenizer only makes the texts);
2. `embedrpc prepare` of the first of --precisions (fp16), validated on the device
   against the float32 graph;
3. tokens/s at batch × tokens 256×32, 128×128, 32×512, 8×2048, 2×8192, 1×32768 for
   (a) the prepared graph run by ONNX Runtime in-process with IOBinding (the ceiling;
       the worker's own session settings),
   (b) embedrpc: the whole server, gRPC clients → router → GPU worker, requests of one
       batch each, --concurrency of them in flight,
   (c) transformers' Qwen3Model in fp16 with SDPA attention (PyTorch), the reference;
   then single-text Embed latency (one client, p50/p99) and the worker's GPU memory;
4. the server again with --cuda-graphs: accepted or refused (and why), how long the
   warm-up captures took, single-text latency and memory with graphs;
5. `embedrpc prepare` of the other precisions (bf16): min cosine to float32;
6. the largest batch of 32768-token rows one session runs (rows doubled until a run
   fails or the time is up);
7. prints one table and the targets of issue 15 (PASS/MISS), and writes JSON.

`--smoke` runs the same steps on the CPU with a tiny model and short rows, to check
the program end to end where there is no GPU (its figures mean nothing). A benchmark,
not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from embedrpc.client import decode
from embedrpc.client.bench import (
    AnswerFn,
    BenchConfig,
    LengthSpec,
    Pool,
    TextGenerator,
    connect,
    drive,
    pool_from_texts,
)

FULL = {"vocab_size": 151669, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "max_position_embeddings": 32768}
SMOKE = {"vocab_size": 2003, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "max_position_embeddings": 512}
# batch × tokens, as issue 15 asks (the shapes of ../shared/device/README.md's figures).
SHAPES = ((256, 32), (128, 128), (32, 512), (8, 2048), (2, 8192), (1, 32768))
SMOKE_SHAPES = ((16, 8), (8, 32), (2, 128))
# Issue 15's targets: embedrpc / torch fp16 SDPA by length, embedrpc / raw ORT, tokens/s.
VS_TORCH = {32: 2.2, 128: 2.2, 512: 2.2, 2048: 2.0, 8192: 1.6, 32768: 1.2}
VS_RAW = 0.90
SHORT_TOKENS_PER_S, SHORT_MAX_LENGTH = 420_000, 512
MIN_COSINE = 0.999  # fp16 and bf16 against float32, over prepare's validation texts
LATENCY_LENGTHS = (16, 32, 64, 128)  # single texts, in turn


def log(message: str) -> None:
    print(f"[gpu_bench] {message}", flush=True)


@contextmanager
def step(what: str) -> Iterator[None]:
    log(f"{what} ...")
    start = time.perf_counter()
    yield
    log(f"{what}: {time.perf_counter() - start:.1f}s")


class Deadline:
    """The time left of --budget-s (unlimited when 0)."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds if seconds else float("inf")

    def left(self) -> float:
        return self.end - time.monotonic()


# --------------------------------------------------------------------------- model


def build_checkpoint(directory: Path, shape: dict[str, int], device: str,
                     max_length: int) -> None:
    """Random-weight Qwen3 checkpoint (bf16) + the demo tokenizer + Qwen3-Embedding's
    sentence-transformers files."""
    import torch
    from transformers import Qwen3Config, Qwen3Model
    from transformers.utils import logging as hf_logging

    from embedrpc.server.model import DEMO_DIR

    hf_logging.disable_progress_bar()

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    demo_config = json.loads((DEMO_DIR / "config.json").read_text())
    config = Qwen3Config(**shape, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, eos_token_id=demo_config["eos_token_id"],
                         bos_token_id=demo_config["eos_token_id"], use_sliding_window=False)
    torch.manual_seed(0)
    with torch.device("cuda" if device.startswith("cuda") else "cpu"):
        model = Qwen3Model(config).eval()
    model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    for path in DEMO_DIR.rglob("*"):
        rel = path.relative_to(DEMO_DIR)
        if path.is_file() and path.suffix == ".json" and rel.as_posix() != "config.json":
            (directory / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, directory / rel)
    (directory / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": max_length, "do_lower_case": False}))
    pooling = json.loads((directory / "1_Pooling" / "config.json").read_text())
    pooling["word_embedding_dimension"] = shape["hidden_size"]
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))


# --------------------------------------------------------------------------- workloads


class Texts:
    """Texts with exact token counts under the model's tokenizer (EOS included)."""

    def __init__(self, model_dir: Path, max_length: int) -> None:
        from tokenizers import Tokenizer

        from embedrpc.server.model import load_model_spec
        from embedrpc.server.tokenizer import TextEncoder

        spec = load_model_spec(str(model_dir), max_length=max_length)
        self.encoder = TextEncoder(spec)
        vocab = Tokenizer.from_file(str(spec.tokenizer_path)).get_vocab()  # "Ġword": " word"
        words = sorted(t[1:] for t in vocab if t.startswith("Ġ") and t[1:].isalpha()
                       and len(t) > 3)
        self.words = [w for w in words if len(self.encoder.encode([" " + w]).ids[0]) == 2]
        assert len(self.words) > 50, len(self.words)
        self.generator = TextGenerator(words=self.words, seed=0)

    def make(self, tokens: int) -> str:
        # Every " word" is one token, and the tokenizer appends EOS: tokens - 1 words.
        text = " " + self.generator.texts(1, LengthSpec.parse(f"fixed:{tokens - 1}"))[0]
        got = len(self.encoder.encode([text]).ids[0])
        assert got == tokens, (tokens, got)
        return text

    def ids(self, texts: list[str]) -> list[np.ndarray]:
        return self.encoder.encode(texts).ids


def mixed_batches(lengths: list[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Indices into `lengths`, length-sorted, greedily cut at the padded-token budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = max([lengths[j] for j in current] + [lengths[i]])
        if current and (width * (len(current) + 1) > max_tokens or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def timed(run: Callable[[], int], seconds: float, min_runs: int = 3) -> dict[str, float]:
    """Repeat `run` (returns tokens done) for at least `seconds` and `min_runs` calls."""
    run()  # warm-up: kernels chosen, buffers allocated
    tokens = runs = 0
    start = time.perf_counter()
    while runs < min_runs or time.perf_counter() - start < seconds:
        tokens += run()
        runs += 1
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": tokens / elapsed, "runs": runs, "seconds": elapsed}


def padded(rows: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    ms = np.array(latencies_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "requests": len(ms)}


# --------------------------------------------------------------------------- GPU memory


def device_used_mib(device: str) -> float | None:
    """Memory in use on the whole device (all processes), MiB."""
    if not device.startswith("cuda"):
        return None
    try:
        import torch

        free, total = torch.cuda.mem_get_info(0)
        return (total - free) / 2**20
    except Exception:
        return None


def memory_by_pid() -> dict[int, float]:
    """GPU memory per process (MiB), from NVML, else nvidia-smi; empty where neither
    tells (e.g. processes of another PID namespace)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        return {p.pid: p.usedGpuMemory / 2**20 for p in procs if p.usedGpuMemory}
    except Exception:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10).stdout
        return {int(pid): float(mib) for pid, mib in
                (line.split(",") for line in out.strip().splitlines() if "," in line)}
    except Exception:
        return {}


def worker_memory(server: Any, device: str, baseline: float | None) -> dict[str, Any]:
    by_pid = memory_by_pid()
    used = device_used_mib(device)
    return {"per_worker_mib": [by_pid.get(w.pid) for w in server.workers],
            "device_used_mib": used,
            "device_delta_mib": None if used is None or baseline is None else used - baseline}


# --------------------------------------------------------------------------- (a) raw ORT


def ort_session(onnx_path: Path, device: str) -> Any:
    """A session with the worker's own settings (threads, provider options), no graphs."""
    import onnxruntime as ort

    from embedrpc.server.devices import available_cores
    from embedrpc.server.worker.cuda import providers, session_options
    from embedrpc.server.worker.spec import WorkerSpec

    spec = WorkerSpec.of(onnx_path=str(onnx_path), device=device, threads=available_cores())
    if device.startswith("cuda"):
        ort.preload_dlls()
    return ort.InferenceSession(str(onnx_path), session_options(spec),
                                providers=providers(spec, cuda_graphs=False))


def run_bound_batch(session: Any, ids: np.ndarray, mask: np.ndarray, on_gpu: bool) -> np.ndarray:
    import onnxruntime as ort

    binding = session.io_binding()
    for key, array in (("input_ids", ids), ("attention_mask", mask)):
        if on_gpu:
            binding.bind_ortvalue_input(key, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
        else:
            binding.bind_cpu_input(key, array)
    binding.bind_output("sentence_embedding", "cuda" if on_gpu else "cpu")
    if on_gpu:
        binding.synchronize_inputs()
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0]  # only [B, H] comes back


def bench_raw(onnx_path: Path, device: str, workloads: dict[str, list[list[np.ndarray]]],
              pad_id: int, seconds: float) -> dict[str, Any]:
    session = ort_session(onnx_path, device)
    log(f"  providers: {session.get_providers()}")
    on_gpu = device.startswith("cuda")
    results: dict[str, Any] = {}
    for name, batches in workloads.items():
        feeds = [padded(rows, pad_id) for rows in batches]

        def run(feeds: list[tuple[np.ndarray, np.ndarray]] = feeds) -> int:
            done = 0
            for ids, mask in feeds:
                if not np.isfinite(run_bound_batch(session, ids, mask, on_gpu)).all():
                    raise RuntimeError("non-finite output")
                done += int(mask.sum())
            return done

        try:
            results[name] = timed(run, seconds)
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        log(f"  raw ORT {name}: {_fmt(results[name])}")
    return results


def largest_batch(onnx_path: Path, device: str, row: np.ndarray, pad_id: int,
                  seconds: float) -> dict[str, Any]:
    """Rows of len(row) tokens, doubled until a run fails or `seconds` would be passed."""
    on_gpu = device.startswith("cuda")
    baseline = device_used_mib(device)
    session = ort_session(onnx_path, device)
    tried: list[dict[str, Any]] = []
    started = time.perf_counter()
    rows, per_row_s = 1, 0.0
    stopped = "no failure up to 1024 rows"
    while rows <= 1024:
        if per_row_s and (time.perf_counter() - started) + 1.5 * rows * per_row_s > seconds:
            stopped = f"time: {rows} rows would take about {rows * per_row_s:.0f}s more"
            break
        ids, mask = padded([row] * rows, pad_id)
        t = time.perf_counter()
        try:
            out = run_bound_batch(session, ids, mask, on_gpu)
            ok = bool(np.isfinite(out).all())
        except Exception as exc:
            tried.append({"rows": rows, "error": f"{type(exc).__name__}: {exc}"[:300]})
            stopped = f"{rows} rows failed"
            break
        elapsed = time.perf_counter() - t
        used = device_used_mib(device)
        tried.append({"rows": rows, "seconds": elapsed, "finite": ok,
                      "session_mib": None if used is None or baseline is None
                      else used - baseline})
        log(f"  {rows} × {len(row)}: {elapsed:.2f}s, finite {ok}, device memory "
            f"{'?' if used is None else f'{used:,.0f} MiB'}")
        per_row_s = elapsed / rows
        rows *= 2
    fits = [t["rows"] for t in tried if "error" not in t and t["finite"]]
    del session
    gc.collect()
    result = {"length": len(row), "tried": tried, "largest_ok_rows": max(fits, default=0),
              "stopped": stopped}
    # Where time, not memory, stopped the search: an estimate from the session's growth
    # between its last two runs (ONNX Runtime's arena grows in steps: a rough figure).
    grown = [t for t in tried if t.get("session_mib") is not None]
    if len(grown) >= 2 and baseline is not None and "failed" not in stopped:
        import torch

        a, b = grown[-2], grown[-1]
        per_row = (b["session_mib"] - a["session_mib"]) / (b["rows"] - a["rows"])
        free = torch.cuda.mem_get_info(0)[1] / 2**20 - baseline
        if per_row > 0:
            fixed = b["session_mib"] - per_row * b["rows"]
            result["estimated_rows"] = int((free - fixed) // per_row)
            result["mib_per_row"] = per_row
    return result


# --------------------------------------------------------------------------- (b) server


class Load:
    """The load-test harness's engine, for this program's blocking code: closed-loop
    clients on a connection each (the server tells clients apart by connection), their
    event loop on a thread of its own."""

    def __init__(self, target: str, clients: int) -> None:
        self.target = target
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.channels = [self._wait(connect(BenchConfig(target=target)))
                         for _ in range(clients)]

    def _wait(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def send(self, pool: Pool, *, clients: int, requests: int | None = None,
             seconds: float | None = None, on_answer: AnswerFn | None = None) -> None:
        """Client k of `clients` sends pool[k], pool[k + clients], ... in turn, each once
        (or `requests` of them), within `seconds` if given; returns when every client is
        done, and raises if a request failed."""

        def config(count: int) -> BenchConfig:
            return BenchConfig(target=self.target, concurrency=1, requests=count,
                               duration=seconds, warmup=0.0, timeout=600.0,
                               query_fraction=0.0, progress=False)

        shares = [pool[k::clients] for k in range(clients)]

        async def send_all() -> list[Any]:
            return await asyncio.gather(*(
                drive(channel, config(requests or len(share)), share, on_answer=on_answer)
                for channel, share in zip(self.channels, shares, strict=False) if share),
                return_exceptions=True)  # every client ends its share before this returns

        for result in self._wait(send_all()):
            if isinstance(result, BaseException):
                raise result
            if result.errors:
                raise RuntimeError(f"failed requests: {result.errors}")

    def close(self) -> None:
        for channel in self.channels:
            self._wait(channel.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def check_finite(start: float, done: float, response: Any) -> None:
    if not np.isfinite(decode(response)).all():
        raise RuntimeError("non-finite output")


def bench_server(model_dir: Path, device: str, workloads: dict[str, list[list[str]]],
                 token_counts: dict[str, int], latency_texts: list[str], seconds: float,
                 latency_requests: int, max_length: int, max_tokens: int, max_rows: int,
                 concurrency: int, cuda_graphs: bool = False,
                 workers: int = 1, start_timeout: float = 600) -> dict[str, Any]:
    """Throughput on `workloads` (may be empty), then single-text latency; the worker's
    description (CUDA graphs accepted or not) and GPU memory."""
    from embedrpc.server import EmbedServer, ServeConfig
    from embedrpc.server.config import DebugHooks

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    baseline = device_used_mib(device)
    server = EmbedServer(ServeConfig.of(
        model=str(model_dir), device=device, workers=workers, host="127.0.0.1", port=0,
        max_length=max_length, max_batch_tokens=max_tokens, max_batch_size=max_rows,
        max_inputs=max(2048, max_rows), max_message_bytes=256 << 20, log_level="WARNING",
        cuda_graphs=cuda_graphs and device.startswith("cuda")),
        # On the CPU (--smoke) the bucketed path of --cuda-graphs, without capture.
        hooks=DebugHooks(static_shapes=cuda_graphs and not device.startswith("cuda")))
    out: dict[str, Any] = {"throughput": {}}
    try:
        started = time.perf_counter()
        port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(start_timeout)
        out["start_s"] = time.perf_counter() - started
        out["workers"] = [w.info for w in server.workers]
        out["memory_after_warmup"] = worker_memory(server, device, baseline)
        info = server.workers[0].info
        log(f"  started in {out['start_s']:.1f}s; worker: providers {info.get('providers')}, "
            f"cuda_graphs={info.get('cuda_graphs')} static_shapes={info.get('static_shapes')} "
            f"warm-up {info.get('warmup_buckets')} buckets in {info.get('warmup_s')}s"
            f"{'; off: ' + info['graphs_off'] if info.get('graphs_off') else ''}")
        load = Load(f"127.0.0.1:{port}", concurrency)
        for name, requests in workloads.items():
            pool = pool_from_texts(requests)

            def run(pool: Pool = pool, tokens: int = token_counts[name]) -> int:
                # One round: every request once, over `concurrency` closed-loop clients.
                load.send(pool, clients=concurrency, on_answer=check_finite)
                return tokens

            try:
                out["throughput"][name] = timed(run, seconds, min_runs=2)
            except Exception as exc:
                out["throughput"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            log(f"  server {name}: {_fmt(out['throughput'][name])}")
        if workloads:
            out["memory_after_throughput"] = worker_memory(server, device, baseline)
        singles = pool_from_texts([text] for text in latency_texts)
        load.send(singles * 3, clients=1)  # warm: every length once more
        latencies: list[float] = []
        load.send(singles, clients=1, requests=latency_requests,
                  seconds=max(seconds * 4, 2.0),
                  on_answer=lambda start, done, _: latencies.append(done - start))
        out["single_text"] = percentiles(latencies)
        log(f"  single text: p50 {out['single_text']['p50_ms']:.2f} ms, p99 "
            f"{out['single_text']['p99_ms']:.2f} ms ({len(latencies)} requests)")
        out["workers_after"] = [w.info for w in server.workers]
        load.close()
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop).result(120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    return out


# --------------------------------------------------------------------------- (c) PyTorch


def bench_torch(model_dir: Path, device: str, dtype_name: str,
                workloads: dict[str, list[list[np.ndarray]]], pad_id: int,
                seconds: float) -> dict[str, Any]:
    import torch
    from transformers import AutoModel

    dtype = getattr(torch, dtype_name)
    dev = torch.device(device)
    model = AutoModel.from_pretrained(str(model_dir), dtype=dtype,
                                      attn_implementation="sdpa").to(dev).eval()
    results: dict[str, Any] = {}
    for name, batches in workloads.items():
        tensors = []
        for rows in batches:
            ids, mask = padded(rows, pad_id)
            tensors.append((torch.from_numpy(ids).to(dev), torch.from_numpy(mask).to(dev),
                            torch.from_numpy(mask.sum(1) - 1).to(dev), int(mask.sum())))

        def run(tensors: list[Any] = tensors) -> int:
            done = 0
            with torch.inference_mode():
                for ids, mask, last, count in tensors:
                    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
                    pooled = hidden[torch.arange(len(last), device=dev), last].float()
                    torch.nn.functional.normalize(pooled, dim=-1).cpu()
                    done += count
            return done

        try:
            results[name] = timed(run, seconds)
        except Exception as exc:  # e.g. out of memory at the longest length
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        log(f"  torch {name}: {_fmt(results[name])}")
        del tensors
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    model = None  # its GPU memory, before the next method loads its own
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------- report


def _fmt(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"error: {result['error']}"
    return f"{result['tokens_per_s']:,.0f} tokens/s ({result['runs']} runs)"


def _rate(report: dict[str, Any], method: str, name: str) -> float | None:
    results = report["results"].get(method) or {}
    if method == "server":
        results = results.get("throughput", {})
    return results.get(name, {}).get("tokens_per_s")


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("PASS" if ok else "MISS")


def summarise(report: dict[str, Any]) -> tuple[str, list[str]]:
    """The table (markdown) and the target lines."""
    def num(x: float | None) -> str:
        return f"{x:,.0f}" if x else "—"

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[report["torch_dtype"]]
    lines = [f"| batch × tokens | torch {short} SDPA | raw ORT | embedrpc | embedrpc / torch "
             "(target) | embedrpc / raw ORT (target ≥ 0.90) |", "|---|---:|---:|---:|---:|---:|"]
    targets: list[str] = []
    for name, (rows, length) in report["shapes"].items():
        t, r, s = (_rate(report, m, name) for m in ("torch", "raw_ort", "server"))
        vs_t, vs_r = ratio(s, t), ratio(s, r)
        goal = VS_TORCH.get(length)
        lines.append(f"| {rows} × {length} | {num(t)} | {num(r)} | {num(s)} | "
                     f"{'—' if vs_t is None else f'{vs_t:.2f}×'}"
                     f"{f' (≥ {goal})' if goal else ''} | "
                     f"{'—' if vs_r is None else f'{vs_r:.2f}×'} |")
        if goal:
            ok = None if vs_t is None else vs_t >= goal
            targets.append(f"{name}: embedrpc / torch {'—' if vs_t is None else f'{vs_t:.2f}×'}"
                           f" (target ≥ {goal}×) {_verdict(ok)}")
        targets.append(f"{name}: embedrpc / raw ORT {'—' if vs_r is None else f'{vs_r:.2f}×'} "
                       f"(target ≥ {VS_RAW}×) "
                       f"{_verdict(None if vs_r is None else vs_r >= VS_RAW)}")
        if length <= SHORT_MAX_LENGTH:
            targets.append(f"{name}: embedrpc {num(s)} tokens/s (target ≥ "
                           f"{SHORT_TOKENS_PER_S:,}) "
                           f"{_verdict(None if s is None else s >= SHORT_TOKENS_PER_S)}")
    return "\n".join(lines), targets


def other_lines(report: dict[str, Any]) -> list[str]:
    """Accuracy, CUDA graphs, latency and memory, one line each."""
    out = []
    for precision, p in report.get("prepare", {}).items():
        vs = p.get("validation", {}).get("vs_fp32")
        if isinstance(vs, dict):
            cos = vs["min_cosine"]
            out.append(f"{precision} vs float32: min cosine {cos:.6f} over "
                       f"{p['validation']['texts']} texts ({p['validation'].get('method')}; "
                       f"target ≥ {MIN_COSINE}) {_verdict(cos >= MIN_COSINE)}")
        elif "error" in p:
            out.append(f"{precision}: prepare failed: {p['error']}")
    plain = report["results"].get("server") or {}
    graphs = report["results"].get("server_graphs") or {}
    if graphs.get("workers"):
        info = graphs["workers"][0]
        after = (graphs.get("workers_after") or [info])[0]
        key = "cuda_graphs" if "cuda_graphs" in info else "static_shapes"
        if info.get(key):
            state = (f"accepted: {info.get('warmup_buckets')} buckets captured and checked at "
                     f"warm-up in {info.get('warmup_s')}s, smallest replay/exact cosine "
                     f"{info.get('min_agreement')}")
            if after.get("graphs_off"):
                state += f"; turned off later: {after['graphs_off']}"
        else:
            state = f"refused: {info.get('graphs_off') or 'not enabled'}"
        out.append(f"{'CUDA graphs' if key == 'cuda_graphs' else 'static shapes (CPU)'}: "
                   f"{state}")
    graphs_name = "CUDA graphs" if report["device"].startswith("cuda") else "static shapes"
    for label, r in ((f"without {graphs_name}", plain), (f"with {graphs_name}", graphs)):
        lat = r.get("single_text")
        if lat:
            out.append(f"single-text Embed {label}: p50 {lat['p50_ms']:.2f} ms, p99 "
                       f"{lat['p99_ms']:.2f} ms ({lat['requests']} requests, one client)")
    for label, r in (("worker", plain), ("worker with CUDA graphs", graphs)):
        for when in ("memory_after_warmup", "memory_after_throughput"):
            m = r.get(when)
            if m and m["device_used_mib"] is not None:  # on a GPU
                per = m["per_worker_mib"]
                delta = m["device_delta_mib"]
                out.append(f"GPU memory per {label}, {when[7:].replace('_', ' ')}: "
                           f"{', '.join('?' if x is None else f'{x:,.0f} MiB' for x in per)}"
                           f" (whole device: {'?' if delta is None else f'{delta:+,.0f}'} MiB "
                           "since before the server started)")
    big = report["results"].get("largest_batch")
    if big:
        estimate = (f"; about {big['estimated_rows']} would fit by the memory each row took "
                    f"({big['mib_per_row']:,.0f} MiB)" if "estimated_rows" in big else "")
        out.append(f"largest batch at {big['length']} tokens: {big['largest_ok_rows']} rows ran "
                   f"({big['stopped']}){estimate}")
    for stage, why in report.get("skipped", {}).items():
        out.append(f"skipped {stage}: {why}")
    return out


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table, targets = summarise(report)
    report["table"], report["targets"], report["notes"] = table, targets, other_lines(report)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """'256x32,1x32768' → ((256, 32), (1, 32768))."""
    shapes = []
    for part in text.split(","):
        rows, _, length = part.strip().lower().partition("x")
        shapes.append((int(rows), int(length)))
    return tuple(shapes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, short rows, on the CPU (checks the program)")
    parser.add_argument("--device", help="cuda:0 (default) or cpu (default with --smoke)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/embedrpc-gpu-bench"),
                        help="where the checkpoint and the prepared models go")
    parser.add_argument("--json", type=Path, default=Path("bench-out/gpu_bench.json"))
    parser.add_argument("--shapes", type=parse_shapes,
                        help="batch x tokens, comma-separated (default: issue 15's six, "
                             "256x32 ... 1x32768)")
    parser.add_argument("--seconds", type=float, help="per measurement (default 1.5; smoke 0.3)")
    parser.add_argument("--max-batch-tokens", type=int,
                        help="the server's budget (default: the longest row, at least 32768)")
    parser.add_argument("--max-batch-size", type=int, help="server rows (default 256)")
    parser.add_argument("--concurrency", type=int, default=4, help="server clients")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16"],
                        choices=("fp16", "bf16", "fp32"),
                        help="prepared and validated; the first is the one measured")
    parser.add_argument("--latency-requests", type=int, default=300,
                        help="single-text requests per server (at most 4 × --seconds, 2 s)")
    parser.add_argument("--largest-batch-seconds", type=float, default=40.0,
                        help="time for the largest-batch search (0: skip)")
    parser.add_argument("--mixed-texts", type=int, default=0,
                        help="also a mixed-length corpus of this many texts (0: none)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="wall-clock budget: steps that would not fit are skipped (0: none)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=("raw_ort", "server", "torch", "server_graphs", "largest_batch"))
    ns = parser.parse_args(argv)

    started = time.monotonic()
    deadline = Deadline(ns.budget_s)
    smoke = ns.smoke
    device = ns.device or ("cpu" if smoke else "cuda:0")
    on_gpu = device.startswith("cuda")
    shape = SMOKE if smoke else FULL
    shapes = ns.shapes or (SMOKE_SHAPES if smoke else SHAPES)
    seconds = ns.seconds or (0.3 if smoke else 1.5)
    max_length = max(length for _, length in shapes)
    max_tokens = max(ns.max_batch_tokens or (1024 if smoke else 32768), max_length)
    max_rows = ns.max_batch_size or (32 if smoke else 256)
    torch_dtype = "float16" if on_gpu else "float32"
    ckpt = ns.work / "checkpoint"
    report: dict[str, Any] = {
        "device": device, "smoke": smoke, "shape": shape, "precisions": ns.precisions,
        "torch_dtype": torch_dtype, "max_batch_tokens": max_tokens, "max_batch_size": max_rows,
        "workers": ns.workers, "concurrency": ns.concurrency, "seconds": seconds,
        "shapes": {f"{r} × {n}": (r, n) for r, n in shapes},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": os.environ.get("EMBEDRPC_COMMIT", ""),
        "prepare": {}, "results": {}, "errors": {}, "skipped": {}}
    import onnxruntime
    import torch
    import transformers

    from embedrpc import __version__
    from embedrpc.prepare import PrepareConfig, prepare

    report["versions"] = {"embedrpc": __version__, "onnxruntime": onnxruntime.__version__,
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "python": platform.python_version()}
    if on_gpu:
        report["gpu"] = torch.cuda.get_device_name(0)
    log(f"device {device} ({report.get('gpu', platform.processor() or 'cpu')}), shapes "
        f"{', '.join(report['shapes'])}, precisions {', '.join(ns.precisions)}")

    def save() -> None:
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        write_report(ns.json, report)

    def fits(stage: str, need_s: float) -> bool:
        left = deadline.left()
        if stage in ns.skip:
            report["skipped"][stage] = "--skip"
            return False
        if left < need_s:
            report["skipped"][stage] = f"time: {left:.0f}s left, about {need_s:.0f}s needed"
            log(f"skipping {stage}: {report['skipped'][stage]}")
            save()
            return False
        return True

    def prepare_one(precision: str) -> Path | None:
        out = ns.work / f"prepared-{precision}"
        with step(f"embedrpc prepare --precision {precision} --device {device}"):
            try:
                info = prepare(PrepareConfig(model=str(ckpt), out=out, precision=precision,
                                             device=device, force=True, reference=smoke),
                               say=lambda m: log(f"  {m}"))
            except Exception as exc:
                traceback.print_exc()
                report["prepare"][precision] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                save()
                return None
        report["prepare"][precision] = {
            "seconds": info["seconds"], "validation": info["validation"],
            "fp16_scales": info["fp16_scales"], "graph": info["graph"]}
        save()
        return out

    with step("build the random-weight checkpoint"):
        build_checkpoint(ckpt, shape, device, max_length)
    prepared = prepare_one(ns.precisions[0])
    if prepared is None:
        log("the measured precision could not be prepared; nothing to measure")
        return 1

    texts = Texts(prepared, max_length)
    rng = np.random.default_rng(0)
    text_workloads: dict[str, list[list[str]]] = {}
    for name, (rows, length) in report["shapes"].items():
        # Each request is one batch of the shape; enough of them that every client has one
        # and a round is at least 32768 tokens.
        n_batches = max(ns.concurrency, (1024 if smoke else 32768) // (rows * length))
        text_workloads[name] = [[texts.make(length) for _ in range(rows)]
                                for _ in range(n_batches)]
    id_workloads = {name: [texts.ids(batch) for batch in batches]
                    for name, batches in text_workloads.items()}
    if ns.mixed_texts:
        mixed_lengths = LengthSpec.parse(
            f"lognormal:{min(200, max_length // 4)}:1.0:4:{min(max_length, 4096)}"
        ).sample(rng, ns.mixed_texts).tolist()
        mixed = [texts.make(n) for n in mixed_lengths]
        # The server gets requests of 32 texts in corpus order (its router sorts); raw ORT
        # and torch get length-sorted batches cut the same way.
        text_workloads["mixed"] = [mixed[i:i + 32] for i in range(0, len(mixed), 32)]
        mixed_ids = texts.ids(mixed)
        id_workloads["mixed"] = [[mixed_ids[i] for i in batch] for batch in
                                 mixed_batches(mixed_lengths, max_tokens, max_rows)]
        report["mixed"] = f"{ns.mixed_texts} texts, {min(mixed_lengths)}..{max(mixed_lengths)}"
    token_counts = {name: sum(len(r) for b in batches for r in b)
                    for name, batches in id_workloads.items()}
    latency_texts = [texts.make(n) for n in LATENCY_LENGTHS if n <= max_length]
    pad = texts.encoder.pad_id
    report["tokens_per_round"] = token_counts
    server_args = dict(latency_texts=latency_texts, seconds=seconds,
                       latency_requests=ns.latency_requests, max_length=max_length,
                       max_tokens=max_tokens, max_rows=max_rows, concurrency=ns.concurrency,
                       workers=ns.workers)
    n_shapes = len(text_workloads)

    stages: list[tuple[str, float, Callable[[], Any]]] = [
        ("raw_ort", 10 + 3 * seconds * n_shapes,
         lambda: bench_raw(prepared / "model.onnx", device, id_workloads, pad, seconds)),
        ("server", 30 + 4 * seconds * n_shapes,
         lambda: bench_server(prepared, device, text_workloads, token_counts, **server_args,
                              start_timeout=max(60.0, min(600.0, deadline.left())))),
        ("torch", 15 + 4 * seconds * n_shapes,
         lambda: bench_torch(ckpt, device, torch_dtype, id_workloads, pad, seconds)),
        # Only latency and the graphs' own figures: batches of these shapes are over
        # --cuda-graph-max-tokens (or too long for a bucket) and would not be captured.
        ("server_graphs", 45,
         lambda: bench_server(prepared, device, {}, {}, cuda_graphs=True, **server_args,
                              start_timeout=max(60.0, min(600.0, deadline.left())))),
    ]
    for method, need, run in stages:
        if not fits(method, need):
            continue
        with step(f"measure {method}"):
            try:
                report["results"][method] = run()
            except Exception as exc:  # keep what the other methods measured
                traceback.print_exc()
                report["errors"][method] = f"{type(exc).__name__}: {exc}"[:500]
        gc.collect()  # the method's session or model, before the next one loads its own
        save()

    for precision in ns.precisions[1:]:
        if fits(f"prepare {precision}", 70 if on_gpu else 20):
            prepare_one(precision)

    if ns.largest_batch_seconds and fits("largest_batch", 15):
        with step(f"largest batch at {max_length} tokens"):
            try:
                row = texts.ids([texts.make(max_length)])[0]
                report["results"]["largest_batch"] = largest_batch(
                    prepared / "model.onnx", device, row, pad,
                    min(ns.largest_batch_seconds, max(5.0, deadline.left() - 10)))
            except Exception as exc:
                traceback.print_exc()
                report["errors"]["largest_batch"] = f"{type(exc).__name__}: {exc}"[:500]
        save()

    report["complete"] = True
    save()
    print(report["table"], flush=True)
    print("\n".join(f"- {line}" for line in report["targets"] + report["notes"]), flush=True)
    log(f"wrote {ns.json} in {report['elapsed_s']:.0f}s")
    return 1 if report["errors"] or any("error" in p for p in report["prepare"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
