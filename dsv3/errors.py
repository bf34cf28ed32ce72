"""The errors users see: one line naming the file, tensor, field, argument or request at fault.

Every error a user can cause is a Dsv3Error (or a subclass). Backends raise their own BackendError
(dsv3.backends never imports dsv3); the model layer turns those into BackendSetupError where it builds
a backend, and the `dsv3` command prints either as one line.
"""

from __future__ import annotations


class Dsv3Error(Exception):
    """A problem with the user's input or setup; the command prints it in one line and exits non-zero."""


class ConfigError(Dsv3Error):
    """A config field is missing, mistyped or out of range."""


class CheckpointError(Dsv3Error):
    """A checkpoint file or tensor is missing, truncated, misshaped, wrongly typed or not finite."""


class UsageError(Dsv3Error):
    """A command-line argument or Python API argument is wrong (type, range, or a combination)."""


class BackendSetupError(Dsv3Error):
    """The backend or device asked for cannot run here (the backend's BackendError, reworded)."""


class OutOfMemoryError(Dsv3Error):
    """The device ran out of memory while the model was built or loaded; the message says how much it needed."""


class RequestError(UsageError):
    """A generation request is invalid; `param` names the field at fault (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineRequestError(Dsv3Error):
    """The engine failed while running one request; the request ends with this message."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a checkpoint was being written: raised so cleanup runs as for Ctrl-C."""
