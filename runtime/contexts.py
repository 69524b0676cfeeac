"""The `with` blocks tether runs itself: the shared base, conditions, iterators and `local()` blocks.

`Context.__enter__` captures the block and skips it in the caller; `__exit__` runs it with the caller's
names, then (for the outermost block) writes the names it assigned back into the caller's frame.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import types
from collections.abc import Callable, Iterable
from typing import Any

from . import ops
from .capture import OPS_NAME, Block, SkipBody, bind_target, find_block, restore_trace, skip_body
from .saving import SaveScope, hand_back

__all__ = ["Context", "Cond", "Iterator", "LocalBlock", "local", "local_handler", "ExitLoop"]

_RUNTIME_DIR = os.path.dirname(os.path.abspath(__file__))
_PROJECT_DIR = os.path.dirname(_RUNTIME_DIR)
_INTERNAL_DIRS = tuple(os.path.join(_PROJECT_DIR, d) + os.sep for d in ("runtime", "tether", "client", "server"))


class ExitLoop(BaseException):
    """Raised by `iterator.exit()` to leave a `session.iter(...)` loop."""


class Context:
    """A block whose body tether runs: subclasses say how, in `_execute(ns)`."""

    _hands_back = True  # whether the outermost block writes its assigned names back to the caller
    _tensor_save = False  # whether helper code called from the block may use `tensor.save()`

    def __enter__(self) -> Any:
        return self._enter_from(sys._getframe(1))

    def _enter_from(self, frame: types.FrameType) -> Any:
        self._block: Block = find_block(frame)
        self._frame = frame
        self._skip_state = skip_body(frame, self._block)
        self._entered = self._enter_value()
        return self._entered

    def _enter_value(self) -> Any:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        restore_trace(self._skip_state)
        frame, self._frame, self._skip_state = self._frame, None, None
        entered, self._entered = self._entered, None  # often `self`: kept, it would be a reference cycle
        if exc_type is not SkipBody:
            return False
        _set_handled_exception(exc.__context__)  # what the caller was handling when the skip was raised
        try:
            self._run_skipped(frame, entered)
        except BaseException as error:
            # IPython and pytest hide a frame with __tracebackhide__; _trimmed drops the frames below this one
            __tracebackhide__ = True  # noqa: F841
            raise _trimmed(error) from error.__cause__
        finally:
            _set_handled_exception(exc)
        return True

    def _run_skipped(self, frame: types.FrameType, entered: Any) -> None:
        """Run the block the caller skipped, with the caller's names, and write back what it assigned."""
        globals_ = frame.f_globals
        if OPS_NAME in globals_ and frame.f_locals is globals_:
            bind_target(self._block, entered, globals_)
            self._run(globals_)
            return
        ns = {**globals_, **frame.f_locals, OPS_NAME: ops}
        bound = bind_target(self._block, entered, ns)
        before = {name: ns[name] for name in self._block.assigned if name in ns}
        scope = SaveScope(tensor_save=self._tensor_save)
        try:
            with scope:
                self._run(ns)
        except BaseException:
            _write_frame(frame, bound)  # as plain Python does, `as` names stay bound when the body fails
            raise
        handed = hand_back(ns, self._block.assigned, scope, before, why=self._why_unreached())
        _write_frame(frame, {**bound, **handed} if self._hands_back else bound)

    def _run(self, ns: dict) -> None:
        try:
            self._execute(ns)
        except SkipBody:
            raise
        except BaseException as error:
            raise _trimmed(error) from error.__cause__

    def _execute(self, ns: dict) -> None:
        exec(self._block.code(), ns)

    def _why_unreached(self) -> str:
        return ""

    @property
    def block(self) -> Block:
        return self._block


class Cond:
    """`with tracer.cond(c):` — the body runs only when `c` is true (nests freely)."""

    def __init__(self, condition: Any):
        self._condition = bool(condition)

    def __enter__(self) -> Cond:
        if not self._condition:
            frame = sys._getframe(1)
            self._skip_state = skip_body(frame, find_block(frame))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self._condition:
            restore_trace(self._skip_state)
            self._skip_state = None
            return exc_type is SkipBody
        return False


