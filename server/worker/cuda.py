"""ONNX Runtime session settings for a worker's device, and what runs on CUDA.

Decided from ONNX Runtime's contracts, each tested on the CPU (tests/test_cuda_session.py).
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..config import attention_kernel_mask
from .spec import WorkerSpec

PREPARED_INFO = "embedrpc_prepared.json"  # what `embedrpc prepare` writes beside its graph


def cuda_provider_options(spec: WorkerSpec, *, cuda_graphs: bool) -> dict[str, str]:
    """Options of ONNX Runtime's CUDA execution provider for this worker."""
    _, _, index = spec.device.partition(":")
    # TF32 (on by default in the CUDA provider) rounds float32 matrix products to a 10-bit
    # mantissa: a float32 graph would no longer compute float32 (max abs 6e-4 on the demo
    # model). fp16 and bf16 graphs have no float32 products, so it costs them nothing.
    options = {"device_id": str(int(index or 0)), "use_tf32": "0"}
    if cuda_graphs:
        options["enable_cuda_graph"] = "1"
    mask = attention_kernel_mask(spec.options.attention_kernel)
    if mask:
        options["sdpa_kernel"] = str(mask)
    return options


def session_options(spec: WorkerSpec) -> Any:
    """ONNX Runtime session options: CPU threads by device."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    on_cpu = spec.device == "cpu"
    # On a GPU the session's CPU threads only launch kernels: one is enough, and spinning
    # threads would take cores from the main process and the other workers for nothing.
    options.intra_op_num_threads = spec.threads if on_cpu else 1
    options.inter_op_num_threads = 1
    if not (on_cpu and spec.spin):
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def providers(spec: WorkerSpec, *, cuda_graphs: bool) -> list[Any]:
    if spec.device == "cpu":
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", cuda_provider_options(spec, cuda_graphs=cuda_graphs)),
            "CPUExecutionProvider"]


def cuda_precision_check(precision: str, *, cuda_graphs: bool) -> tuple[str, str] | None:
    """Whether a prepared graph of this precision runs on ONNX Runtime's CUDA provider:
    None when it does, else ("refuse" or "warn", why). From the provider's kernel
    registrations (1.31): GroupQueryAttention has CUDA kernels for fp16 and bf16 only, and
    CUDA MatMulInteger takes int8 × int8 only, while the int8 graph's are uint8 × int8.
    Graphs that are not prepared (plain exports: MatMul and Softmax attention) run whole."""
    if precision == "int8":
        return "refuse", (
            "an int8 prepared graph is for the CPU: ONNX Runtime's CUDA MatMulInteger takes "
            "int8 × int8 and this graph's products are uint8 × int8, so every one of them "
            "would run on the CPU. Serve it with --device cpu, or prepare --precision fp16 "
            "or bf16 for a GPU")
    if precision == "fp32" or precision.endswith("-emulated"):
        why = (f"a {precision} prepared graph has no CUDA attention: ONNX Runtime's "
               "GroupQueryAttention runs on CUDA in fp16 and bf16 only, so in this graph it "
               "runs on the CPU, with copies to and from the GPU in every layer")
        if cuda_graphs:
            return "refuse", (f"--cuda-graphs: {why}, and a CUDA graph needs every node on "
                              "the GPU. Prepare --precision fp16 or bf16, or serve without "
                              "--cuda-graphs")
        return "warn", (f"{why} (correct, but slow). Prepare --precision fp16 or bf16 "
                        "for a GPU")
    return None


def prepared_precision(onnx_path: str) -> str | None:
    """The precision `embedrpc prepare` recorded for this graph file, if it made it."""
    path = os.path.join(os.path.dirname(onnx_path), PREPARED_INFO)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        if info["graph"]["file"] != os.path.basename(onnx_path):
            return None  # another graph of the same directory
        return str(info["precision"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_bound(session: Any, binding: Any, run_options: Any, *, sync_inputs: bool) -> None:
    """One run on bound inputs and outputs."""
    if sync_inputs:
        # Copies of inputs from pageable host memory may still be in flight on ONNX
        # Runtime's stream when the run starts; this waits for them.
        binding.synchronize_inputs()
    session.run_with_iobinding(binding, run_options)
