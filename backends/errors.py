"""Errors raised inside backends/, printed by the `dsv3` command as one line (backends/ never imports dsv3)."""

from __future__ import annotations


class BackendError(ValueError):
    """A backend setting or input is wrong; the message names it, what was expected and what was found."""


class BackendUnavailable(BackendError):
    """A backend was asked for that cannot run here: unknown name, missing vendor packages or
    missing backend module. The message says what to install or choose instead."""
