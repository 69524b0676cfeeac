"""The walkthrough's helper spellings, kept so ported notebooks run unchanged.

`tether.list()`, `tether.dict()`, ... build ordinary Python objects; `tether.apply(fn, x)` calls `fn`;
`@tether.trace` marks a function the client may run inside `local()` blocks of remote jobs.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any

__all__ = ["apply", "trace", "stop", "list", "dict", "tuple", "set", "int", "float", "str", "bool", "bytes",
           "bytearray", "complex", "is_traced_function"]


def apply(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call `fn(*args, **kwargs)` inside a trace (intervention code runs on real values)."""
    return fn(*args, **kwargs)


def trace(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark `fn` as client-side code: on a remote job it may be called inside `with tether.local():`."""
    fn.__tether_traced__ = True
    return fn


def stop() -> None:
    """Stop the model after the module running now (like `tracer.stop()`); outside a body, nothing."""
    from .mediator import current_mediator

    mediator = current_mediator()
    if mediator is not None:
        mediator.stop()


def is_traced_function(fn: Any) -> builtins.bool:
    return builtins.bool(getattr(fn, "__tether_traced__", False))


list = builtins.list
dict = builtins.dict
tuple = builtins.tuple
set = builtins.set
int = builtins.int
float = builtins.float
str = builtins.str
bool = builtins.bool
bytes = builtins.bytes
bytearray = builtins.bytearray
complex = builtins.complex
