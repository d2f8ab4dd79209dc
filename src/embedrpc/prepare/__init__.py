"""`embedrpc prepare`: a Qwen3 checkpoint → a validated, serving-ready model directory.

The graph is built here from the checkpoint's tensors (builder.py): fused
attention (ONNX Runtime's GroupQueryAttention, rotary inside), fused RMSNorm,
pooling and L2 normalisation in the graph; fp16/bf16 with the fragile parts in
float32, or int8 matrix products for CPUs; validated against float32 and, when
installed, transformers (validate.py) before anything is written (pipeline.py).
"""

from __future__ import annotations

from typing import Any

from .errors import PrepareError
from .pipeline import PRECISIONS, PrepareConfig, prepare

__all__ = ["PRECISIONS", "PrepareConfig", "PrepareError", "add_prepare_parser", "prepare",
           "run_prepare"]


def add_prepare_parser(sub: Any) -> None:
    """The `prepare` subcommand's options (sub: the CLI's subparsers; its parsers have
    add_option, which also reads EMBEDRPC_<FLAG>)."""
    p = sub.add_parser(
        "prepare", help="build a serving-ready model (fused graph; fp16, bf16, int8)",
        description="Turn a Qwen3 embedding checkpoint (config.json + safetensors, "
                    "sentence-transformers layout) into a model directory for `embedrpc "
                    "serve`: fused attention, pooling and normalisation in the graph, the "
                    "requested precision, validated against float32 (and transformers, when "
                    "installed) on built-in texts. Nothing is written if validation fails.")
    p.add_option("--model", help="checkpoint directory, or a Hugging Face id (needs "
                 "huggingface_hub); required")
    p.add_option("--out", help="directory to write; required")
    p.add_option("--precision", default="fp16", choices=PRECISIONS,
                 help="fp16/bf16 for GPUs (norms, residual stream and pooling stay float32), "
                      "int8 for CPUs, fp32")
    p.add_option("--device", default="auto",
                 help="where validation runs: cpu, cuda, cuda:N, or auto (the first GPU "
                      "ONNX Runtime can use, else the CPU; int8 always on the CPU)")
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
                               reference=not ns.no_reference)
    except PrepareError as exc:
        import sys

        print(f"embedrpc prepare: {exc}", file=sys.stderr)
        return 2
    return run_cli(config)
