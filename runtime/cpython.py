"""CPython's own machinery tether relies on, each use gated by version with the reason: exception state,
frame-locals write-back, trace-function skipping, bytecode positions, and which frames are tether's own.
Standard library only (tested without torch under every Python tether supports); imports nothing from tether.
"""

from __future__ import annotations

import ast
import ctypes
import dis
import sys
from types import FrameType

__all__ = ["SkipBody", "skip_body", "restore_trace", "set_handled_exception", "HANDLED_RESTORED_AFTER_EXIT",
           "write_frame_locals", "entered_with_item", "is_tether_frame"]

# Private prototypes bound to the interpreter's own symbols: `ctypes.pythonapi.X.argtypes = ...` would change
# the one shared function object for every library in the process; these leave it as it was.
_py_incref = ctypes.PYFUNCTYPE(None, ctypes.py_object)(("Py_IncRef", ctypes.pythonapi))
_set_exc_info = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
    ("PyErr_SetExcInfo", ctypes.pythonapi))

# 3.13 (PEP 667): a function frame's `f_locals` is a write-through proxy, and PyFrame_LocalsToFast is
# deprecated and does nothing. Before 3.13 `f_locals` is a snapshot dict that PyFrame_LocalsToFast copies
# back into the frame's fast variables.
_LOCALS_PROXY = sys.version_info >= (3, 13)
_locals_to_fast = None if _LOCALS_PROXY else ctypes.PYFUNCTYPE(None, ctypes.py_object, ctypes.c_int)(
    ("PyFrame_LocalsToFast", ctypes.pythonapi))

# 3.12 runs `sys.settrace` on sys.monitoring (PEP 669), whose opcode events need re-arming (see skip_body).
_REARM_OPCODE_EVENTS = sys.version_info[:2] == (3, 12)

# 3.11 (zero-cost exceptions): a `with` statement's handler saves the exception being handled on the frame's
# value stack (PUSH_EXC_INFO) and its POP_EXCEPT puts it back whether `__exit__` returns or raises (the raise
# goes through the handler's cleanup, which pops too), so what `__exit__` leaves handled is overwritten: a
# block that changed it need not set it back. 3.10 keeps setting it back, as it always has.
HANDLED_RESTORED_AFTER_EXIT = sys.version_info >= (3, 11)

# 3.11 (PEP 657) gives each instruction its source columns; 3.10 has line numbers only.
_POSITIONS = sys.version_info >= (3, 11)
# The instruction that calls a `with` item's `__enter__` (3.10: SETUP_WITH; 3.11 to 3.13: BEFORE_WITH).
_WITH_OPS = frozenset({"SETUP_WITH", "BEFORE_WITH", "SETUP_ASYNC_WITH", "BEFORE_ASYNC_WITH"})


class SkipBody(BaseException):
    """Raised from a trace function on a block's first line so the caller never runs the body itself."""


def skip_body(frame: FrameType) -> object:
    """Make `frame` raise `SkipBody` at its next instruction (the `with` statement's own handler catches it,
    whatever the body starts with: `try:`, `pass`, a docstring...); returns the state `restore_trace` needs.

    Per-opcode trace events (`f_trace_opcodes`, 3.7+) reach a frame's `f_trace` only while some thread-wide
    trace function is set, so a no-op one is installed when there is none. 3.12 turns opcode events on only
    inside `sys.settrace`, and only once some frame has asked for them: so the frame asks first, and there
    the thread-wide function is set again even when one is already installed (a debugger's, coverage's).
    """
    previous = (sys.gettrace(), frame.f_trace, frame.f_trace_opcodes)
    frame.f_trace = _SkipNextOpcode(frame)
    frame.f_trace_opcodes = True
    if previous[0] is None:
        sys.settrace(_noop_trace)
    elif _REARM_OPCODE_EVENTS:
        sys.settrace(previous[0])
    return (frame, previous)


