"""The `with` blocks tether runs itself: the shared base, conditions, iterators and `local()` blocks.

`Context.__enter__` captures the block and skips it in the caller; `__exit__` runs it with the caller's
names, then (for the outermost block) writes the names it assigned back into the caller's frame.
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import ops
from .capture import OPS_NAME, Block, bind_target, find_block
from .cpython import (
    HANDLED_RESTORED_AFTER_EXIT,
    SkipBody,
    is_tether_frame,
    restore_trace,
    set_handled_exception,
    skip_body,
    write_frame_locals,
)
from .saving import SaveScope, hand_back

__all__ = ["Context", "RemoteRequest", "Cond", "Iterator", "LocalBlock", "local", "local_handler", "ExitLoop"]

class ExitLoop(BaseException):
    """Raised by `iterator.exit()` to leave a `session.iter(...)` loop."""


@dataclass(frozen=True)
class RemoteRequest:
    """What a captured block asks of a remote run, as the client reads it (never the block's own fields)."""

    model: Any  # the model (handle) the block was opened on
    kind: str  # "trace", "generate", "scan" or "session"
    options: dict  # the remote options given at the entry point: backend, api_key, blocking, model_name...
    trace_options: dict = field(default_factory=dict)  # scan/validate/invoker_args as entry-point keywords


class Context:
    """A block whose body tether runs: subclasses say how, in `_execute(ns)`."""

    _hands_back = True  # whether the outermost block writes its assigned names back to the caller
    _tensor_save = False  # whether helper code called from the block may use `tensor.save()`

    def __enter__(self) -> Any:
        return self._enter_from(sys._getframe(1))

    def _enter_from(self, frame: types.FrameType) -> Any:
        self._block: Block = find_block(frame)
        self._frame = frame
        self._skip_state = skip_body(frame)
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
        # The block runs with what the caller was handling when the skip was raised (usually nothing), as in
        # plain Python: while SkipBody is handled, every exception raised would be chained to it and so built
        # at once, where `getattr(obj, name, default)` finding nothing builds none (~120 of those made a
        # Hugging Face GPT-2 forward ~45 µs slower inside `__exit__` than a plain call).
        set_handled_exception(exc.__context__)
        try:
            self._run_skipped(frame, entered)
        except BaseException as error:
            # _trimmed drops tether's frames below this one; the `finally` drops this frame's own entry, which
            # the raise adds (runtime/README.md, "Tracebacks"). Python 3.10 keeps that entry, whose printed
            # line below says what it is; IPython and pytest hide it there (__tracebackhide__).
            __tracebackhide__ = True  # noqa: F841
            trimmed = _trimmed(error)
            body_traceback = trimmed.__traceback__
            try:
                raise trimmed from error.__cause__  # tether ran the `with` block's body; its error follows
            finally:
                trimmed.__traceback__ = body_traceback
        finally:
            if not HANDLED_RESTORED_AFTER_EXIT:
                set_handled_exception(exc)
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
            write_frame_locals(frame, bound)  # as plain Python does, `as` names stay bound when the body fails
            raise
        handed = hand_back(ns, self._block.assigned, scope, before, why=self._why_unreached())
        write_frame_locals(frame, {**bound, **handed} if self._hands_back else bound)

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
            self._skip_state = skip_body(frame)
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
            self._skip_state = skip_body(frame)
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
            write_frame_locals(frame, self._handler(self._block, {**frame.f_globals, **frame.f_locals}))
        return True


def local() -> LocalBlock:
    """A block that runs on the researcher's machine during a remote job (just runs, locally)."""
    return LocalBlock()


def _trimmed(error: BaseException) -> BaseException:
    """`error` with tether's own frames removed, so the traceback ends at the user's line."""
    kept = []
    tb = error.__traceback__
    while tb is not None:
        if not is_tether_frame(tb.tb_frame):
            kept.append(tb)
        tb = tb.tb_next
    new_tb = None
    for entry in reversed(kept):
        new_tb = types.TracebackType(new_tb, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return error.with_traceback(new_tb)

