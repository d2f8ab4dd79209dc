"""What a model directory holds: the ONNX file, tokenizer, pooling, prompts, sizes.

A directory is laid out like the published ONNX exports of Qwen3-Embedding
(and sentence-transformers models in general):

    model.onnx (+ model.onnx_data)   at the top or under onnx/
    tokenizer.json, tokenizer_config.json, config.json
    config_sentence_transformers.json   prompts            (optional)
    modules.json, 1_Pooling/config.json  pooling, Normalize (optional)
    sentence_bert_config.json            max_seq_length     (optional)

The ONNX graph itself (input and output names, hidden size, precision) is
inspected by the worker that loads it (see worker.py), so the main process
never loads the weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent / "models" / "demo"
# The bundled tiny Qwen3-Reranker (a prepared fp32 graph; scripts/make_demo_reranker.py).
DEMO_RERANKER_DIR = Path(__file__).resolve().parent / "models" / "demo-reranker"
# --model names of the bundled models.
BUNDLED = {"demo": DEMO_DIR, "demo-reranker": DEMO_RERANKER_DIR}
# The longest input we serve by default, whatever the model claims (the
# real Qwen3-Embedding accepts 32k, but attention cost grows with length²).
MAX_LENGTH_CAP = 8192
# The sentence-transformers pooling modes we implement, by their config key.
_POOLING_KEYS = {
    "lasttoken": "pooling_mode_lasttoken",
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
}
# Qwen3-Embedding's Matryoshka range starts at 32 dimensions.
DEFAULT_MIN_DIMENSIONS = 32
# Qwen3-Embedding's prompts, for exports that leave out config_sentence_transformers.json.
QWEN3_PROMPTS = {
    "query": "Instruct: Given a web search query, retrieve relevant passages that answer "
             "the query\nQuery:",
    "document": "",
}
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Everything the main process needs to know about a model directory."""

    name: str
    path: Path
    onnx_path: Path
    tokenizer_path: Path
    hidden_size: int
    pooling: str
    normalize: bool
    max_length: int
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    eos_token: str | None = None  # tokenizer_config.json's (not always the pooled token)
    pad_token: str | None = None
    config_eos_token_id: int | None = None  # config.json's eos_token_id (first, if a list)
    min_dimensions: int = DEFAULT_MIN_DIMENSIONS
    # What was assumed because the directory does not say (for the start-up log).
    assumed: tuple[str, ...] = ()


def resolve_model_path(model: str, onnx_file: str | None = None) -> tuple[str, Path]:
    """Turn `--model` (demo, demo-reranker, a directory, or a Hugging Face id) into
    (name, directory)."""
    if model in BUNDLED:
        return model, BUNDLED[model]
    path = Path(model).expanduser()
    if path.is_dir():
        return path.name, path
    if path.exists():
        raise ModelError(f"--model {model!r} is a file; give the model's directory")
    if not _HF_ID.match(model):
        raise ModelError(
            f"--model {model!r}: no such directory (give 'demo', 'demo-reranker', a model "
            "directory, or a Hugging Face id such as 'Qwen/Qwen3-Embedding-0.6B')"
        )
    return model, _download(model, onnx_file)


# What to download from the hub: an ONNX export's graph and side files, or a
# checkpoint's weights and side files (then prepared into an ONNX graph).
_SIDE_FILES = ["*.json", "1_Pooling/*", "2_Normalize/*"]
_ONNX_FILES = ["model.onnx", "model.onnx_data", "onnx/model.onnx", "onnx/model.onnx_data*"]
_CHECKPOINT_FILES = ["*.safetensors"]


def _download(repo_id: str, onnx_file: str | None = None) -> Path:
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError:
        raise ModelError(
            f"--model {repo_id!r} looks like a Hugging Face id, but huggingface_hub is not "
            "installed: pip install huggingface-hub, or give a local directory"
        ) from None
    onnx = list(_ONNX_FILES)
    if onnx_file:
        onnx += [onnx_file, f"{onnx_file}_data*", f"onnx/{onnx_file}", f"onnx/{onnx_file}_data*"]
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in (
        "1", "true", "yes", "on")
    files = None
    if not offline:  # offline: what is cached, no waiting on the network
        try:
            files = HfApi().list_repo_files(repo_id)
        except Exception:  # unreachable, unknown repo: snapshot_download says which
            files = None
    if files is None:
        kind, patterns = "the hub's file list is unreachable", _SIDE_FILES + onnx + \
            _CHECKPOINT_FILES
    elif any(f.endswith(".onnx") for f in files):
        kind, patterns = "an ONNX export", _SIDE_FILES + onnx
    else:
        kind, patterns = "a checkpoint", _SIDE_FILES + _CHECKPOINT_FILES
    log.info("downloading %s from the Hugging Face hub (%s)", repo_id, kind)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated: say which, keep the cause
        raise ModelError(f"could not download {repo_id!r} from the Hugging Face hub: "
                         f"{exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def _optional_json(path: Path) -> dict[str, Any]:
    return _read_json(path) if path.is_file() else {}


def find_onnx(path: Path, onnx_file: str | None = None) -> Path:
    candidates = (
        [path / onnx_file, path / "onnx" / onnx_file]
        if onnx_file
        else [path / "model.onnx", path / "onnx" / "model.onnx"]
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    wanted = onnx_file or "model.onnx"
    others = sorted(p.relative_to(path).as_posix() for p in path.glob("**/*.onnx"))
    hint = f" (found: {', '.join(others)}; pick one with --onnx-file)" if others else ""
    raise ModelError(f"{path}: no {wanted} at the top or under onnx/{hint}")


def _pooling_mode(path: Path) -> tuple[str, bool, dict[str, Any]]:
    """Pooling mode, whether a Normalize module follows, and the pooling config."""
    modules = []
    modules_file = path / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules) or not modules
    pooling_dir = next(
        (m.get("path") for m in modules if str(m.get("type", "")).endswith("Pooling")), "1_Pooling"
    )
    cfg = _optional_json(path / pooling_dir / "config.json")
    if not cfg:
        # No sentence-transformers files: Qwen3-Embedding's own pooling.
        return "lasttoken", normalize, cfg
    enabled = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True)
    active = [mode for mode, key in _POOLING_KEYS.items() if key in enabled]
    if len(enabled) != 1 or not active:
        raise ModelError(
            f"{path / pooling_dir / 'config.json'}: exactly one of "
            f"{', '.join(_POOLING_KEYS.values())} must be true (found {enabled or 'none'})"
        )
    if active[0] == "mean" and cfg.get("include_prompt", True) is False:
        raise ModelError(
            f"{path / pooling_dir / 'config.json'}: include_prompt=false is not supported"
        )
    return active[0], normalize, cfg