class Iterator(Context):
    """`with session.iter(seq) as item:` — runs the body once per item (`iterator.exit()` leaves early)."""

    def __init__(self, items: Iterable, *, return_context: bool = False, log: Callable[..., None] = print):
        self._items = items
        self._return_context = return_context
        self.log = log

    def _enter_value(self) -> Any:
        return (None, self) if self._return_context else None

    def _execute(self, ns: dict) -> None:
        target = self._block.target
        code = self._block.code(target=target)
        try:
            for item in self._items:
                ns[f"{OPS_NAME}_item"] = (item, self) if self._return_context else item
                exec(code, ns)
        except ExitLoop:
            pass
        finally:
            ns.pop(f"{OPS_NAME}_item", None)

    def exit(self) -> None:
        """Leave the loop now."""
        raise ExitLoop()

    def cond(self, condition: Any) -> Cond:
        return Cond(condition)

    def iter(self, items: Iterable, return_context: bool = False) -> Iterator:
        return Iterator(items, return_context=return_context, log=self.log)


_handlers = threading.local()


class local_handler:
    """Install the function that runs `local()` blocks elsewhere (the server sends them to the client).

    The handler gets `(block, ns)` and returns the names the block assigned, as a dict.
    """

    def __init__(self, handler: Callable[[Block, dict], dict]):
        self._handler = handler

    def __enter__(self) -> None:
        stack = getattr(_handlers, "stack", None)
        if stack is None:
            stack = _handlers.stack = []
        stack.append(self._handler)

    def __exit__(self, *exc) -> None:
        _handlers.stack.pop()


def _current_handler() -> Callable[[Block, dict], dict] | None:
    stack = getattr(_handlers, "stack", None)
    return stack[-1] if stack else None


class LocalBlock:
    """`with tether.local():` — on a server the body runs on the client; locally it just runs."""

    def __enter__(self) -> LocalBlock:
        self._handler = _current_handler()
        if self._handler is not None:
            frame = sys._getframe(1)
            self._block = find_block(frame)
            self._frame = frame
            self._skip_state = skip_body(frame, self._block)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._handler is None:
            return False
        restore_trace(self._skip_state)
        frame, self._frame, self._skip_state = self._frame, None, None
        if exc_type is not SkipBody:
            return False
        if frame.f_locals is frame.f_globals:
            frame.f_globals.update(self._handler(self._block, frame.f_globals))
        else:  # a block inside a function: it sees the function's variables and may rebind them
            _write_frame(frame, self._handler(self._block, {**frame.f_globals, **frame.f_locals}))
        return True


def local() -> LocalBlock:
    """A block that runs on the researcher's machine during a remote job (just runs, locally)."""
    return LocalBlock()


_locals_to_fast = ctypes.pythonapi.PyFrame_LocalsToFast
_locals_to_fast.argtypes = (ctypes.py_object, ctypes.c_int)
_locals_to_fast.restype = None


_set_exc_info = ctypes.pythonapi.PyErr_SetExcInfo
_set_exc_info.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
_set_exc_info.restype = None
_incref = ctypes.pythonapi.Py_IncRef
_incref.argtypes = (ctypes.py_object,)
_incref.restype = None


def _set_handled_exception(exc: BaseException | None) -> None:
    """Make `exc` (None: nothing) the exception this thread is handling, through the public C API.

    `__exit__` is called while SkipBody is being handled. The block runs as it would in plain Python, with
    what the caller was handling (usually nothing): SkipBody is an artefact of skipping, and every exception
    raised while one is handled is chained to it and so built at once, where a `getattr(obj, name, default)`
    that finds nothing would otherwise build none. A Hugging Face GPT-2 forward raises ~120 such
    AttributeErrors, which made a model run inside `__exit__` ~45 µs slower than a plain call.
    """
    parts = (None, None, None) if exc is None else (type(exc), exc, exc.__traceback__)
    for part in parts:
        if part is not None:
            _incref(part)  # PyErr_SetExcInfo steals its arguments (3.10 keeps all three, 3.11 the value)
    _set_exc_info(*(None if part is None else id(part) for part in parts))


def _write_frame(frame: types.FrameType, values: dict) -> None:
    if not values:
        return
    locals_ = frame.f_locals
    locals_.update(values)
    if locals_ is not frame.f_globals:
        _locals_to_fast(frame, 0)


def _is_internal(filename: str) -> bool:
    return filename.startswith(_INTERNAL_DIRS)


def _trimmed(error: BaseException) -> BaseException:
    """`error` with tether's own frames removed, so the traceback ends at the user's line."""
    kept = []
    tb = error.__traceback__
    while tb is not None:
        if not _is_internal(tb.tb_frame.f_code.co_filename):
            kept.append(tb)
        tb = tb.tb_next
    new_tb = None
    for entry in reversed(kept):
        new_tb = types.TracebackType(new_tb, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return error.with_traceback(new_tb)

