"""How a worker sets up ONNX Runtime for a CUDA device, checked on the CPU.

No GPU is needed: these are the options and decisions the worker hands to ONNX
Runtime, compared with what its CUDA provider documents (provider option names and
values, the `sdpa_kernel` bitmask of attention_common.h) and with the kernel
registrations of its CUDA provider (1.31: GroupQueryAttention in fp16 and bf16 only,
MatMulInteger int8 × int8 only). What a GPU does with them is tests/test_gpu.py's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedrpc.prepare import PrepareConfig, prepare
from embedrpc.server import EmbedServer, ServeConfig
from embedrpc.server.config import attention_kernel_mask
from embedrpc.server.errors import ModelError
from embedrpc.server.worker import backends as worker_module
from embedrpc.server.worker.backends import OrtBackend
from embedrpc.server.worker.cuda import (
    cuda_precision_check,
    cuda_provider_options,
    prepared_precision,
    providers,
    run_bound,
    session_options,
)
from embedrpc.server.worker.spec import WorkerSpec

from .helpers import TINY_SOURCE


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cuda-session")
    out = {}
    for precision in ("fp32", "int8"):
        out[precision] = tmp / precision
        prepare(PrepareConfig(model=str(TINY_SOURCE), out=out[precision], precision=precision,
                              device="cpu", reference=False), say=lambda _: None)
    return out


# ------------------------------------------------------------------ provider options


def test_cuda_provider_options() -> None:
    spec = WorkerSpec.of(device="cuda:1")
    # TF32 off always (float32 graphs must compute float32); the device by index.
    assert cuda_provider_options(spec, cuda_graphs=False) == {"device_id": "1",
                                                              "use_tf32": "0"}
    assert cuda_provider_options(WorkerSpec.of(device="cuda"), cuda_graphs=True) == {
        "device_id": "0", "use_tf32": "0", "enable_cuda_graph": "1"}
    flash = WorkerSpec.of(device="cuda:0", attention_kernel="flash,efficient")
    assert cuda_provider_options(flash, cuda_graphs=False)["sdpa_kernel"] == "3"
    assert providers(flash, cuda_graphs=True) == [
        ("CUDAExecutionProvider", {"device_id": "0", "use_tf32": "0",
                                   "enable_cuda_graph": "1", "sdpa_kernel": "3"}),
        "CPUExecutionProvider"]
    assert providers(WorkerSpec.of(device="cpu"), cuda_graphs=False) == ["CPUExecutionProvider"]


def test_attention_kernel_names_are_the_sdpa_kernel_bits() -> None:
    # AttentionBackend in onnxruntime's attention_common.h: FLASH_ATTENTION = 1,
    # EFFICIENT_ATTENTION = 2, CUDNN_FLASH_ATTENTION = 8, MATH = 16; 0 is ORT's default.
    assert attention_kernel_mask("auto") == 0
    assert attention_kernel_mask("flash") == 1
    assert attention_kernel_mask("efficient") == 2
    assert attention_kernel_mask("cudnn") == 8
    assert attention_kernel_mask("math") == 16
    assert attention_kernel_mask(" Flash , math") == 17
    with pytest.raises(ValueError, match="use auto, or one or more of flash, efficient"):
        attention_kernel_mask("fastest")


def test_attention_kernel_is_a_serve_option() -> None:
    with pytest.raises(ValueError, match="--attention-kernel: attention kernel 'trt'"):
        ServeConfig.of(attention_kernel="trt")
    server = EmbedServer(ServeConfig.of(model="demo", device="cpu", attention_kernel="cudnn"))
    assert {w.spec.options.attention_kernel for w in server.workers} == {"cudnn"}
    from embedrpc.cli import parse_args

    assert parse_args(["serve", "--attention-kernel", "flash,efficient"]).attention_kernel \
        == "flash,efficient"
    assert parse_args(["serve"]).attention_kernel == "auto"


# ------------------------------------------------------------------ threads


def test_cuda_sessions_get_one_thread_that_does_not_spin() -> None:
    options = session_options(WorkerSpec.of(device="cuda:0", threads=8, spin=True))
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_cpu_sessions_keep_their_threads() -> None:
    options = session_options(WorkerSpec.of(device="cpu", threads=3))
    assert options.intra_op_num_threads == 3
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spinning = session_options(WorkerSpec.of(device="cpu", threads=3, spin=True))
    assert spinning.intra_op_num_threads == 3
    with pytest.raises(Exception, match="allow_spinning"):  # not set: ORT's default (spin)
        spinning.get_session_config_entry("session.intra_op.allow_spinning")


# ------------------------------------------------------------------ precision on CUDA


@pytest.mark.parametrize(("precision", "graphs", "verdict"), [
    ("fp16", False, None), ("fp16", True, None), ("bf16", True, None),
    ("float32", True, None),  # a plain export: MatMul/Softmax attention, all on CUDA
    ("float16", True, None),
    ("fp32", False, "warn"), ("fp32", True, "refuse"),
    ("fp16-emulated", False, "warn"), ("bf16-emulated", True, "refuse"),
    ("int8", False, "refuse"), ("int8", True, "refuse"),
])
def test_cpu_only_precisions_on_cuda(precision: str, graphs: bool, verdict: str | None) -> None:
    result = cuda_precision_check(precision, cuda_graphs=graphs)
    assert (result and result[0]) == verdict
    if result:
        assert "fp16 or bf16" in result[1]  # says what to do instead
        assert ("MatMulInteger" if precision == "int8" else "GroupQueryAttention") in result[1]


def test_prepared_precision_is_read_beside_the_graph(prepared: dict[str, Path],
                                                     tmp_path: Path) -> None:
    assert prepared_precision(str(prepared["fp32"] / "model.onnx")) == "fp32"
    assert prepared_precision(str(prepared["int8"] / "model.onnx")) == "int8"
    # Another graph file of the directory, or no embedrpc_prepared.json: unknown.
    assert prepared_precision(str(prepared["int8"] / "other.onnx")) is None
    assert prepared_precision(str(tmp_path / "model.onnx")) is None
    (tmp_path / "embedrpc_prepared.json").write_text("{not json")
    assert prepared_precision(str(tmp_path / "model.onnx")) is None


def test_cpu_only_prepared_graphs_are_refused_on_cuda(prepared: dict[str, Path]) -> None:
    # Refused before any CUDA session is made (none could be here), with the reason.
    with pytest.raises(ModelError, match="int8 prepared graph is for the CPU"):
        OrtBackend(WorkerSpec.of(onnx_path=str(prepared["int8"] / "model.onnx"),
                              device="cuda:0"))
    with pytest.raises(ModelError, match="--cuda-graphs: a fp32 prepared graph has no CUDA "
                                         "attention"):
        OrtBackend(WorkerSpec.of(onnx_path=str(prepared["fp32"] / "model.onnx"),
                              device="cuda:0", cuda_graphs=True))


def test_precision_is_checked_from_the_graph_when_nothing_is_beside_it(
        prepared: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without embedrpc_prepared.json the graph's own metadata says int8, once loaded (the
    # session is made on the CPU here, standing in for a CUDA one).
    import onnxruntime as ort

    shutil.copy(prepared["int8"] / "model.onnx", tmp_path / "model.onnx")

    def load_on_cpu(self: OrtBackend, *, cuda_graphs: bool) -> Any:
        return ort.InferenceSession(self.spec.onnx_path, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(OrtBackend, "_load", load_on_cpu)
    with pytest.raises(ModelError, match="int8 prepared graph is for the CPU"):
        OrtBackend(WorkerSpec.of(onnx_path=str(tmp_path / "model.onnx"), device="cuda:0"))
    info = json.loads((prepared["int8"] / "embedrpc_prepared.json").read_text())
    assert info["precision"] == "int8"  # the fixture is what the test says it is


# ------------------------------------------------------------------ runs


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def synchronize_inputs(self) -> None:
        self.calls.append("synchronize_inputs")

    def run_with_iobinding(self, binding: Any, options: Any) -> None:
        assert binding is self
        self.calls.append(f"run {options}")


def test_inputs_are_synchronised_before_each_run_on_cuda() -> None:
    binding = _Recorder()
    run_bound(binding, binding, "opts", sync_inputs=True)
    run_bound(binding, binding, "opts", sync_inputs=True)
    assert binding.calls == ["synchronize_inputs", "run opts"] * 2
    on_cpu = _Recorder()
    run_bound(on_cpu, on_cpu, "opts", sync_inputs=False)
    assert on_cpu.calls == ["run opts"]


def test_every_run_goes_through_run_bound(prepared: dict[str, Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Both the exact path and the bucketed one (whose bindings are reused) run through
    # run_bound, which synchronises inputs on CUDA devices (not on this CPU one).
    seen: list[bool] = []
    real = worker_module.run_bound

    def recording(session: Any, binding: Any, options: Any, *, sync_inputs: bool) -> None:
        seen.append(sync_inputs)
        real(session, binding, options, sync_inputs=sync_inputs)

    monkeypatch.setattr(worker_module, "run_bound", recording)
    backend = OrtBackend(WorkerSpec.of(onnx_path=str(prepared["fp32"] / "model.onnx"),
                                    static_shapes=True, max_length=128))
    ids, lengths = np.arange(1, 8, dtype=np.int32), np.array([3, 4], np.int32)
    backend.embed_exact(ids, lengths)
    assert seen == [False]
    backend.embed(ids, lengths)  # first use of a bucket: eager run, replay, exact run
    assert seen == [False] * 4
