"""The tiny checkpoint on the reference backend in fp32, with engines of a chosen size."""

from __future__ import annotations

import pytest
import torch
from serving_helpers import tiny


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: on a loaded 2-core machine two threads spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    m = tiny()
    yield m
    m.shutdown()