class _SkipNextOpcode:
    """The frame's trace function while its body is skipped (an object, not a closure that would refer to
    itself, so nothing is left for the garbage collector once `restore_trace` drops it)."""

    __slots__ = ("frame",)

    def __init__(self, frame: FrameType):
        self.frame = frame

    def __call__(self, frame: FrameType, event: str, arg: object) -> _SkipNextOpcode:
        if frame is self.frame and event == "opcode":
            raise SkipBody()
        return self


def restore_trace(state: object) -> None:
    """Undo `skip_body`: give the thread and the frame back their previous trace functions."""
    frame, (global_trace, frame_trace, opcodes) = state
    frame.f_trace = frame_trace
    frame.f_trace_opcodes = opcodes
    if global_trace is None:
        sys.settrace(None)


def _noop_trace(frame, event, arg):
    return None


def set_handled_exception(exc: BaseException | None) -> None:
    """Make `exc` (None: nothing) the exception this thread is handling (`sys.exc_info()`, a bare `raise`).

    Python has no API for it before 3.11's PyErr_SetHandledException, so this calls PyErr_SetExcInfo, which
    exists in every version and steals its three references. 3.10 keeps all three (a NULL type there breaks
    `sys.exc_info()` and a bare `raise`); 3.11+ keeps the value only and releases the others.
    """
    parts = (None, None, None) if exc is None else (type(exc), exc, exc.__traceback__)
    for part in parts:
        if part is not None:
            _py_incref(part)
    _set_exc_info(*(None if part is None else id(part) for part in parts))


def write_frame_locals(frame: FrameType, values: dict) -> None:
    """Bind `values` as variables of `frame` (a function's locals or a module's globals)."""
    if not values:
        return
    locals_ = frame.f_locals
    locals_.update(values)
    if _locals_to_fast is not None and locals_ is not frame.f_globals:
        _locals_to_fast(frame, 0)


def entered_with_item(frame: FrameType, node: ast.With | ast.AsyncWith) -> int:
    """Which item of `with a, b as t:` (the statement `node`) `frame` is entering now; the last item when
    that cannot be told."""
    if len(node.items) == 1:
        return 0
    if _POSITIONS:
        index = _item_by_position(frame, node)
    else:
        index = _item_by_count(frame, node)
    return len(node.items) - 1 if index is None else index


def _item_by_position(frame: FrameType, node: ast.With | ast.AsyncWith) -> int | None:
    """The item whose context expression ends where the last instruction before `__enter__` does."""
    last = None
    for instruction in dis.get_instructions(frame.f_code):
        if instruction.offset >= frame.f_lasti:
            break
        last = instruction.positions
    for i, item in enumerate(node.items):
        expr = item.context_expr
        if last is not None and (expr.end_lineno, expr.end_col_offset) == (last.end_lineno, last.end_col_offset):
            return i
    return None


def _item_by_count(frame: FrameType, node: ast.With | ast.AsyncWith) -> int | None:
    """How many of the statement's `__enter__` instructions (those on its header lines) come before the
    current one: each item compiles to one, in order. Used where instructions carry no columns (3.10)."""
    header = range(node.lineno, node.body[0].lineno)
    starts = dict(dis.findlinestarts(frame.f_code))  # offset -> line, where a new line starts
    line = None
    index = -1
    for instruction in dis.get_instructions(frame.f_code):
        line = starts.get(instruction.offset, line)
        if instruction.opname in _WITH_OPS and line in header:
            if instruction.offset > frame.f_lasti:
                break
            index += 1
    return index if 0 <= index < len(node.items) else None


def is_tether_frame(frame: FrameType) -> bool:
    """Whether `frame` runs tether's own code, told by its module's name (the same in a source checkout
    and an installed wheel). Trace bodies run in the caller's namespace, so they count as the caller's."""
    name = frame.f_globals.get("__name__")
    return isinstance(name, str) and (name == "tether" or name.startswith("tether."))
