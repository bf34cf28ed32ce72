"""The error users see: one line naming the file, tensor or field at fault."""


class Dsv3Error(Exception):
    """A problem with the user's input or setup; the command prints it in one line and exits non-zero."""


class ConfigError(Dsv3Error):
    """A config field is missing, mistyped or out of range."""


class CheckpointError(Dsv3Error):
    """A checkpoint file or tensor is missing, truncated, misshaped or wrongly typed."""
