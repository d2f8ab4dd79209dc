"""Reading a Qwen3 checkpoint: config.json and safetensors weights, without torch.

The safetensors format is small enough to read directly: an 8-byte little-endian
header length, a JSON header naming each tensor's dtype, shape and byte range, then
the raw little-endian data. F32, F16 and BF16 are decoded to float32 exactly
(bf16 is the upper half of a float32). Sharded checkpoints name their files in
`model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PrepareError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) → float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


class SafetensorsFile:
    """One .safetensors file, memory-mapped; tensors come back as float32 arrays."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size < 100 << 20:
                    raise ValueError(f"implausible header size {size}")
                header = json.loads(f.read(size))
        except (OSError, ValueError) as exc:
            raise PrepareError(f"{path}: not a readable safetensors file ({exc})") from exc
        header.pop("__metadata__", None)
        self.header: dict[str, dict[str, Any]] = header
        self.data_start = 8 + size
        try:
            described = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise PrepareError(f"{path}: not a readable safetensors file (a tensor entry "
                               f"without data_offsets: {exc})") from exc
        held = path.stat().st_size - self.data_start
        if held < described:
            raise PrepareError(f"{path}: truncated: its header describes {described:,} "
                               f"bytes of tensors and the file holds {held:,}; download it "
                               "again")
        self._map = np.memmap(path, dtype=np.uint8, mode="r")

    def names(self) -> list[str]:
        return list(self.header)

    def dtype_name(self, name: str) -> str:
        return str(self.header[name]["dtype"])

    def get(self, name: str) -> np.ndarray:
        return self._decode(self._stored(name))

    def get_rows(self, name: str, rows: list[int]) -> np.ndarray:
        """Rows of a 2-D tensor, decoding only those (an LM head's few rows of 151,669)."""
        return self._decode(self._stored(name)[rows])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def _stored(self, name: str) -> np.ndarray:
        """The tensor as stored (a view of the file)."""
        entry = self.header[name]
        kind = entry["dtype"]
        if kind not in _DTYPES:
            raise PrepareError(f"{self.path}: tensor {name} has dtype {kind}; "
                               f"supported: {', '.join(_DTYPES)}")
        begin, end = entry["data_offsets"]
        raw = self._map[self.data_start + begin:self.data_start + end]
        shape = entry["shape"]
        itemsize = np.dtype(_DTYPES[kind]).itemsize
        if len(raw) != itemsize * int(np.prod(shape, dtype=np.int64)):
            raise PrepareError(f"{self.path}: tensor {name} has {len(raw):,} bytes for shape "
                               f"{shape} of {kind}; the file is corrupt, download it again")
        return raw.view(_DTYPES[kind]).reshape(shape)

    @staticmethod
    def _decode(array: np.ndarray) -> np.ndarray:
        if array.dtype == np.uint16:  # BF16
            return bf16_to_float32(array)
        return np.asarray(array, dtype=np.float32)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    """Write float tensors as one safetensors file, stored as F32, F16 or BF16."""
    header: dict[str, Any] = {}
    blobs = []
    offset = 0
    for name, array in tensors.items():
        values = np.ascontiguousarray(array, dtype=np.float32)
        if dtype == "BF16":
            raw = float32_to_bf16(values).tobytes()
        elif dtype == "F16":
            raw = values.astype(np.float16).tobytes()
        elif dtype == "F32":
            raw = values.tobytes()
        else:
            raise ValueError(f"dtype {dtype!r}: use F32, F16 or BF16")
        header[name] = {"dtype": dtype, "shape": list(values.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
    with path.open("wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for raw in blobs:
            f.write(raw)


class Weights:
    """All tensors of a checkpoint directory by name, with a `model.` prefix removed."""

    def __init__(self, directory: Path) -> None:
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise PrepareError(
                f"{directory}: no *.safetensors weights (prepare reads a Hugging Face "
                "checkpoint: config.json plus safetensors; .bin and ONNX-only directories "
                "are not supported)")
        self.files = [SafetensorsFile(directory / name) for name in files]
        self._where: dict[str, tuple[SafetensorsFile, str]] = {}
        for f in self.files:
            for name in f.names():
                short = name.removeprefix("model.")
                self._where[short] = (f, name)
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self._where:
            raise PrepareError(f"checkpoint has no tensor {name!r} (a Qwen3 checkpoint has "
                               "embed_tokens, layers.N.*, norm)")
        f, full = self._where[name]
        array = f.get(full)
        if tuple(array.shape) != shape:
            raise PrepareError(f"tensor {name}: shape {tuple(array.shape)}, config.json "
                               f"implies {shape}")
        self.used.add(name)
        return array

    def get_rows(self, name: str, rows: list[int], shape: tuple[int, ...]) -> np.ndarray:
        """Rows `rows` of the 2-D tensor `name`, [len(rows), shape[1]] float32, read
        without decoding the rest."""
        if name not in self._where:
            raise PrepareError(f"checkpoint has no tensor {name!r}")
        f, full = self._where[name]
        if f.shape(full) != shape:
            raise PrepareError(f"tensor {name}: shape {f.shape(full)}, config.json "
                               f"implies {shape}")
        if any(not 0 <= r < shape[0] for r in rows):
            raise PrepareError(f"tensor {name}: rows {rows} are not all below {shape[0]}")
        self.used.add(name)
        return f.get_rows(full, rows)

    def stored_dtypes(self) -> set[str]:
        return {f.dtype_name(n) for f in self.files for n in f.names()}

    def unused(self) -> list[str]:
        return sorted(set(self._where) - self.used)

    def items(self) -> Iterator[str]:
        return iter(self._where)


@dataclass(frozen=True, kw_only=True)
class Qwen3Config:
    """The parts of a Qwen3 config.json the graph depends on."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    # The LM head is the token embeddings (only a reranker's graph reads the LM head).
    tie_word_embeddings: bool = False

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def read_config(directory: Path) -> Qwen3Config:
    """config.json → Qwen3Config; refuses what the graph builder would get wrong."""
    path = directory / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PrepareError(f"cannot read {path}: {exc}") from exc
    model_type = cfg.get("model_type")
    if model_type != "qwen3":
        archs = ", ".join(cfg.get("architectures") or []) or "none"
        raise PrepareError(f"{path}: model_type {model_type!r} (architectures: {archs}); "
                           "prepare builds Qwen3 models only (model_type 'qwen3', "
                           "Qwen3Model or Qwen3ForCausalLM)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    problems = []
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (only the default RoPE is supported)")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg.get('hidden_act')!r} (only silu)")
    if cfg.get("attention_bias"):
        problems.append("attention_bias true (Qwen3 has no attention bias)")
    if cfg.get("use_sliding_window"):
        problems.append("use_sliding_window true (only full attention)")
    if any(t != "full_attention" for t in cfg.get("layer_types") or []):
        problems.append("layer types other than full_attention")
    if problems:
        raise PrepareError(f"{path}: unsupported: {'; '.join(problems)}")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        config = Qwen3Config(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PrepareError(f"{path}: missing or bad field: {exc}") from exc
    if config.heads % config.kv_heads:
        raise PrepareError(f"{path}: {config.heads} heads are not a multiple of "
                           f"{config.kv_heads} key/value heads")
    if config.head_dim % 16:
        # ONNX Runtime's GroupQueryAttention kernels need it (Qwen3 uses 128).
        raise PrepareError(f"{path}: head_dim {config.head_dim} is not a multiple of 16, "
                           "which ONNX Runtime's GroupQueryAttention requires")
    return config


def resolve_source(model: str) -> Path:
    """A local checkpoint directory, or a Hugging Face id downloaded with huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise PrepareError(f"--model {model!r} is a file; give the checkpoint's directory")
    if not _HF_ID.match(model):
        raise PrepareError(f"--model {model!r}: no such directory (give a checkpoint directory "
                           "or a Hugging Face id such as 'Qwen/Qwen3-Embedding-0.6B')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PrepareError(
            f"--model {model!r} looks like a Hugging Face id, but huggingface_hub is not "
            "installed: pip install huggingface-hub (an embedrpc dependency), or give a "
            "local directory") from None
    patterns = ["*.json", "*.safetensors", "1_Pooling/*", "2_Normalize/*", "*.txt"]
    try:
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated
        raise PrepareError(f"could not download {model!r} from the Hugging Face hub: "
                           f"{exc}") from exc
