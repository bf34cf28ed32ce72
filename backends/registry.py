"""Backends by name, imported only when chosen."""

from __future__ import annotations

import importlib

from dsv3.backends.interface import Backend
from dsv3.backends.platforms import PLATFORMS

#: name -> (module, class, pip extra that provides its vendor packages): each platform's backend
BACKENDS: dict[str, tuple[str, str, str | None]] = {
    p.backend: (*p.backend_class.split(":"), p.pip_extra) for p in PLATFORMS}


def create_backend(name: str, **options) -> Backend:
    """Build the backend called `name` (options go to its constructor)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(sorted(BACKENDS))}")
    module, cls, _ = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(**options)
