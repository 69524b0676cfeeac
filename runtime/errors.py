"""tether's one exception hierarchy, rooted at `TetherError`: each message says what happened, the likely
cause and the fix. Imports nothing from tether.

Every exception class tether defines subclasses `TetherError`, in one module per layer: the engine's here,
the server's in server/errors.py (`ServerError` and its subclasses, each with its gRPC status code, and
`PolicyViolation`), the shared layer's one in tether/safe_pickle.py (`UnsafePickleError`). The client
defines none: what a server reports arrives as `RemoteError` (client/errors.py builds it).

The only exceptions outside the hierarchy are these, listed in `CONTROL_FLOW` (a test holds every other
class to the root). None reaches a user: each is raised and caught by tether itself.

- `tether.runtime.cpython.SkipBody`: skips a `with` block's body in the caller (tether runs it itself).
- `tether.runtime.interleaver.EarlyStop`: unwinds the model's forward pass after `.stop()`.
- `tether.runtime.interleaver._Abort`: unwinds the forward pass after a body failed (its error follows).
- `tether.runtime.job_batch._Refused`: carries a batched job's refused edit to its body, raised at its line.
- `tether.runtime.session._ExitSession`: `session.exit()` ends the session body.
- `tether.runtime.contexts.ExitLoop`: `iterator.exit()` leaves a `session.iter(...)` loop.
- `tether.server.interrupts.Interrupted`: raised into a worker thread stuck outside any module boundary.
- `tether.server.local_calls.StillOpen`: a batched job's local() call outlasted its hold (it leaves its batch).
- `tether.client.remote_exceptions._Marker`: raised once per user frame to build a remote traceback.
- `tether.client.blocking_stream.Cancelled`: a call the client cancelled, as the `grpc.RpcError` grpc would raise.

Warnings are not errors: tether's subclass `UserWarning` (`tether.runtime.batch_index.BatchIndexWarning`).
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
    "RunStopped",
    "SharedValueError",
    "CONTROL_FLOW",
]

CONTROL_FLOW = (  # module.qualname of each exception outside the hierarchy (the docstring says why)
    "tether.runtime.cpython.SkipBody",
    "tether.runtime.interleaver.EarlyStop",
    "tether.runtime.job_batch._Refused",
    "tether.runtime.interleaver._Abort",
    "tether.runtime.session._ExitSession",
    "tether.runtime.contexts.ExitLoop",
    "tether.server.interrupts.Interrupted",
    "tether.server.local_calls.StillOpen",
    "tether.client.remote_exceptions._Marker",
    "tether.client.blocking_stream.Cancelled",
)


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


class RunStopped(TetherError):
    """A run was stopped from outside at a module boundary (its cancel check said so: a server's cancel
    request or time limit)."""


class RemoteError(TetherError):
    """A job failed on the server; carries the remote exception type, message and traceback as text."""

    def __init__(self, message: str, *, remote_type: str = "", remote_traceback: str = "", code: str = ""):
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        self.code = code


class SharedValueError(TetherError):
    """A batched job tried to replace or use a value the whole batch shares (not one of its own rows)."""
