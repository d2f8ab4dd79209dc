"""CPU throughput of prepared graphs vs a plain ONNX export of the same weights.

    python scripts/make_demo_model.py --out /tmp/demo-plain --no-reference \\
        --keep-weights /tmp/demo-ckpt
    python benchmarks/prepare_cpu.py --checkpoint /tmp/demo-ckpt --plain /tmp/demo-plain

`--plain` is make_demo_model's export (torch.onnx, attention as MatMul/Softmax, output
last_hidden_state, pooled in numpy by the worker); `--checkpoint` is the same model's
safetensors directory (make_demo_model's --keep-weights), which this prepares as fp32
and int8 (fused graph, pooling and normalisation inside). All graphs run through the
server's own worker backend (OrtBackend: IOBinding, right padding) on the same batches;
methods are interleaved and the best of --rounds is kept, so a busy machine hurts all
alike. Also reports int8's cosine to the fp32 graph. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SHAPES = ((32, 16), (128, 8), (512, 2))  # (length, rows)


def backend(onnx_path: Path, threads: int, hidden: int) -> Any:
    from embedrpc.server.worker.backends import OrtBackend
    from embedrpc.server.worker.spec import WorkerSpec

    return OrtBackend(WorkerSpec.of(onnx_path=str(onnx_path), threads=threads,
                                 pooling="lasttoken", pad_id=0, hidden_size=hidden))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--plain", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="per method and round")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--json", type=Path, default=Path("bench-out/prepare_cpu.json"))
    ns = parser.parse_args(argv)

    from embedrpc.prepare import PrepareConfig, prepare

    config = json.loads((ns.checkpoint / "config.json").read_text())
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    graphs = {"plain export": ns.plain / "model.onnx"}
    report: dict[str, Any] = {"checkpoint": str(ns.checkpoint), "threads": ns.threads,
                              "layers": config["num_hidden_layers"], "hidden": hidden,
                              "prepare_seconds": {}, "results": {}}
    with tempfile.TemporaryDirectory(prefix="embedrpc-prepare-cpu-") as tmp:
        for precision in ns.precisions:
            out = Path(tmp) / precision
            info = prepare(PrepareConfig(model=str(ns.checkpoint), out=out,
                                         precision=precision, device="cpu", reference=False),
                           say=lambda m: print(f"  {m}", flush=True))
            report["prepare_seconds"][precision] = info["seconds"]
            graphs[f"prepared {precision}"] = out / "model.onnx"
        backends = {name: backend(path, ns.threads, hidden) for name, path in graphs.items()}
        rng = np.random.default_rng(0)
        vectors: dict[str, dict[str, np.ndarray]] = {}
        for length, rows in SHAPES:
            key = f"{rows} x {length}"
            lengths = np.full(rows, length, dtype=np.int32)
            ids = rng.integers(0, min(vocab, 2000), size=rows * length).astype(np.int32)
            best = dict.fromkeys(backends, 0.0)
            for _ in range(ns.rounds):
                for name, b in backends.items():
                    b.embed(ids, lengths)  # warm
                    done, start = 0, time.perf_counter()
                    while time.perf_counter() - start < ns.seconds or not done:
                        out = b.embed(ids, lengths)
                        done += rows * length
                    best[name] = max(best[name], done / (time.perf_counter() - start))
                    vectors.setdefault(key, {})[name] = out / np.linalg.norm(
                        out, axis=1, keepdims=True)
            ref = vectors[key]["plain export"]
            report["results"][key] = {
                name: {"tokens_per_s": best[name],
                       "vs_plain": best[name] / best["plain export"],
                       "min_cosine_to_plain": float((vectors[key][name] * ref).sum(1).min())}
                for name in backends}
            print(f"{key}: " + ", ".join(f"{n} {best[n]:,.0f}" for n in backends), flush=True)
    names = list(graphs)
    lines = ["| batch | " + " | ".join(f"{n} tokens/s" for n in names) + " | " +
             " | ".join(f"{n} / plain" for n in names[1:]) + " | int8 min cosine |",
             "|---" * (2 * len(names) + 1) + "|"]
    for key, row in report["results"].items():
        cos = row.get("prepared int8", {}).get("min_cosine_to_plain")
        lines.append(f"| {key} | " + " | ".join(f"{row[n]['tokens_per_s']:,.0f}" for n in names)
                     + " | " + " | ".join(f"{row[n]['vs_plain']:.2f}x" for n in names[1:])
                     + f" | {cos:.4f} |" if cos is not None else " | — |")
    text = "\n".join(lines)
    print(text)
    report["table"] = text
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {ns.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
