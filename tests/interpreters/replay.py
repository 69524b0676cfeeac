"""A minimal tracing context built from the parts `runtime/contexts.Context` uses (capture and cpython): it
finds its block, skips it in the caller, runs it itself and writes back what the block assigned.
"""

from __future__ import annotations

import sys
from typing import Any

from tether.runtime.capture import bind_target, find_block
from tether.runtime.cpython import (
    HANDLED_RESTORED_AFTER_EXIT,
    SkipBody,
    restore_trace,
    set_handled_exception,
    skip_body,
    write_frame_locals,
)


class Replay:
    """`with Replay() as r:` runs its body once, from `__exit__`, in the caller's names (`r.runs` counts);
    `with Replay(pair=v) as (r, x):` enters as the pair `(r, v)`."""

    def __init__(self, pair: Any = None) -> None:
        self.runs = 0
        self._pair = pair
        self.block = None

    def __enter__(self) -> Replay:
        self._frame = sys._getframe(1)
        self.block = find_block(self._frame)
        self._state = skip_body(self._frame)
        return self if self._pair is None else (self, self._pair)

    def __exit__(self, exc_type, exc, tb) -> bool:
        restore_trace(self._state)
        frame, self._frame = self._frame, None
        if exc_type is not SkipBody:
            return False
        set_handled_exception(exc.__context__)
        try:
            ns: dict[str, Any] = {**frame.f_globals, **frame.f_locals}
            bound = bind_target(self.block, self if self._pair is None else (self, self._pair), ns)
            self.runs += 1
            exec(self.block.code(), ns)
            write_frame_locals(frame, {**bound, **{n: ns[n] for n in self.block.assigned if n in ns}})
        finally:
            if not HANDLED_RESTORED_AFTER_EXIT:
                set_handled_exception(exc)
        return True
