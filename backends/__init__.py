"""Backends: one interface for the heavy ops and its implementations.

Vendor modules are imported only inside the backend that needs them, when it is built.
"""

from dsv3.backends.interface import Backend, Capabilities  # noqa: F401
from dsv3.backends.registry import BACKENDS, create_backend  # noqa: F401
