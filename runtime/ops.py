"""The functions a compiled trace body calls in place of `.save()`, `.stop()`, `.grad` and `.value`.

`capture` rewrites those spellings to `__tether__.<name>(x)` so tether never mounts methods on torch
or built-in types; each function falls back to the object's own attribute when it has one.
"""

from __future__ import annotations

from typing import Any

import torch

from . import grads, saving
from .errors import NotInTraceError
from .mediator import current_mediator

__all__ = ["save", "stop", "stop_at", "grad", "set_grad", "value", "backward"]

_MISSING = object()


def save(obj: Any) -> Any:
    """`obj.save()`: keep `obj` after the trace."""
    if type(obj) is torch.Tensor:  # the commonest case, `saving.current_scope()` inlined
        stack = getattr(saving.scopes, "stack", None)
        if stack:
            stack[-1].saved[id(obj)] = obj
            return obj
    if not hasattr(type(obj), "save") or isinstance(obj, torch.Tensor):
        return saving.save(obj)
    if hasattr(obj, "_tether_save"):
        return saving.save(obj)
    return obj.save()


def stop(obj: Any) -> Any:
    """`obj.stop()`: on a module value, stop the model once the current module has run."""
    if hasattr(type(obj), "stop") and not isinstance(obj, torch.Tensor):
        return obj.stop()
    mediator = current_mediator()
    if mediator is None:
        raise NotInTraceError("`.stop()` on a value only works inside a trace body.")
    mediator.stop()
    return None


def stop_at(owner: Any, kind: str) -> Any:
    """`owner.output.stop()` (or `.input` / `.inputs`): on a module, stop the model once that value exists."""
    stop_after = getattr(owner, "_stop_at", None)
    if stop_after is None:
        return stop(getattr(owner, kind))
    stop_after(kind)
    return None


def _grad_states() -> dict:
    scope = saving.current_scope()
    if scope is None:
        raise NotInTraceError("`.grad` on a trace value only works inside a trace.")
    return scope.grads


def grad(obj: Any) -> Any:
    """`obj.grad`: the gradient of a trace value, available once backward reaches it."""
    if isinstance(obj, torch.Tensor):
        return grads.grad_of(obj, _grad_states())
    return obj.grad


def set_grad(obj: Any, new: Any) -> None:
    """`obj.grad = new`: replace the gradient that flows back through `obj`."""
    if isinstance(obj, torch.Tensor):
        grads.set_grad(obj, new, _grad_states())
    else:
        obj.grad = new


def value(obj: Any) -> Any:
    """`obj.value`: the object itself for tensors (nnsight proxies had `.value`), else the attribute."""
    found = getattr(obj, "value", _MISSING)
    return obj if found is _MISSING else found


def backward(obj: Any, *args: Any, **kwargs: Any) -> Any:
    """`with loss.backward():` runs backward when the block ends."""
    if isinstance(obj, torch.Tensor):
        return grads.backward_block(obj, *args, **kwargs)
    return obj.backward(*args, **kwargs)
