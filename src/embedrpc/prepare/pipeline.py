"""`embedrpc prepare`: checkpoint → validated, serving-ready model directory.

Steps: read the checkpoint; build the float32 graph (with per-layer activation
probes); tokenize the built-in validation texts as the server will; run the
float32 graph (batched and one text at a time) and, when installed,
transformers; build the requested precision (fp16 with range-derived scalings,
bf16, or int8 with per-token activation scales); compare; only then move the
directory into place. Nothing is left at `--out` when a check fails.

The task (`--task`, embedrpc.server.tasks.model_task when auto) decides what the
graph ends in: pooled vectors for embedding models, or Qwen3-Reranker's relevance
score for rerankers, whose validation compares scores (max |difference| and each
query's ranking, validate.RERANK_MAX_ABS) on built-in query–document pairs
tokenized as the model card does (embedrpc.server.rerank). embedrpc_prepared.json
records the task, so `serve` needs no flag for it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import validate as v
from .builder import (
    OPSET,
    TASKS,
    GraphOptions,
    build_graph,
    fp16_scales,
    graph_summary,
    strip_probes,
)
from .checkpoint import Weights, read_config, resolve_source
from .errors import PrepareError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# protobuf cannot hold more than 2 GiB; keep weights beside the graph well before that.
EXTERNAL_DATA_BYTES = 1 << 30
# Longest validation input: enough to exercise long-range attention, short enough for a CPU.
VALIDATION_MAX_LENGTH = {"cpu": 512, "cuda": 2048}
INFO_FILE = "embedrpc_prepared.json"
_SKIP_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".onnx", ".onnx_data", ".data",
                  ".msgpack", ".h5", ".ot", ".gguf"}
_SKIP_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", INFO_FILE}
_SKIP_DIRS = {"onnx", ".git", ".cache", "openvino"}


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    model: str
    out: Path
    precision: str = "fp16"
    device: str = "auto"  # where validation runs: auto, cpu, cuda or cuda:N
    force: bool = False  # replace an existing --out directory
    reference: bool = True  # also compare with transformers when it is installed
    # Power-of-two scalings that keep fp16 inside its range (off only to show why they exist).
    fp16_guard: bool = True
    graph_options: dict[str, Any] = field(default_factory=dict)  # tests: e.g. pooling
    # embed, rerank, or auto: decided from the source (embedrpc.server.tasks.model_task)
    task: str = "auto"
    # Rerankers: the largest |score difference| the precision's check accepts (None: the
    # issue's bounds, validate.RERANK_MAX_ABS).
    max_score_diff: float | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise PrepareError(f"--precision {self.precision!r}: use one of "
                               f"{', '.join(PRECISIONS)}")
        if self.task not in ("auto", *TASKS):
            raise PrepareError(f"--task {self.task!r}: use auto, {', '.join(TASKS)}")
        if self.max_score_diff is not None and not 0 < self.max_score_diff < 1:
            raise PrepareError(f"--max-score-diff {self.max_score_diff}: use a number "
                               "between 0 and 1")
        if self.device == "auto":
            object.__setattr__(self, "device", _auto_device(self.precision))
        if not (self.device == "cpu" or self.device == "cuda" or
                (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise PrepareError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.precision == "int8" and self.device != "cpu":
            raise PrepareError("--precision int8 is for the CPU (ONNX Runtime's integer "
                               "kernels); use fp16 or bf16 for GPUs, or --device cpu")


def _auto_device(precision: str) -> str:
    """cuda:0 where ONNX Runtime can use a GPU (int8: always the CPU), else cpu."""
    if precision == "int8":
        return "cpu"
    import onnxruntime as ort

    from embedrpc.server.devices import cuda_device_count

    usable = "CUDAExecutionProvider" in ort.get_available_providers()
    return "cuda:0" if usable and cuda_device_count() else "cpu"


def _say(message: str) -> None:
    print(f"[prepare] {message}", flush=True)


def save_model(model: Any, directory: Path) -> Path:
    """model.onnx in `directory` (created), weights in model.onnx_data when large."""
    import onnx

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="model.onnx_data",
                        size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def _external(directory: Path) -> bool:
    return (directory / "model.onnx_data").exists()


def _copy_side_files(source: Path, staging: Path) -> list[str]:
    """Tokenizer, configs and sentence-transformers modules: everything but weights."""
    copied = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if any(part in _SKIP_DIRS for part in rel.parts) or not path.is_file():
            continue
        if path.suffix in _SKIP_SUFFIXES or path.name in _SKIP_NAMES:
            continue
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, staging / rel)
        copied.append(rel.as_posix())
    # sentence-transformers' Normalize module has no files; git and the hub drop empty
    # folders, so an empty one need not be made here.
    return copied


def _move_graph(src_dir: Path, dst_dir: Path) -> None:
    for name in ("model.onnx", "model.onnx_data"):
        target = dst_dir / name
        target.unlink(missing_ok=True)
        if (src_dir / name).exists():
            shutil.move(str(src_dir / name), str(target))


def prepare(config: PrepareConfig, say: Callable[[str], None] = _say) -> dict[str, Any]:
    """Build, validate and write the model directory; returns what embedrpc_prepared.json
    holds. Raises PrepareError (nothing written) when anything fails."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise PrepareError("embedrpc prepare needs the onnx package: "
                           "pip install onnx (an embedrpc dependency)") from None
    from embedrpc import __version__
    from embedrpc.server.model import pooling_of

    started = time.perf_counter()
    out = config.out.expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not config.force:
        raise PrepareError(f"--out {out} exists and is not empty; use --force to replace it")
    source = resolve_source(config.model)
    say(f"source {source}")
    task = source_task(config.model, source, config.task)
    arch = read_config(source)
    if not (source / "tokenizer.json").is_file():
        raise PrepareError(f"{source}: no tokenizer.json; a checkpoint directory needs it "
                           "beside config.json and the safetensors weights (with "
                           "tokenizer_config.json), as the model's publisher ships them")
    weights = Weights(source)
    if task == "rerank":
        pooling, normalize = "lasttoken", False
        say(f"Qwen3 reranker{' (the name says so)' if config.task == 'auto' else ''}: "
            f"{arch.layers} layers, hidden {arch.hidden_size}, {arch.heads} heads / "
            f"{arch.kv_heads} KV heads × {arch.head_dim}, vocab {arch.vocab_size}; weights "
            f"{', '.join(sorted(weights.stored_dtypes()))}; LM head "
            f"{'lm_head.weight' if 'lm_head.weight' in weights else 'tied to the embeddings'}")
    else:
        pooling, normalize = pooling_of(source)
        say(f"Qwen3: {arch.layers} layers, hidden {arch.hidden_size}, {arch.heads} heads / "
            f"{arch.kv_heads} KV heads × {arch.head_dim}, vocab {arch.vocab_size}; weights "
            f"{', '.join(sorted(weights.stored_dtypes()))}; pooling {pooling}"
            f"{', normalised' if normalize else ''}")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    work = staging / ".work"
    try:
        if task == "rerank":
            info = _prepare_rerank_in(config, source, arch, weights, staging, work, say)
        else:
            info = _prepare_in(config, source, arch, weights, pooling, normalize, staging,
                               work, say)
        shutil.rmtree(work, ignore_errors=True)
        graph_bytes = sum(p.stat().st_size for p in staging.glob("model.onnx*"))
        info.update({
            "embedrpc_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - started, 1),
        })
        info["graph"]["bytes"] = graph_bytes
        info["graph"]["external_data"] = _external(staging)
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"wrote {out} ({graph_bytes / 1e6:,.1f} MB graph) in {info['seconds']:.0f}s")
    return info


