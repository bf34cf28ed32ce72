"""The tiny checkpoint on the reference backend in fp32, with engines of a chosen size."""

from __future__ import annotations

import pytest
from serving_helpers import tiny


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    """Every serving test on one CPU thread (tests/conftest.py's one_thread)."""


@pytest.fixture(scope="module")
def model():
    m = tiny()
    yield m
    m.shutdown()
