"""GPU throughput: PyTorch fp16 SDPA vs the prepared fp16 model, served and raw, one run.

    python benchmarks/gpu_bench.py [--json bench-out/gpu_bench.json]     # on a GPU machine
    python benchmarks/gpu_bench.py --smoke                               # CPU, tiny, ~1 min

What it does, in one process on one device:

1. builds Qwen3-Embedding-0.6B's architecture with random weights (transformers'
   Qwen3Config: vocab 151669, hidden 1024, 28 layers, 16 heads / 8 KV heads × 128,
   intermediate 3072, rope θ 1e6), saved as a bf16 checkpoint with the bundled demo
   model's tokenizer and Qwen3-Embedding's sentence-transformers files (the weights'
   values do not change the cost, the tokenizer only makes the texts);
2. `embedrpc prepare --precision fp16` on it (validated on the device);
3. measures tokens/s, at lengths 32 … 32768 and on a mixed-length corpus, for
   (a) transformers' Qwen3Model in fp16 with SDPA attention (PyTorch),
   (b) the prepared model through the whole server: gRPC client → router → GPU worker,
   (c) the prepared model run by ONNX Runtime in-process with IOBinding (the ceiling),
   (d) the server again with --cuda-graphs (on the CPU: the same bucketed path
       without capture);
   every method gets the same batches: rows × length as the server's router cuts them
   (at most --max-batch-tokens padded tokens and --max-batch-size rows), and small
   requests (1 × 32, 8 × 128 tokens) sent as they are;
4. prints a table with ratios and writes JSON.

`--smoke` runs the same steps on the CPU with a tiny model and short lengths, to check
the program end to end where there is no GPU. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

FULL = {"vocab_size": 151669, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "max_position_embeddings": 32768}
SMOKE = {"vocab_size": 2003, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "max_position_embeddings": 512}
LENGTHS = (32, 128, 512, 2048, 8192, 32768)
SMOKE_LENGTHS = (8, 32, 128)
# Small requests (rows × length, sent as they are): where kernel launches, not the
# work, cost the time, and where CUDA graphs should help.
SMALL = ((1, 32), (8, 128))
SMOKE_SMALL = ((1, 8), (4, 32))


def log(message: str) -> None:
    print(f"[gpu_bench] {message}", flush=True)


@contextmanager
def step(what: str) -> Iterator[None]:
    log(f"{what} ...")
    start = time.perf_counter()
    yield
    log(f"{what}: {time.perf_counter() - start:.1f}s")


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

    def make(self, tokens: int, rng: np.random.Generator) -> str:
        words = rng.choice(self.words, size=tokens - 1)
        text = "".join(" " + w for w in words)  # every " word" is one token
        got = len(self.encoder.encode([text]).ids[0])
        assert got == tokens, (tokens, got)
        return text

    def ids(self, texts: list[str]) -> list[np.ndarray]:
        return self.encoder.encode(texts).ids


def batch_rows(length: int, max_tokens: int, max_rows: int) -> int:
    return max(1, min(max_rows, max_tokens // length))


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


# --------------------------------------------------------------------------- (a) PyTorch


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
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------- (c) raw ORT


def bench_raw(onnx_path: Path, device: str, workloads: dict[str, list[list[np.ndarray]]],
              pad_id: int, seconds: float) -> dict[str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if device.startswith("cuda"):
        ort.preload_dlls()
        providers: list[Any] = [("CUDAExecutionProvider", {"device_id": 0}),
                                "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(onnx_path), options, providers=providers)
    log(f"  providers: {session.get_providers()}")
    on_gpu = device.startswith("cuda")
    results: dict[str, Any] = {}
    for name, batches in workloads.items():
        feeds = [padded(rows, pad_id) for rows in batches]

        def run(feeds: list[tuple[np.ndarray, np.ndarray]] = feeds) -> int:
            done = 0
            for ids, mask in feeds:
                binding = session.io_binding()
                for key, array in (("input_ids", ids), ("attention_mask", mask)):
                    if on_gpu:
                        binding.bind_ortvalue_input(
                            key, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
                    else:
                        binding.bind_cpu_input(key, array)
                binding.bind_output("sentence_embedding", "cuda" if on_gpu else "cpu")
                session.run_with_iobinding(binding)
                out = binding.copy_outputs_to_cpu()[0]  # only [B, H] comes back
                if not np.isfinite(out).all():
                    raise RuntimeError("non-finite output")
                done += int(mask.sum())
            return done

        try:
            results[name] = timed(run, seconds)
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        log(f"  raw ORT {name}: {_fmt(results[name])}")
    return results


# --------------------------------------------------------------------------- (b) server


def bench_server(model_dir: Path, device: str, workloads: dict[str, list[list[str]]],
                 token_counts: dict[str, int], seconds: float, max_length: int,
                 max_tokens: int, max_rows: int, concurrency: int,
                 cuda_graphs: bool = False, workers: int = 1) -> dict[str, Any]:
    from embedrpc.client import EmbedClient
    from embedrpc.server import EmbedServer, ServeConfig

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = EmbedServer(ServeConfig(
        model=str(model_dir), device=device, workers=workers, host="127.0.0.1", port=0,
        max_length=max_length, max_batch_tokens=max_tokens, max_batch_size=max_rows,
        max_inputs=max(2048, max_rows), max_message_bytes=256 << 20, log_level="WARNING",
        cuda_graphs=cuda_graphs and device.startswith("cuda"),
        static_shapes=cuda_graphs and not device.startswith("cuda")))
    results: dict[str, Any] = {}
    try:
        port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(900)
        target = f"127.0.0.1:{port}"
        if cuda_graphs:
            info = server.workers[0].info
            log(f"  worker: cuda_graphs={info.get('cuda_graphs')} "
                f"static_shapes={info.get('static_shapes')}")
        clients = [EmbedClient(target, timeout=600) for _ in range(concurrency)]
        for name, requests in workloads.items():
            tokens_per_round = token_counts[name]

            def one_round(requests: list[list[str]] = requests) -> None:
                # Requests spread over `concurrency` closed-loop clients.
                def worker(k: int) -> None:
                    for texts in requests[k::concurrency]:
                        out = clients[k].embed(texts)
                        if not np.isfinite(out).all():
                            raise RuntimeError("non-finite output")

                with ThreadPoolExecutor(concurrency) as pool:
                    list(pool.map(worker, range(concurrency)))

            def run(one_round: Callable[[], None] = one_round,
                    tokens: int = tokens_per_round) -> int:
                one_round()
                return tokens

            try:
                results[name] = timed(run, seconds, min_runs=2)
            except Exception as exc:
                results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            log(f"  server {name}: {_fmt(results[name])}")
        for client in clients:
            client.close()
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop).result(120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    return results


# --------------------------------------------------------------------------- report


def _fmt(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"error: {result['error']}"
    return f"{result['tokens_per_s']:,.0f} tokens/s ({result['runs']} runs)"


def table(shapes: dict[str, str], results: dict[str, dict[str, Any]], torch_dtype: str) -> str:
    def rate(method: str, name: str) -> float | None:
        r = results.get(method, {}).get(name, {})
        return r.get("tokens_per_s")

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "—"

    def num(x: float | None) -> str:
        return f"{x:,.0f}" if x else "—"

    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[torch_dtype]
    lines = [f"| workload | batch | torch {short} SDPA | server | raw ORT | server/torch | "
             "raw/torch | server/raw | server, CUDA graphs | graphs/server |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, shape in shapes.items():
        t, s, r = rate("torch", name), rate("server", name), rate("raw_ort", name)
        g = rate("server_graphs", name)
        lines.append(f"| {name} | {shape} | {num(t)} | {num(s)} | {num(r)} | {ratio(s, t)} | "
                     f"{ratio(r, t)} | {ratio(s, r)} | {num(g)} | {ratio(g, s)} |")
    return "\n".join(lines)


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, short lengths, on the CPU (checks the program)")
    parser.add_argument("--device", help="cuda:0 (default) or cpu (default with --smoke)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/embedrpc-gpu-bench"),
                        help="where the checkpoint and the prepared model go")
    parser.add_argument("--json", type=Path, default=Path("bench-out/gpu_bench.json"))
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--seconds", type=float, help="per measurement (default 2; smoke 0.3)")
    parser.add_argument("--max-batch-tokens", type=int,
                        help="server and every method (default 32768; smoke 1024)")
    parser.add_argument("--max-batch-size", type=int, help="default 256; smoke 32")
    parser.add_argument("--concurrency", type=int, default=4, help="server clients")
    parser.add_argument("--workers", type=int, default=1,
                        help="server worker processes on the device (2: one runs while the "
                             "other copies and pools)")
    parser.add_argument("--mixed-texts", type=int, help="texts in the mixed corpus")
    parser.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=("torch", "server", "raw_ort", "server_graphs"))
    ns = parser.parse_args(argv)

    smoke = ns.smoke
    device = ns.device or ("cpu" if smoke else "cuda:0")
    shape = SMOKE if smoke else FULL
    lengths = tuple(ns.lengths or (SMOKE_LENGTHS if smoke else LENGTHS))
    seconds = ns.seconds or (0.3 if smoke else 2.0)
    max_length = max(lengths)
    max_tokens = max(ns.max_batch_tokens or (1024 if smoke else 32768), max_length)
    max_rows = ns.max_batch_size or (32 if smoke else 256)
    n_mixed = ns.mixed_texts or (64 if smoke else 2000)
    torch_dtype = "float16" if device.startswith("cuda") else "float32"
    round_tokens = 1024 if smoke else 32768  # tokens per measured round, at least
    ckpt, prepared = ns.work / "checkpoint", ns.work / f"prepared-{ns.precision}"
    report: dict[str, Any] = {"device": device, "smoke": smoke, "shape": shape,
                              "precision": ns.precision, "torch_dtype": torch_dtype,
                              "max_batch_tokens": max_tokens,
                              "max_batch_size": max_rows, "workers": ns.workers,
                              "results": {},
                              "errors": {}}
    import onnxruntime
    import torch
    import transformers

    from embedrpc import __version__
    from embedrpc.prepare import PrepareConfig, prepare

    report["versions"] = {"embedrpc": __version__, "onnxruntime": onnxruntime.__version__,
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "python": platform.python_version()}
    if device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(0)
    log(f"device {device} ({report.get('gpu', platform.processor() or 'cpu')}), lengths "
        f"{lengths}, {ns.precision}")

    with step("build the random-weight checkpoint"):
        build_checkpoint(ckpt, shape, device, max_length)
    with step(f"embedrpc prepare --precision {ns.precision} --device {device}"):
        info = prepare(PrepareConfig(model=str(ckpt), out=prepared, precision=ns.precision,
                                     device=device, force=True, reference=smoke),
                       say=lambda m: log(f"  {m}"))
    report["prepare"] = {"seconds": info["seconds"], "validation": info["validation"],
                         "fp16_scales": info["fp16_scales"], "graph": info["graph"]}
    write_report(ns.json, report)  # the validation, kept whatever follows

    texts = Texts(prepared, max_length)
    rng = np.random.default_rng(0)
    text_workloads: dict[str, list[list[str]]] = {}
    shapes: dict[str, str] = {}
    for length in lengths:
        rows = batch_rows(length, max_tokens, max_rows)
        name = f"len {length}"
        # Enough batches per round that the server's pipeline fills (at least 4 requests).
        n_batches = max(ns.concurrency, round_tokens // (rows * length))
        text_workloads[name] = [[texts.make(length, rng) for _ in range(rows)]
                                for _ in range(n_batches)]
        shapes[name] = f"{rows} × {length}"
    mixed_lengths = np.clip(rng.lognormal(np.log(min(200, max_length // 4)), 1.0, n_mixed),
                            4, min(max_length, 4096)).astype(int).tolist()
    mixed = [texts.make(n, rng) for n in mixed_lengths]
    cut = mixed_batches(mixed_lengths, max_tokens, max_rows)
    for rows, length in (SMOKE_SMALL if smoke else SMALL):
        name = f"small {rows} × {length}"
        n_requests = max(4 * ns.concurrency, (round_tokens // 16) // (rows * length))
        text_workloads[name] = [[texts.make(length, rng) for _ in range(rows)]
                                for _ in range(n_requests)]
        shapes[name] = f"{rows} × {length} per request"
    shapes["mixed"] = f"{n_mixed} texts, {min(mixed_lengths)}..{max(mixed_lengths)} tokens"
    # The server gets the corpus in requests of 32 texts in corpus order (its router sorts);
    # torch and raw ORT get length-sorted batches cut the same way.
    text_workloads["mixed"] = [mixed[i:i + 32] for i in range(0, len(mixed), 32)]
    id_workloads = {name: [texts.ids(batch) for batch in batches]
                    for name, batches in text_workloads.items() if name != "mixed"}
    mixed_ids = texts.ids(mixed)
    id_workloads["mixed"] = [[mixed_ids[i] for i in batch] for batch in cut]
    token_counts = {name: sum(len(r) for b in batches for r in b)
                    for name, batches in id_workloads.items()}
    report["workloads"] = {name: {"shape": shapes[name], "tokens_per_round": token_counts[name]}
                           for name in shapes}
    pad = texts.encoder.pad_id

    methods: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("raw_ort", lambda: bench_raw(prepared / "model.onnx", device, id_workloads, pad,
                                      seconds)),
        ("server", lambda: bench_server(prepared, device, text_workloads, token_counts,
                                        seconds, max_length, max_tokens, max_rows,
                                        ns.concurrency, workers=ns.workers)),
        ("torch", lambda: bench_torch(ckpt, device, torch_dtype, id_workloads, pad, seconds)),
        ("server_graphs", lambda: bench_server(prepared, device, text_workloads, token_counts,
                                               seconds, max_length, max_tokens, max_rows,
                                               ns.concurrency, cuda_graphs=True,
                                               workers=ns.workers)),
    ]
    def save(final: bool) -> None:
        # After every method, so a run cut short by a time limit keeps what it measured.
        report["table"] = table(shapes, report["results"], torch_dtype)
        report["complete"] = final
        write_report(ns.json, report)

    for method, run in methods:
        if method in ns.skip:
            continue
        with step(f"measure {method}"):
            try:
                report["results"][method] = run()
            except Exception as exc:  # keep what the other methods measured
                traceback.print_exc()
                report["errors"][method] = f"{type(exc).__name__}: {exc}"[:500]
        gc.collect()  # the method's session or model, before the next one loads its own
        save(final=False)

    save(final=True)
    print(report["table"], flush=True)
    log(f"wrote {ns.json}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
