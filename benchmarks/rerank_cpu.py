"""CPU pairs/s of embedrpc's reranker (the server over gRPC, and its graph in-process) vs
the model card's transformers code, one run, side by side; and the parity of the served
scores with the card's, per precision.

    pip install ".[export]"   # torch and transformers, for the model card's side
    python benchmarks/rerank_cpu.py                 # Qwen3-Reranker-0.6B's shape, 28 layers
    python benchmarks/rerank_cpu.py --layers 4      # the same widths, 4 of 28 layers
    python benchmarks/rerank_cpu.py --no-parity     # speed only

Writes a checkpoint of Qwen3-Reranker-0.6B's shape (hidden 1024, 16 × 128 query heads,
8 KV heads, MLP 3072, Qwen's 151,669-token vocabulary, tied LM head) with random
weights from a seed (tests/qwen3_fixtures.py; the real weights cannot be downloaded
here, and speed does not depend on them), builds the fp32 graph `embedrpc prepare`
writes for it (the fused graph ending in the yes/no score; with --validate through
prepare itself, whose validation takes minutes at 28 layers on a small CPU, else with
the same builder and options, unvalidated), then scores the same query–document pairs
in the same batches both ways, batch by batch in turn (one run, side by side):

* model card: its tokenizer call, truncation, prefix/suffix and left padding, then
  AutoModelForCausalLM in float32 and softmax over the last position's yes/no logits;
* embedrpc graph: PairEncoder (the card's tokens, right padding), the prepared graph
  through ONNX Runtime's CPU provider, scores straight out of the graph;
* embedrpc server: the whole server (EmbedServer, as `embedrpc serve` runs it, one CPU
  worker process with --threads threads) serving the prepared directory, called over
  gRPC on 127.0.0.1 with one RerankBatch per batch (its pairs grouped by query); the
  time is the client's, from the request to the scores: tokenizing, routing, the worker
  and the wire included (issue 14's target: ≥ 1.5× the card's code in fp32).

The three sides take each batch in turn, so a busy machine slows them alike. The card and
the graph in-process use --threads threads; the server's worker as many. Times include
tokenizing and padding (the model columns leave them out). Prints a table, writes JSON;
also reports how far each side's scores are from the card's.

Parity (unless --no-parity): the tiny Qwen3-Reranker with Qwen's real tokenizer
(tests/qwen3_fixtures.py) prepared in fp32, fp16 and int8 and served, every reference
pair at the card's max_length scored through the server and compared with
tests/data/qwen3_reranker_reference.json (the card's procedure with transformers): max
|score difference| and whether each query's ranking is the card's. bf16 is not run: ONNX
Runtime's CPU provider has no bf16 kernels (prepare checks it on a bf16-emulating graph).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runners import ServerHost  # noqa: E402  (benchmarks/, the script's own folder)

from embedrpc.client import EmbedClient  # noqa: E402

QUERIES = (
    "What is the capital of China?",
    "how do plants make food",
    "Explain how vaccines train the immune system",
    "Wie hoch ist die Zugspitze?",
)
SENTENCES = (
    "The capital of China is Beijing, a city with a history of more than three thousand "
    "years.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "Vaccines expose the immune system to a harmless part of a pathogen.",
    "Die Zugspitze ist mit 2962 Metern der höchste Berg Deutschlands.",
    "Rivers carry water from mountains to the sea and shape the valleys they cross.",
    "Graphics processors run thousands of small computations in parallel.",
    "长江是中国最长的河流，全长约六千三百公里。",
    "Memory cells remember the pathogen and respond faster the next time.",
)


def documents(count: int, rng: np.random.Generator) -> list[str]:
    """Passages of 2..12 sentences (about 40..250 tokens), the length of retrieved chunks."""
    return [" ".join(rng.choice(SENTENCES, size=int(rng.integers(2, 13))))
            for _ in range(count)]


def build_unvalidated(source: Path, out: Path) -> None:
    """The fp32 graph prepare would write for `source` (same builder, same options; no
    validation), with the tokenizer and config files beside it."""
    import shutil

    from embedrpc.prepare.builder import GraphOptions, build_graph
    from embedrpc.prepare.checkpoint import Weights, read_config
    from embedrpc.prepare.pipeline import save_model
    from embedrpc.server.rerank import PairEncoder

    print("building the fp32 reranker graph (unvalidated; --validate runs prepare)",
          flush=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy2(source / name, out / name)
    encoder = PairEncoder(out)
    model = build_graph(read_config(source), Weights(source), GraphOptions(
        task="rerank", rerank_tokens=(encoder.yes_id, encoder.no_id)))
    save_model(model, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--layers", type=int, default=28,
                        help="decoder layers (Qwen3-Reranker-0.6B has 28)")
    parser.add_argument("--pairs", type=int, default=16,
                        help="query–document pairs (16 at 28 layers: about 4 minutes on 2 "
                             "cores, most of it the model card's side)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per batch, both sides")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--validate", action="store_true",
                        help="make the graph with `embedrpc prepare` (validation included)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the checkpoint and prepared graph here (reused)")
    parser.add_argument("--no-parity", dest="parity", action="store_false",
                        help="leave out the parity of the served scores per precision")
    parser.add_argument("--json", type=Path, default=Path("bench-out/rerank_cpu.json"))
    ns = parser.parse_args(argv)

    import onnxruntime as ort
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from embedrpc.prepare import PrepareConfig, prepare
    from embedrpc.server.rerank import PREFIX, SUFFIX, PairEncoder, format_pair
    from embedrpc.v1 import embedder_pb2 as pb
    from tests import qwen3_fixtures as fx

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(ns.threads)
    shape = fx.RERANKER_SHAPES["0.6b"]
    with tempfile.TemporaryDirectory(prefix="embedrpc-rerank-cpu-") as tmp:
        work = ns.workdir or Path(tmp)
        source = work / f"Qwen3-Reranker-0.6B-shape-{ns.layers}-layers"
        prepared = work / f"prepared-fp32-{ns.layers}-layers"
        started = time.perf_counter()
        if not (source / "model.safetensors").is_file():
            print(f"writing a checkpoint of Qwen3-Reranker-0.6B's shape, {ns.layers} of "
                  f"{shape.layers} layers (random weights)", flush=True)
            fx.write_reranker_checkpoint(source, "0.6b", layers=ns.layers)
        write_s = time.perf_counter() - started
        started = time.perf_counter()
        if not (prepared / "model.onnx").is_file():
            if ns.validate:
                prepare(PrepareConfig(model=str(source), out=prepared, precision="fp32",
                                      device="cpu", reference=False, force=True),
                        say=lambda m: print(f"  {m}", flush=True))
            else:
                build_unvalidated(source, prepared)
        prepare_s = time.perf_counter() - started

        rng = np.random.default_rng(0)
        docs = documents(ns.pairs, rng)
        pairs = [(QUERIES[i % len(QUERIES)], d) for i, d in enumerate(docs)]
        batches = [pairs[i:i + ns.batch] for i in range(0, len(pairs), ns.batch)]

        # The model card's side: its code, on the same checkpoint.
        tokenizer = AutoTokenizer.from_pretrained(str(source), padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
        true_id = tokenizer.convert_tokens_to_ids("yes")
        false_id = tokenizer.convert_tokens_to_ids("no")
        prefix_tokens = tokenizer.encode(PREFIX, add_special_tokens=False)
        suffix_tokens = tokenizer.encode(SUFFIX, add_special_tokens=False)
        max_length = 8192

        def card_inputs(batch: list[tuple[str, str]]) -> Any:
            texts = [format_pair(q, d) for q, d in batch]
            inputs = tokenizer(texts, padding=False, truncation="longest_first",
                               return_attention_mask=False,
                               max_length=max_length - len(prefix_tokens) - len(suffix_tokens))
            for i, ele in enumerate(inputs["input_ids"]):
                inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
            return tokenizer.pad(inputs, padding=True, return_tensors="pt")

        @torch.no_grad()
        def card_scores(inputs: Any) -> list[float]:
            logits = model(**inputs).logits[:, -1, :]
            pair = torch.stack([logits[:, false_id], logits[:, true_id]], dim=1)
            return torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp().tolist()

        # embedrpc's side: the server's tokenization and the prepared graph.
        encoder = PairEncoder(prepared)
        options = ort.SessionOptions()
        options.intra_op_num_threads = ns.threads
        options.log_severity_level = 3
        session = ort.InferenceSession(str(prepared / "model.onnx"), options,
                                       providers=["CPUExecutionProvider"])

        def graph_inputs(batch: list[tuple[str, str]]) -> dict[str, np.ndarray]:
            rows = encoder.encode_pairs(batch).ids
            width = max(len(r) for r in rows)
            ids = np.full((len(rows), width), encoder.pad_id, dtype=np.int64)
            mask = np.zeros_like(ids)
            for i, row in enumerate(rows):
                ids[i, :len(row)], mask[i, :len(row)] = row, 1
            return {"input_ids": ids, "attention_mask": mask}

        def graph_scores(feeds: dict[str, np.ndarray]) -> list[float]:
            return session.run(["score"], feeds)[0].tolist()

        # embedrpc's server: the prepared directory served as `embedrpc serve` serves it.
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        host = ServerHost(str(ns.json.with_suffix(".server.log")), model=str(prepared),
                          device="cpu", workers=1, max_inputs=max(ns.batch, 1))
        client = EmbedClient(f"127.0.0.1:{host.port}", timeout=3600)

        def server_scores(batch: list[tuple[str, str]]) -> tuple[list[float], int]:
            """One RerankBatch holding the batch's pairs, grouped by query → scores in the
            batch's order, and the tokens the server counted."""
            queries = list(dict.fromkeys(q for q, _ in batch))
            where = [(queries.index(q), sum(1 for p, _ in batch[:i] if p == q))
                     for i, (q, _) in enumerate(batch)]
            request = pb.RerankBatchRequest(requests=[
                pb.RerankRequest(query=q, documents=[d for p, d in batch if p == q])
                for q in queries])
            reply = client.reranker.RerankBatch(request, timeout=3600)
            by_query = [{r.index: r.score for r in response.results}
                        for response in reply.responses]
            return [by_query[qi][di] for qi, di in where], reply.usage.prompt_tokens

        try:
            # Warm every side (first-run allocations), then one pass over the batches, the
            # sides in turn.
            card_scores(card_inputs(batches[0][:2]))
            graph_scores(graph_inputs(batches[0][:2]))
            server_scores(batches[0][:2])
            names = {"card": "model card (transformers)",
                     "graph": "embedrpc graph (ONNX Runtime)",
                     "server": "embedrpc server (gRPC)"}
            totals = {name: [0.0, 0.0] for name in names.values()}
            scores: dict[str, list[float]] = {side: [] for side in names}
            tokens = served_tokens = 0
            for n, batch in enumerate(batches):
                t0 = time.perf_counter()
                inputs = card_inputs(batch)
                t1 = time.perf_counter()
                scores["card"] += card_scores(inputs)
                t2 = time.perf_counter()
                feeds = graph_inputs(batch)
                t3 = time.perf_counter()
                scores["graph"] += graph_scores(feeds)
                t4 = time.perf_counter()
                got, counted = server_scores(batch)
                t5 = time.perf_counter()
                scores["server"] += got
                totals[names["card"]][0] += t2 - t0
                totals[names["card"]][1] += t2 - t1
                totals[names["graph"]][0] += t4 - t2
                totals[names["graph"]][1] += t4 - t3
                totals[names["server"]][0] += t5 - t4
                totals[names["server"]][1] += t5 - t4  # no separate model time from outside
                tokens += int(feeds["attention_mask"].sum())
                served_tokens += counted
                print(f"  batch {n + 1}/{len(batches)}: card {t2 - t0:.2f}s, graph "
                      f"{t4 - t2:.2f}s, server {t5 - t4:.2f}s", flush=True)
            worker = host.server.workers[0].info
        finally:
            client.close()
            host.close()
        assert served_tokens == tokens, (served_tokens, tokens)
        card = np.array(scores["card"])
        diffs = {side: float(np.abs(np.array(scores[side]) - card).max())
                 for side in ("graph", "server")}
        parity = measure_parity(work) if ns.parity else None

    card_total = totals[names["card"]][0]
    rows_out = []
    for name, (total, model_only) in totals.items():
        rows_out.append({"method": name, "pairs": len(pairs), "tokens": tokens,
                         "seconds": round(total, 3), "pairs_per_s": len(pairs) / total,
                         "tokens_per_s": tokens / total,
                         "model_pairs_per_s": (len(pairs) / model_only
                                               if name != names["server"] else None),
                         "speedup": card_total / total})
    print()
    print(f"Qwen3-Reranker-0.6B shape, {ns.layers} of {shape.layers} layers, random weights; "
          f"{len(pairs)} pairs ({tokens:,} tokens, {tokens / len(pairs):.0f} per pair), "
          f"batches of {ns.batch}, {ns.threads} threads, float32")
    header = f"{'method':<32}{'pairs/s':>10}{'tokens/s':>11}{'model pairs/s':>15}{'vs card':>9}"
    print(header)
    print("-" * len(header))
    for r in rows_out:
        model_rate = "" if r["model_pairs_per_s"] is None else f"{r['model_pairs_per_s']:.2f}"
        print(f"{r['method']:<32}{r['pairs_per_s']:>10.2f}{r['tokens_per_s']:>11.0f}"
              f"{model_rate:>15}{r['speedup']:>8.2f}x")
    server_speedup = rows_out[2]["speedup"]
    print(f"max |score difference| to the card's: graph {diffs['graph']:.2e}, server "
          f"{diffs['server']:.2e}")
    print(f"issue 14's target: the server ≥ 1.5x the card's code in fp32: "
          f"{server_speedup:.2f}x, {'PASS' if server_speedup >= 1.5 else 'MISS'}")
    if parity is not None:
        print()
        print("Parity through the server (tiny Qwen3-Reranker, Qwen's tokenizer; "
              f"{parity['pairs']} reference pairs at the card's max_length)")
        header = (f"{'precision':<11}{'max |score diff|':>18}{'issue bound':>13}"
                  f"{'within':>8}{'ranking':>11}")
        print(header)
        print("-" * len(header))
        for precision, row in parity["precisions"].items():
            if row.get("skipped"):
                print(f"{precision:<11}  {row['skipped']}")
                continue
            print(f"{precision:<11}{row['max_abs']:>18.2e}{row['allowed']:>13g}"
                  f"{'yes' if row['max_abs'] <= row['allowed'] else 'NO':>8}"
                  f"{'identical' if row['ranking_identical'] else 'changed':>11}")
    report = {
        "shape": {**fx.describe_reranker("0.6b"), "layers": ns.layers},
        "pairs": len(pairs), "tokens": tokens, "batch": ns.batch, "threads": ns.threads,
        "results": rows_out, "target_server_vs_card": 1.5,
        "server_vs_card": server_speedup,
        "max_abs_score_difference": diffs, "server_worker": worker,
        "parity": parity,
        "checkpoint_write_s": round(write_s, 1), "graph_s": round(prepare_s, 1),
        "graph_validated": ns.validate,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnxruntime": ort.__version__},
        "cpu": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
    }
    ns.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {ns.json}")
    return 0


