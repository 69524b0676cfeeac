"""A job's exception on the client: `tether.RemoteError` that is also its remote type, with the user's frames.

The type is never unpickled: a subclass of RemoteError and the named class is made from the type's name,
only for exception classes of builtins, torch or tether's own errors already imported here. The user's lines
become real traceback frames (file, line, function; the source comes from the user's file as in any
traceback) by raising once from code compiled under that file name. Imports the standard library only.
"""

from __future__ import annotations

import functools
import linecache
import sys
import types
from collections.abc import Iterable
from typing import Any

__all__ = ["remote_error_type", "with_user_frames"]

_MODULES = ("builtins", "torch", "tether.runtime.errors")  # exception types of these (and torch.*) are rebuilt


def _allowed_module(module: str) -> bool:
    return module in _MODULES or module.startswith("torch.")


@functools.lru_cache(maxsize=256)
def remote_error_type(remote_type: str, base: type) -> type:
    """`base` (RemoteError), or a subclass of it and the exception class `remote_type` names ("builtins.KeyError",
    "torch.OutOfMemoryError"), looked up among modules already imported, allow-listed ones only."""
    module, _, qualname = remote_type.rpartition(".")
    if not _allowed_module(module) or not qualname or qualname.startswith("_") and module == "builtins":
        return base
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, type) or not issubclass(obj, Exception) or issubclass(obj, base):
        return base
    try:
        made = types.new_class(qualname.rpartition(".")[2], (base, obj), {})
        made("probe", remote_type=remote_type)  # one that needs more than a message to construct is not used
    except TypeError:
        return base
    made.__module__ = base.__module__
    made.__qualname__ = f"{base.__name__}[{obj.__qualname__}]"
    return made


def with_user_frames(error: BaseException, frames: Iterable[Any]) -> BaseException:
    """`error` with a traceback of real frames at the user's lines (Failure frames: filename, line, function),
    outermost first, so tools that walk tracebacks (pdb, IDEs, traceback.extract_tb) land on them."""
    tb = None
    for frame in reversed([f for f in frames if f.line > 0 and f.filename]):
        here = _frame_at(frame.filename, frame.line, frame.function or "<module>")
        if here is not None:
            tb = types.TracebackType(tb, here.tb_frame, here.tb_lasti, here.tb_lineno)
    return error.with_traceback(tb) if tb is not None else error


class _Marker(Exception):
    pass


def _frame_at(filename: str, line: int, function: str) -> types.TracebackType | None:
    """A traceback entry whose frame runs at `line` of `filename`, in a code object named `function`.

    The raise spans the columns of the user's line where it can (a name of underscores as long as needed), so
    Python's traceback prints that line without carets under a stretch that means nothing."""
    text = linecache.getline(filename, line)
    indent = len(text) - len(text.lstrip()) if line > 1 else 0  # an indented line needs a block opened above it
    marker = "_" * max(len(text.strip()) - len("raise "), 1)
    above = "\n" * (line - 2) + "if 1:\n" if indent else "\n" * (line - 1)
    try:
        code = compile(f"{above}{' ' * indent}raise {marker}", filename, "exec")
    except (SyntaxError, ValueError):
        return None
    if function.isidentifier() or function.startswith("<"):
        code = code.replace(co_name=function)
    try:
        exec(code, {marker: _Marker, "__name__": "__remote__"})  # not a tether module: kept in tracebacks
    except _Marker:
        tb = sys.exc_info()[2]
        return tb.tb_next if tb is not None else None
    return None
