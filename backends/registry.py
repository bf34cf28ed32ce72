"""Backends by name, imported only when chosen."""

from __future__ import annotations

import importlib

from dsv3.backends.interface import Backend

#: name -> (module, class, pip extra that provides its vendor packages)
BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "reference": ("dsv3.backends.reference", "ReferenceBackend", None),
    "cuda": ("dsv3.backends.cuda", "CudaBackend", "cuda"),
    "rocm": ("dsv3.backends.rocm", "RocmBackend", "rocm"),
    "ascend": ("dsv3.backends.ascend", "AscendBackend", "ascend"),
}


def create_backend(name: str, **options) -> Backend:
    """Build the backend called `name` (options go to its constructor)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(sorted(BACKENDS))}")
    module, cls, _ = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(**options)
