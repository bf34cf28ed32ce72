"""The tiny checkpoint with an engine of a chosen size (tests/serving, tests/server)."""

from __future__ import annotations

import dsv3


def tiny(**options) -> dsv3.Model:
    """The built-in tiny checkpoint on the reference backend in fp32 (exact comparisons), a small context and
    cache; `options` override any load_model setting."""
    settings = dict(backend="reference", precision="fp32", max_model_len=256, cache_tokens=4096, block_size=16,
                    quiet=True)
    return dsv3.load_model(**{**settings, **options})
