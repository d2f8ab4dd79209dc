"""Shared fixtures: model directories and real servers on loopback port 0 (the helpers
they are made with are in helpers.py).

Servers run in-process on their own event loop thread, so tests use the
blocking client exactly as users do.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from embedrpc.server import EmbedServer

from .helpers import running_server, write_model_dir


@pytest.fixture(scope="session")
def fake_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("fake-model"))


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
