"""tether's one exception hierarchy: each message says what happened, the likely cause and the fix.

Imports nothing from tether; every other module (runtime, client, server) raises these.
"""

from __future__ import annotations

__all__ = [
    "TetherError",
    "SourceUnavailableError",
    "OutOfOrderError",
    "NotInTraceError",
    "UnsavedValueError",
    "ValueNotReachedError",
    "RemoteError",
]


class TetherError(Exception):
    """Base class of every error tether raises on purpose."""


class SourceUnavailableError(TetherError):
    """The body of a tracing context cannot be read, so it cannot be run or sent to a server."""


class OutOfOrderError(TetherError):
    """Intervention code asked for a module value the model had already produced (or never produced)."""


class NotInTraceError(TetherError):
    """`.output`, `.input`, `.next()` and friends were used outside a tracing context."""


class UnsavedValueError(TetherError, ValueError):
    """A value from inside a trace was used after the trace without having been `.save()`d."""


class ValueNotReachedError(TetherError, ValueError):
    """A saved value never received its data: the trace stopped early or the model never got there."""


class RemoteError(TetherError):
    """A job failed on the server; carries the remote exception type, message and traceback as text."""

    def __init__(self, message: str, *, remote_type: str = "", remote_traceback: str = "", code: str = ""):
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        self.code = code
