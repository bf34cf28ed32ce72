"""Choosing a backend for this machine."""

from __future__ import annotations

import os

from backends.interface import Backend
from backends.registry import create_backend


def select_backend(requested: str | None = "auto", device: str | None = None) -> tuple[Backend, str]:
    """The backend to run on and why.

    Args:
        requested: "auto", or a backend name; DSV3_BACKEND overrides "auto".
        device: torch device for the backend (its default when None).
    Returns:
        (backend, a one-line reason).
    """
    name = requested if requested not in (None, "auto") else os.environ.get("DSV3_BACKEND", "auto")
    options = {} if device is None else {"device": device}
    if name == "auto":
        return create_backend("reference", **options), "no accelerator backend available: reference on the CPU"
    return create_backend(name, **options), f"{name} requested"
