"""Turn what the server reports into tether.RemoteError: gRPC status codes and job Failures, as text.

An exception is never unpickled from the wire: the remote type, message and traceback (already mapped
to the user's lines by the server) are carried as strings; remote_exceptions rebuilds an allow-listed type
by name and the user's frames. Imports grpc and tether.v1 only.
"""

from __future__ import annotations

import traceback
from typing import Any

import grpc

from tether.runtime.errors import RemoteError
from tether.v1 import failure_pb2

from .remote_exceptions import remote_error_type, with_user_frames

__all__ = ["from_rpc_error", "from_failure", "local_failure", "user_frames"]


def _hint(code: grpc.StatusCode, host: str, details: str, models: list[str] | None) -> str:
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return (
            f"The server at {host} refused the API key: {details}\nPass `api_key=...` to the call, set the "
            "TETHER_API_KEY environment variable, or save one with `tether.CONFIG.set_default_api_key('...')`."
        )
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return f"The server at {host} does not let this API key do that: {details}"
    if code is grpc.StatusCode.NOT_FOUND:
        hosted = f" It hosts: {', '.join(models)}." if models else ""
        return f"{details}{hosted}"
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return f"The server at {host} refused to run the program: {details}"
    if code is grpc.StatusCode.UNAVAILABLE:
        return (
            f"No tether server answered at {host} ({details}). Start one with `tether serve --model NAME=SPEC` "
            "(it listens on 127.0.0.1:8765, where clients look by default), or point the client at yours with "
            "`backend='host:port'` on the trace, `host=` on the model, `tether.CONFIG.API.HOST = 'host:port'` or "
            "TETHER_HOST. To run here instead, drop `remote=True`."
        )
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"The server at {host} is at a limit: {details}. Try again later, or ask for less."
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"The call to {host} took too long: {details}"
    if code is grpc.StatusCode.CANCELLED:
        return f"The call to {host} was cancelled: {details}"
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return f"{details}"
    return f"The server at {host} failed ({code.name}): {details}"


def from_rpc_error(error: grpc.RpcError, host: str, *, models: list[str] | None = None) -> RemoteError:
    """A RemoteError for a failed call, whose message says what to do about it."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else "") or str(error)
    return RemoteError(_hint(code, host, details, models), code=code.name)


def from_failure(failure: failure_pb2.Failure, *, job_id: str = "", debug: bool = False) -> RemoteError:
    """A RemoteError for a job that ended in JOB_STATE_ERROR (its program raised)."""
    remote_type = failure.type or "Exception"
    short = remote_type.rsplit(".", 1)[-1]
    text = _traceback_text(failure, debug)
    where = f" (job {job_id})" if job_id else ""
    message = f"{short}: {failure.message}"
    if text:
        message += f"\n\nRemote traceback{where}:\n{text.rstrip()}"
    cause = failure.cause if failure.HasField("cause") else None
    while cause is not None:
        message += f"\n\nCaused by {cause.type.rsplit('.', 1)[-1]}: {cause.message}"
        cause = cause.cause if cause.HasField("cause") else None
    error_type = remote_error_type(remote_type, RemoteError)
    error = error_type(message, remote_type=remote_type, remote_traceback=failure.traceback, code="JOB_ERROR")
    return with_user_frames(error, (f for f in failure.frames if f.user_code))


def _traceback_text(failure: failure_pb2.Failure, debug: bool) -> str:
    """The user's frames when the server marked them (all frames when debugging), else its text."""
    frames = list(failure.frames)
    if frames and not debug and any(f.user_code for f in frames):
        lines = ["Traceback (most recent call last):\n"]
        for f in frames:
            if f.user_code:
                lines.append(f'  File "{f.filename}", line {f.line}, in {f.function}\n')
                if f.source_line:
                    lines.append(f"    {f.source_line}\n")
        lines.append(f"{failure.type.rsplit('.', 1)[-1]}: {failure.message}\n")
        return "".join(lines)
    return failure.traceback


def local_failure(error: BaseException, *, user_frame: Any = None) -> failure_pb2.Failure:
    """The Failure of an exception a local() block raised on this machine, with its frames (the server's
    twin, server/failures.failure_of, also renames frames to the user's file names).

    `user_frame(frame)` says whether a frame is the user's own code; others are dropped from the text.
    """
    kept = user_frames(error, user_frame)
    tp = type(error)
    frames = [
        failure_pb2.Frame(filename=f.filename, line=f.lineno or 0, function=f.name, source_line=(f.line or "").strip(),
                          user_code=True)
        for f in kept
    ]
    text = "Traceback (most recent call last):\n" + "".join(traceback.format_list(kept))
    text += "".join(traceback.format_exception_only(tp, error))
    cause = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    msg = failure_pb2.Failure(type=f"{tp.__module__}.{tp.__qualname__}", message=str(error), traceback=text,
                              frames=frames)
    if cause is not None:
        msg.cause.CopyFrom(local_failure(cause, user_frame=user_frame))
    return msg


def user_frames(error: BaseException, user_frame: Any = None) -> traceback.StackSummary:
    """The frames of `error`'s traceback for which `user_frame(frame)` holds (all without a predicate)."""
    walked = traceback.walk_tb(error.__traceback__)
    return traceback.StackSummary.extract((f, line) for f, line in walked if user_frame is None or user_frame(f))
