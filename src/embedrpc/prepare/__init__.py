"""`embedrpc prepare`: a Qwen3 checkpoint → a validated, serving-ready model directory.

The graph is built here from the checkpoint's tensors (builder.py): fused
attention (ONNX Runtime's GroupQueryAttention, rotary inside), fused RMSNorm,
pooling and L2 normalisation in the graph; fp16/bf16 with the fragile parts in
float32, or int8 matrix products for CPUs; validated against float32 and, when
installed, transformers (validate.py) before anything is written (pipeline.py).

Rerankers (Qwen3-Reranker, `--task rerank`, or auto: a checkpoint named "reranker")
get the same graph body ending in the model card's yes/no score, validated by score
difference and ranking; the directory records its task (embedrpc_prepared.json) and
embedrpc.server.tasks.model_task reads it back.
"""

from __future__ import annotations

from typing import Any

from .errors import PrepareError
from .pipeline import PRECISIONS, PrepareConfig, prepare

TASK_CHOICES = ("auto", "embed", "rerank")

__all__ = ["PRECISIONS", "TASK_CHOICES", "PrepareConfig", "PrepareError", "add_prepare_parser",
           "prepare", "run_prepare"]


def add_prepare_parser(sub: Any) -> None:
    """The `prepare` subcommand's options (sub: the CLI's subparsers; its parsers have
    add_option, which also reads EMBEDRPC_<FLAG>)."""
    p = sub.add_parser(
        "prepare", help="build a serving-ready model (fused graph; fp16, bf16, int8)",
        description="Turn a Qwen3 embedding checkpoint (config.json + safetensors, "
                    "sentence-transformers layout) into a model directory for `embedrpc "
                    "serve`: fused attention, pooling and normalisation in the graph, the "
                    "requested precision, validated against float32 (and transformers, when "
                    "installed) on built-in texts. A Qwen3-Reranker checkpoint becomes a "
                    "graph that outputs the model card's relevance score, validated by "
                    "score difference and ranking on built-in query-document pairs. "
                    "Nothing is written if validation fails.")
    p.add_option("--model", help="checkpoint directory, or a Hugging Face id (needs "
                 "huggingface_hub); required")
    p.add_option("--out", help="directory to write; required")
    p.add_option("--precision", default="fp16", choices=PRECISIONS,
                 help="fp16/bf16 for GPUs (norms, residual stream and pooling stay float32), "
                      "int8 for CPUs, fp32")
    p.add_option("--device", default="auto",
                 help="where validation runs: cpu, cuda, cuda:N, or auto (the first GPU "
                      "ONNX Runtime can use, else the CPU; int8 always on the CPU)")
    p.add_option("--task", default="auto", choices=TASK_CHOICES,
                 help="embed (pooled vectors) or rerank (Qwen3-Reranker's yes/no score); "
                      "auto: a checkpoint whose directory name or hub id contains "
                      "'reranker' is a reranker, unless it has sentence-transformers files")
    p.add_option("--max-score-diff", type=float, default=None,
                 default_text="1e-4 fp32 (to transformers), 2e-3 fp16/bf16, 1e-2 int8",
                 help="rerankers: the largest |score difference| validation accepts "
                      "between the prepared precision and float32")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the comparison with transformers (made only when torch and "
                        "transformers are installed)")


def run_prepare(ns: Any) -> int:
    from pathlib import Path

    from .pipeline import run_cli

    try:
        if not ns.model or not ns.out:
            raise PrepareError("--model and --out are required")
        config = PrepareConfig(model=ns.model, out=Path(ns.out), precision=ns.precision,
                               device=ns.device, force=ns.force,
                               reference=not ns.no_reference, task=ns.task,
                               max_score_diff=ns.max_score_diff)
    except PrepareError as exc:
        import sys

        print(f"embedrpc prepare: {exc}", file=sys.stderr)
        return 2
    return run_cli(config)