def pooling_of(path: Path) -> tuple[str, bool]:
    """(pooling mode, whether a Normalize module follows) of a model directory."""
    mode, normalize, _ = _pooling_mode(path)
    return mode, normalize


def _max_length(path: Path, config: dict[str, Any], tok_cfg: dict[str, Any]) -> int:
    """The model's own limit as sentence-transformers sees it, capped."""
    st = _optional_json(path / "sentence_bert_config.json")
    for source in (st.get("max_seq_length"), tok_cfg.get("model_max_length"),
                   config.get("max_position_embeddings")):
        # Tokenizers without a limit store a huge sentinel (1e30).
        if isinstance(source, int | float) and 0 < source < 10**9:
            return min(int(source), MAX_LENGTH_CAP)
    return MAX_LENGTH_CAP


def _first_int(value: Any) -> int | None:
    """config.json's eos_token_id: an int, or a list of them (the first counts)."""
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, int)), None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<|endoftext|>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_model_spec(model: str, *, onnx_file: str | None = None,
                    max_length: int | None = None, name: str | None = None) -> ModelSpec:
    """Read a model directory (or `demo`, or a hub id) and say clearly what is missing;
    `name` overrides the name Info reports (a prepared checkpoint keeps its own)."""
    resolved_name, path = resolve_model_path(model, onnx_file)
    name = name or resolved_name
    missing = [f for f in ("tokenizer.json", "config.json") if not (path / f).is_file()]
    if missing:
        raise ModelError(f"{path}: missing {', '.join(missing)} (a model directory needs "
                         "model.onnx, tokenizer.json and config.json)")
    onnx_path = find_onnx(path, onnx_file)
    config = _read_json(path / "config.json")
    tok_cfg = _optional_json(path / "tokenizer_config.json")
    st_cfg = _optional_json(path / "config_sentence_transformers.json")
    pooling, normalize, pool_cfg = _pooling_mode(path)
    assumed = []
    if not pool_cfg:
        assumed.append("no 1_Pooling/config.json: last-token pooling (Qwen3-Embedding's)")
        if not (path / "modules.json").is_file():
            assumed.append("no modules.json: L2-normalised vectors (Qwen3-Embedding's Normalize)")
    hidden = pool_cfg.get("word_embedding_dimension") or config.get("hidden_size")
    if not isinstance(hidden, int) or hidden <= 0:
        raise ModelError(f"{path / 'config.json'}: no hidden_size")
    model_max = _max_length(path, config, tok_cfg)
    if max_length is not None:
        if max_length < 2:
            raise ModelError(f"--max-length {max_length}: must be at least 2")
        if max_length > model_max:
            log.warning("--max-length %d is above the model's own limit %d", max_length,
                        model_max)
        model_max = max_length
    if max_length is None and not (path / "sentence_bert_config.json").is_file():
        assumed.append(f"no sentence_bert_config.json: max_length {model_max} from "
                       "tokenizer_config.json / config.json (capped at "
                       f"{MAX_LENGTH_CAP})")
    prompts = st_cfg.get("prompts") or {}
    if not st_cfg and config.get("model_type") == "qwen3":
        prompts = QWEN3_PROMPTS
        assumed.append("no config_sentence_transformers.json: Qwen3-Embedding's prompts "
                       "(query: the web-search instruction; document: none)")
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ModelError(f"{path / 'config_sentence_transformers.json'}: prompts must map "
                         "names to strings")
    default_prompt = st_cfg.get("default_prompt_name") or None
    if default_prompt is not None and default_prompt not in prompts:
        raise ModelError(f"default_prompt_name {default_prompt!r} is not among the prompts")
    return ModelSpec(
        name=name,
        path=path,
        onnx_path=onnx_path,
        tokenizer_path=path / "tokenizer.json",
        hidden_size=hidden,
        pooling=pooling,
        normalize=normalize,
        max_length=model_max,
        prompts=dict(prompts),
        default_prompt_name=default_prompt,
        eos_token=_token_content(tok_cfg.get("eos_token")),
        pad_token=_token_content(tok_cfg.get("pad_token")),
        config_eos_token_id=_first_int(config.get("eos_token_id")),
        min_dimensions=min(DEFAULT_MIN_DIMENSIONS, hidden),
        assumed=tuple(assumed),
    )
