"""Exceptions as data: a Failure message whose frames are only the user's own lines, in the user's file names.

Programs run under registered file names ("user.py [3f2a9c01d2]", one per distinct text, see sources.py);
`user_files` maps those back to the names the user knows. Imports tether.v1 and the standard library only.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping

from tether.v1 import failure_pb2

__all__ = ["failure_of", "failure_text"]

_MAX_CAUSES = 8  # a cause chain longer than this is cut (it is never useful, and could be cyclic)


def failure_of(error: BaseException, user_files: Mapping[str, str], *, depth: int = 0) -> failure_pb2.Failure:
    """The Failure for `error`: type, message, the frames in `user_files` (renamed), and its cause.

    user_files: the file names the job's code ran under -> the user's names for them. Frames in other
    files (tether, torch, transformers) are left out: the user can act only on their own lines.
    An error carrying a client Failure (`error.failure`, a local() block that raised) has it as cause.
    """
    tp = type(error)
    frames = [
        failure_pb2.Frame(
            filename=user_files[f.filename],
            line=f.lineno or 0,
            function=f.name,
            source_line=(f.line or "").strip(),
            user_code=True,
        )
        for f in traceback.extract_tb(error.__traceback__)
        if f.filename in user_files
    ]
    failure = failure_pb2.Failure(
        type=f"{tp.__module__}.{tp.__qualname__}", message=str(error), frames=frames
    )
    failure.traceback = failure_text(failure)
    client_failure = getattr(error, "failure", None)
    if isinstance(client_failure, failure_pb2.Failure):
        failure.cause.CopyFrom(client_failure)
    elif depth < _MAX_CAUSES:
        cause = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if cause is not None:
            failure.cause.CopyFrom(failure_of(cause, user_files, depth=depth + 1))
    return failure


def failure_text(failure: failure_pb2.Failure) -> str:
    """The traceback as Python prints it, from a Failure's frames (the user's lines only)."""
    lines = []
    if failure.frames:
        lines.append("Traceback (most recent call last):\n")
        for frame in failure.frames:
            lines.append(f'  File "{frame.filename}", line {frame.line}, in {frame.function}\n')
            if frame.source_line:
                lines.append(f"    {frame.source_line}\n")
    name = failure.type.removeprefix("builtins.")
    lines.append(f"{name}: {failure.message}\n" if failure.message else f"{name}\n")
    return "".join(lines)
