"""Shared fixtures; hardware tests skip cleanly where their device is absent."""

from __future__ import annotations

import pytest
import torch


def has_cuda_gpu() -> bool:
    return torch.cuda.is_available() and torch.version.hip is None


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need an NVIDIA GPU and are skipped, with the reason, where there is none."""
    if has_cuda_gpu():
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def tiny_config():
    from dsv3.config import load_config

    return load_config("tiny")


@pytest.fixture
def one_thread():
    """One CPU thread: on a loaded 2-core machine two threads spin against each other (up to 10x slower).
    Modules that want it for every test say `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