def _prepare_in(config: PrepareConfig, source: Path, arch: Any, weights: Weights,
                pooling: str, normalize: bool, staging: Path, work: Path,
                say: Callable[[str], None]) -> dict[str, Any]:
    import onnx

    device_kind = "cpu" if config.device == "cpu" else "cuda"
    precision = config.precision
    options = {"pooling": pooling, "normalize": normalize, **config.graph_options}
    copied = _copy_side_files(source, staging)
    say(f"copied {len(copied)} tokenizer/config files")

    t = time.perf_counter()
    say("building the float32 graph (reference, with activation probes)")
    reference_model = build_graph(arch, weights, GraphOptions(probes=True, **options),
                                  progress=lambda m: say(f"  {m}"))
    save_model(reference_model, work / "reference")
    say(f"  built in {time.perf_counter() - t:.1f}s")
    unused = weights.unused()
    if unused:
        say(f"  checkpoint tensors not used: {', '.join(unused[:5])}"
            f"{' ...' if len(unused) > 5 else ''}")

    max_length = VALIDATION_MAX_LENGTH[device_kind]
    rows, kinds, pad_id = v.tokenize(staging, onnx_file=".work/reference/model.onnx",
                                     max_length=max_length)
    lengths = [len(r) for r in rows]
    say(f"validation: {len(rows)} texts, {min(lengths)}..{max(lengths)} tokens "
        f"({sum(lengths):,} in all), batches of {v.BATCH_ROWS}, right-padded, on "
        f"{config.device}")
    placement = v.reference_placement(config.device)
    if device_kind != "cpu":
        say(f"  the float32 reference runs on {placement}")

    t = time.perf_counter()
    runner = v.Runner(work / "reference" / "model.onnx", config.device)
    probe_names = [o.name for o in runner.session.get_outputs() if o.name.startswith("probe.")]
    batched, *probe_values = runner.embed(rows, pad_id,
                                          outputs=["sentence_embedding", *probe_names])
    maxima = {name: float(np.max(values)) for name, values in zip(probe_names, probe_values,
                                                                    strict=True)}
    alone = runner.embed(rows, pad_id, batch_rows=1)[0]
    del runner
    say(f"float32 graph: done in {time.perf_counter() - t:.1f}s")
    invariance = float(np.abs(batched - alone).max())
    problems = []
    if not np.isfinite(batched).all():
        problems.append("the float32 graph gives non-finite values")
    if not invariance <= v.BATCH_INVARIANCE_MAX_ABS:
        problems.append(f"the float32 graph is not batch-invariant: batched vs alone differ "
                        f"by {invariance:.2e} (allowed {v.BATCH_INVARIANCE_MAX_ABS})")
    say(f"  batch invariance (batched vs alone): max abs {invariance:.2e}")
    report: dict[str, Any] = {
        "device": config.device, "texts": len(rows), "tokens": sum(lengths),
        "max_tokens": max(lengths), "threshold": v.THRESHOLDS[precision],
        "reference_device": placement,
        "batch_invariance_max_abs": invariance,
        "activation_absmax": {"attention": max((x for k, x in maxima.items()
                                                if k.endswith(".attention")), default=0.0),
                              "mlp": max((x for k, x in maxima.items()
                                          if k.endswith(".mlp")), default=0.0)},
    }

    if config.reference:
        hf = v.transformers_reference(source, rows, pooling, normalize, lambda m: say(m))
        if hf is None:
            report["fp32_vs_transformers"] = "skipped: torch/transformers not installed"
            say("transformers reference: skipped (torch/transformers not installed)")
        else:
            stats = v.compare(alone, hf)
            report["fp32_vs_transformers"] = v.summary(stats)
            say(f"  float32 graph vs transformers: min cosine {stats['min_cosine']:.7f}, "
                f"max abs {stats['max_abs']:.2e}")
            problem = v.check("float32 graph vs transformers", stats, v.REFERENCE_COSINE, kinds)
            if problem:
                problems.append(problem + " (the graph does not compute this model)")
    else:
        report["fp32_vs_transformers"] = "skipped: --no-reference"
    if problems:
        raise PrepareError("validation failed, nothing written: " + "; ".join(problems))

    scales: dict[int, tuple[float, float]] = {}
    del reference_model  # saved; with external data, its tensors now point into that file
    if precision == "fp32":
        # The reference itself, less its probe outputs (rewriting the graph file only: the
        # weights stay where they are).
        final_dir = work / "reference"
        path = final_dir / "model.onnx"
        onnx.save(strip_probes(onnx.load(str(path), load_external_data=False)), str(path))
        report["vs_fp32"] = "is the float32 graph"
        if device_kind != "cpu":
            say("note: a float32 graph is a reference: served on a GPU its attention runs "
                "on the CPU (slow) and --cuda-graphs refuses it; prepare fp16 or bf16 to "
                "serve on a GPU")
    else:
        final_dir, runs = _build_candidate(config, arch, weights, options, maxima, work,
                                           device_kind, say, scales)
        report["checks"] = {}
        for method, run_dir in runs:
            t = time.perf_counter()
            got = v.Runner(run_dir / "model.onnx", config.device).embed(rows, pad_id)[0]
            stats = v.compare(got, batched)
            report["checks"][method] = v.summary(stats)
            say(f"{precision} vs float32 ({method}): min cosine {stats['min_cosine']:.6f}, "
                f"mean {stats['mean_cosine']:.6f}, max abs {stats['max_abs']:.2e} "
                f"({time.perf_counter() - t:.1f}s)")
            problem = v.check(f"{precision} vs float32 ({method})", stats,
                              v.THRESHOLDS[precision], kinds)
            if problem:
                hint = "; try --precision bf16" if precision == "fp16" else ""
                raise PrepareError(f"validation failed, nothing written: {problem}{hint}")
        report["method"] = " + ".join(report["checks"])
        report["vs_fp32"] = min(report["checks"].values(), key=lambda c: c["min_cosine"])
    _move_graph(final_dir, staging)
    summary = graph_summary(onnx.load(str(staging / "model.onnx"), load_external_data=False))
    return {
        "format": 1,
        "task": "embed",
        "source": config.model,
        "precision": precision,
        "pooling": pooling,
        "normalized": normalize,
        "graph": {"file": "model.onnx", "opset": OPSET, **summary},
        "architecture": arch.as_dict(),
        "fp16_scales": {str(k): list(s) for k, s in sorted(scales.items())},
        "validation": report,
    }


