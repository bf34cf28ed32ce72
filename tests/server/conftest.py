"""The real `dsv3 serve` process the end-to-end tests share."""

from __future__ import annotations

import pytest
from serve_helpers import API_KEY, MAX_REQUEST_BYTES, ServerProcess


@pytest.fixture(scope="session")
def server():
    """The shared server: API key set, V3 tool-call parser on, a small request-size limit for the 413 test."""
    process = ServerProcess("--api-key", API_KEY, "--tool-call-parser", "deepseek-v3",
                            "--max-request-bytes", str(MAX_REQUEST_BYTES))
    yield process
    process.stop()
