"""The server's errors: each carries the gRPC status code it is reported with, and an actionable message.

Part of tether's one hierarchy (subclasses of tether.runtime.errors.TetherError, whose docstring lists the
control-flow exceptions outside it); imports grpc and that only.
"""

from __future__ import annotations

import grpc

from tether.runtime.errors import TetherError

__all__ = [
    "ServerError",
    "NotFound",
    "InvalidProgram",
    "QueueFull",
    "ResultTooLarge",
    "JobTimeout",
    "JobCancelledError",
    "LocalCallFailed",
    "LocalBlockFailed",
    "Unauthenticated",
    "PermissionDenied",
    "ModelLoading",
    "ModelExists",
    "OutOfService",
    "WeightsChanged",
    "PolicyViolation",
    "RefusedAttribute",
    "WorkerCrashed",
    "JobMemoryExceeded",
    "LaneUnavailable",
    "LaneBroken",
    "CallFailed",
]


class ServerError(TetherError):
    """An error the server reports with a gRPC status code (`code`) and this message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class NotFound(ServerError):
    """An unknown model or job (or a job whose result expired)."""

    code = grpc.StatusCode.NOT_FOUND


class InvalidProgram(ServerError):
    """A program the server will not run: rejected by policy, malformed, or refused values."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class QueueFull(ServerError):
    """A model's queue has no room for another job."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class OutOfService(ServerError):
    """A hosted model that no longer runs jobs (its weights were changed and could not be restored)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ModelLoading(ServerError):
    """A model deployed while the server runs is still loading (FAILED_PRECONDITION: UNAVAILABLE would
    read as a lost connection to clients)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ModelExists(ServerError):
    """A deploy under a name that is already deployed."""

    code = grpc.StatusCode.ALREADY_EXISTS


class ResultTooLarge(ServerError):
    """A job's serialized result is larger than the allowed size."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class JobTimeout(ServerError):
    """A job ran (or waited for a local() answer) past its time limit."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class JobCancelledError(ServerError):
    """A job was cancelled by its client."""

    code = grpc.StatusCode.CANCELLED


class LocalCallFailed(ServerError):
    """A local() block could not be run on the client: no stream, the client left, or no answer in time."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class LocalBlockFailed(ServerError):
    """A local() block raised on the client; `failure` is the client's Failure message (the cause)."""

    code = grpc.StatusCode.ABORTED

    def __init__(self, message: str, failure):
        super().__init__(message)
        self.failure = failure  # tether.v1.Failure


class Unauthenticated(ServerError):
    """A call without a valid API key (or, on a server without keys, from another machine)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServerError):
    """An admin call (AdminService) with a key that is not marked admin."""

    code = grpc.StatusCode.PERMISSION_DENIED


class WeightsChanged(ServerError):
    """A job wrote into the hosted model's parameters."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PolicyViolation(TetherError, ValueError):
    """A program uses something the server's policy refuses; the server answers INVALID_ARGUMENT (as an
    InvalidProgram naming the user's line)."""

    def __init__(self, message: str, line: int, *, filename: str = ""):
        where = f"{filename}, line {line}" if filename else f"line {line}"
        super().__init__(f"{where}: {message}")
        self.message, self.line, self.filename = message, line, filename


class RefusedAttribute(PolicyViolation, AttributeError):
    """A module's attribute the policy refuses, read at run time through a guard (policy.GuardedModule); an
    AttributeError too, so that `getattr(m, name, default)` and `hasattr` (the runtime's probes) read it as absent."""


class WorkerCrashed(ServerError):
    """The worker process running a job died (a crash, or killed because the job would not stop)."""

    code = grpc.StatusCode.ABORTED


class JobMemoryExceeded(ServerError):
    """A job allocated more memory than the server's per-job limit; its worker was restarted."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class LaneUnavailable(ServerError):
    """Nothing of a call reached the other end of a lane (none could be opened, or its arguments do not pickle):
    it may be made another way (lanes.py; a front door then calls the core through Ray)."""

    code = grpc.StatusCode.UNAVAILABLE


class LaneBroken(ServerError):
    """A lane failed once a call was sent over it: whether the call ran is unknown."""

    code = grpc.StatusCode.UNAVAILABLE


class CallFailed(ServerError):
    """A method called across a lane raised on the other end (its repr is the message)."""