def source_task(model: str, source: Path, task: str) -> str:
    """The task to prepare `source` (the directory `model` resolved to) for: `task`, or
    when auto, embedrpc.server.tasks' rules (a hub id's name counts, not the snapshot's
    directory)."""
    from embedrpc.server.errors import ModelError
    from embedrpc.server.tasks import model_task

    name = None if Path(model).expanduser().is_dir() else model
    try:
        return model_task(source, name=name, task=task)
    except ModelError as exc:
        raise PrepareError(str(exc)) from exc


def _prepare_rerank_in(config: PrepareConfig, source: Path, arch: Any, weights: Weights,
                       staging: Path, work: Path, say: Callable[[str], None]
                       ) -> dict[str, Any]:
    """_prepare_in for a Qwen3-Reranker: the same graph body and precisions, ending in the
    model card's score; validated on query–document pairs by score and ranking."""
    import onnx

    from embedrpc.server.rerank import model_max_length

    device_kind = "cpu" if config.device == "cpu" else "cuda"
    precision = config.precision
    copied = _copy_side_files(source, staging)
    say(f"copied {len(copied)} tokenizer/config files")
    max_length = VALIDATION_MAX_LENGTH[device_kind]
    rows, groups, encoder = v.rerank_tokenize(staging, max_length=max_length)
    options: dict[str, Any] = {"task": "rerank", "rerank_tokens": (encoder.yes_id,
                                                                   encoder.no_id),
                               **config.graph_options}
    labels = v.pair_labels(groups)
    bound = config.max_score_diff or v.RERANK_MAX_ABS[precision]

    t = time.perf_counter()
    say(f"building the float32 graph (reference, with activation probes; score from the "
        f"LM head's rows for 'yes' ({encoder.yes_id}) and 'no' ({encoder.no_id}))")
    reference_model = build_graph(arch, weights, GraphOptions(probes=True, **options),
                                  progress=lambda m: say(f"  {m}"))
    save_model(reference_model, work / "reference")
    del reference_model
    say(f"  built in {time.perf_counter() - t:.1f}s")
    lengths = [len(r) for r in rows]
    say(f"validation: {len(rows)} query–document pairs in {len(groups)} groups, "
        f"{min(lengths)}..{max(lengths)} tokens ({sum(lengths):,} in all), batches of "
        f"{v.BATCH_ROWS}, right-padded, on {config.device}")
    placement = v.reference_placement(config.device)
    if device_kind != "cpu":
        say(f"  the float32 reference runs on {placement}")

    t = time.perf_counter()
    runner = v.Runner(work / "reference" / "model.onnx", config.device)
    probe_names = [o.name for o in runner.session.get_outputs() if o.name.startswith("probe.")]
    batched, *probe_values = runner.embed(rows, encoder.pad_id,
                                          outputs=["score", *probe_names])
    batched = batched.reshape(-1)
    maxima = {name: float(np.max(values)) for name, values in zip(probe_names, probe_values,
                                                                    strict=True)}
    alone = runner.embed(rows, encoder.pad_id, batch_rows=1, outputs=["score"])[0].reshape(-1)
    del runner
    say(f"float32 graph: done in {time.perf_counter() - t:.1f}s; scores "
        f"{batched.min():.4f}..{batched.max():.4f}")
    invariance = float(np.abs(batched - alone).max())
    say(f"  batch invariance (batched vs alone): max abs {invariance:.2e}")
    problems = []
    if not np.isfinite(batched).all():
        problems.append("the float32 graph gives non-finite scores")
    elif not batched.max() - batched.min() > v.RERANK_MIN_SPREAD:
        problems.append(f"every pair scores {batched[0]:.6f}: the LM head's rows for 'yes' "
                        f"({encoder.yes_id}) and 'no' ({encoder.no_id}) do not tell pairs "
                        "apart (the same row twice, or zeros?); this is not a working "
                        "reranker")
    if not invariance <= v.BATCH_INVARIANCE_MAX_ABS:
        problems.append(f"the float32 graph is not batch-invariant: batched vs alone differ "
                        f"by {invariance:.2e} (allowed {v.BATCH_INVARIANCE_MAX_ABS})")
    report: dict[str, Any] = {
        "device": config.device, "pairs": len(rows), "groups": len(groups),
        "tokens": sum(lengths), "max_tokens": max(lengths),
        "max_abs_allowed": bound, "reference_device": placement,
        "batch_invariance_max_abs": invariance,
        "score_range": [float(batched.min()), float(batched.max())],
        "activation_absmax": {"attention": max((x for k, x in maxima.items()
                                                if k.endswith(".attention")), default=0.0),
                              "mlp": max((x for k, x in maxima.items()
                                          if k.endswith(".mlp")), default=0.0)},
    }
    if config.reference:
        hf = v.rerank_transformers_reference(source, groups, max_length=max_length,
                                             log=lambda m: say(m))
        if hf is None:
            report["fp32_vs_transformers"] = "skipped: torch/transformers not installed"
            say("transformers reference: skipped (torch/transformers not installed)")
        else:
            scores, card_ids = hf
            if card_ids != [r.tolist() for r in rows]:
                first = next(i for i, (a, b) in enumerate(zip(card_ids, rows, strict=True))
                             if a != b.tolist())
                problems.append(f"the server's pair tokens differ from the model card's for "
                                f"{labels[first]}")
            # The graph must compute the model: held to fp32's bound whatever is prepared
            # (or to --max-score-diff when fp32 itself is).
            reference_bound = bound if precision == "fp32" else v.RERANK_REFERENCE_MAX_ABS
            stats = v.compare_scores(alone, scores, groups, reference_bound)
            report["fp32_vs_transformers"] = v.score_summary(stats)
            say(f"  float32 graph vs transformers: max |score difference| "
                f"{stats['max_abs']:.2e}, ranking "
                f"{'identical' if stats['ranking_identical'] else 'changed'}")
            problem = v.check_scores("float32 graph vs transformers", stats,
                                     reference_bound, labels)
            if problem:
                problems.append(problem + " (the graph does not compute this model)")
    else:
        report["fp32_vs_transformers"] = "skipped: --no-reference"
    if problems:
        raise PrepareError("validation failed, nothing written: " + "; ".join(problems))

    scales: dict[int, tuple[float, float]] = {}
    if precision == "fp32":
        final_dir = work / "reference"
        path = final_dir / "model.onnx"
        onnx.save(strip_probes(onnx.load(str(path), load_external_data=False)), str(path))
        report["vs_fp32"] = "is the float32 graph"
    else:
        final_dir, runs = _build_candidate(config, arch, weights, options, maxima, work,
                                           device_kind, say, scales)
        report["checks"] = {}
        for method, run_dir in runs:
            t = time.perf_counter()
            got = v.Runner(run_dir / "model.onnx", config.device).embed(
                rows, encoder.pad_id, outputs=["score"])[0].reshape(-1)
            stats = v.compare_scores(got, batched, groups, bound)
            report["checks"][method] = v.score_summary(stats)
            say(f"{precision} vs float32 ({method}): max |score difference| "
                f"{stats['max_abs']:.2e} (allowed {bound:g}), ranking "
                f"{'identical' if stats['ranking_identical'] else 'changed'} "
                f"({time.perf_counter() - t:.1f}s)")
            problem = v.check_scores(f"{precision} vs float32 ({method})", stats, bound,
                                     labels)
            if problem:
                hint = ("; try --precision fp16, or accept the difference with "
                        "--max-score-diff" if precision in ("bf16", "int8") else "")
                raise PrepareError(f"validation failed, nothing written: {problem}{hint}")
        report["method"] = " + ".join(report["checks"])
        report["vs_fp32"] = max(report["checks"].values(), key=lambda c: c["max_abs"])
    _move_graph(final_dir, staging)
    summary = graph_summary(onnx.load(str(staging / "model.onnx"), load_external_data=False))
    return {
        "format": 1,
        "task": "rerank",
        "source": config.model,
        "precision": precision,
        "rerank": {"format": "qwen3-reranker", "yes_token": "yes",
                   "yes_token_id": encoder.yes_id, "no_token": "no",
                   "no_token_id": encoder.no_id, "max_length": model_max_length(staging),
                   "prefix_tokens": len(encoder.prefix_ids),
                   "suffix_tokens": len(encoder.suffix_ids)},
        "graph": {"file": "model.onnx", "opset": OPSET, **summary},
        "architecture": arch.as_dict(),
        "fp16_scales": {str(k): list(s) for k, s in sorted(scales.items())},
        "validation": report,
    }