# Issue 14's bounds on max |score difference| to the card, per precision.
PARITY_BOUNDS = {"fp32": 1e-4, "fp16": 2e-3, "int8": 1e-2}
# What prepare is told to accept where the bound is out of reach on the tiny
# model (tests/test_rerank_prepare.py measured int8 at 0.048).
PARITY_MAX_SCORE_DIFF = {"int8": 0.08}


def measure_parity(work: Path) -> dict[str, Any]:
    """The tiny reranker prepared in each precision and served: its scores of the
    reference pairs at the card's max_length against the card's."""
    from embedrpc.prepare import PrepareConfig, prepare
    from tests import qwen3_fixtures as fx

    reference = json.loads((ROOT / "tests" / "data" / "qwen3_reranker_reference.json")
                           .read_text(encoding="utf-8"))
    cases = [c for c in reference["cases"] if c["max_length"] == 8192]
    groups = [g for c in cases for g in c["groups"]]
    want = np.array([s for g in groups for s in g["scores"]])
    source = work / "parity" / "Qwen3-Reranker-tiny"
    if not (source / "model.safetensors").is_file():
        fx.write_reranker_checkpoint(source)
    out: dict[str, Any] = {"pairs": len(want), "precisions": {}}
    for precision, bound in PARITY_BOUNDS.items():
        directory = work / "parity" / f"prepared-{precision}"
        if not (directory / "model.onnx").is_file():
            prepare(PrepareConfig(model=str(source), out=directory, precision=precision,
                                  device="cpu", reference=False, force=True,
                                  max_score_diff=PARITY_MAX_SCORE_DIFF.get(precision)),
                    say=lambda _: None)
        host = ServerHost(str(work / "parity" / f"{precision}.log"), model=str(directory),
                          device="cpu", workers=1)
        try:
            with EmbedClient(f"127.0.0.1:{host.port}", timeout=600) as client:
                got = np.array([
                    {r.index: r.score for r in client.rerank(
                        g["query"], g["documents"], instruction=c["instruction"] or "")}[i]
                    for c in cases for g in c["groups"] for i in range(len(g["documents"]))])
        finally:
            host.close()
        out["precisions"][precision] = {
            "max_abs": float(np.abs(got - want).max()), "allowed": bound,
            "ranking_identical": fx.ranking_swaps(got, want, groups, bound) == []}
    out["precisions"]["bf16"] = {"skipped": "not run: ONNX Runtime's CPU provider has no "
                                            "bf16 kernels (GPU only)"}
    return out


if __name__ == "__main__":
    sys.exit(main())