def _build_candidate(config: PrepareConfig, arch: Any, weights: Weights,
                     options: dict[str, Any], maxima: dict[str, float], work: Path,
                     device_kind: str, say: Callable[[str], None],
                     scales: dict[int, tuple[float, float]]
                     ) -> tuple[Path, list[tuple[str, Path]]]:
    """Build the requested precision; returns its directory and the graphs validation runs
    (how, where)."""
    precision = config.precision
    t = time.perf_counter()
    if precision == "int8":
        say("building the int8 graph (weights per output channel, activations per token)")
        model = build_graph(arch, weights, GraphOptions(precision="int8", **options))
        save_model(model, work / "candidate")
        del model
        say(f"  built in {time.perf_counter() - t:.1f}s")
        return work / "candidate", [("int8 graph on cpu", work / "candidate")]
    if precision == "fp16" and config.fp16_guard:
        scales.update(fp16_scales(maxima, arch.layers))
        if scales:
            say(f"  fp16 range: scaling {len(scales)} layers "
                f"(largest float32 activation {max(maxima.values()):.3g})")
    say(f"building the {precision} graph")
    model = build_graph(arch, weights, GraphOptions(precision=precision, scales=dict(scales),
                                                    **options))
    save_model(model, work / "candidate")
    del model
    say(f"  built in {time.perf_counter() - t:.1f}s")
    candidate = work / "candidate"
    if device_kind != "cpu":
        return candidate, [(f"{precision} graph on {config.device}", candidate)]
    # On the CPU provider the low-precision graph is not faithful: it has no bf16 kernels at
    # all, and its fp16 kernels compute in float32 (values past 65504 do not overflow there
    # as they do on a GPU). So the arithmetic is checked on a float32 graph that rounds to
    # the low precision wherever the real graph stores values, overflow included.
    runs = [] if precision == "bf16" else [(f"{precision} graph on cpu", candidate)]
    if precision == "bf16":
        say("  note: the bf16 graph is for a GPU; ONNX Runtime's CPU provider cannot run "
            "it (no bf16 MatMul). On the CPU, serve fp32 (exact) or int8 (fastest)")
    say(f"  building the {precision}-emulating float32 graph (the CPU provider does not "
        f"compute in {precision})")
    emulated = build_graph(arch, weights, GraphOptions(precision=precision, emulate=True,
                                                       scales=dict(scales), **options))
    save_model(emulated, work / "emulated")
    del emulated
    runs.append((f"{precision} emulated in float32 on cpu", work / "emulated"))
    return candidate, runs


def run_cli(config: PrepareConfig) -> int:
    """The command's body: prints progress, returns the exit status."""
    try:
        info = prepare(config)
    except PrepareError as exc:
        print(f"embedrpc prepare: {exc}", file=sys.stderr)
        return 1
    validation = info["validation"]
    vs = validation.get("vs_fp32")
    if isinstance(vs, dict) and info.get("task") == "rerank":
        _say(f"{info['precision']}: max |score difference| to float32 {vs['max_abs']:.2e} "
             f"on {validation['pairs']} pairs ({validation.get('method')})")
    elif isinstance(vs, dict):
        _say(f"{info['precision']}: min cosine to float32 {vs['min_cosine']:.6f} on "
             f"{validation['texts']} texts ({validation.get('method')})")
    return 0
