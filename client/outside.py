"""Outside objects a remote body changed in place: plain objects sent as their attributes, and the changes
the server sent back applied to the caller's very objects (lists, dicts, plain objects), as a local run does.

Imports torch, tether.values and the standard library only.
"""

from __future__ import annotations

from typing import Any

import torch

from tether.values import Attributes

__all__ = ["is_plain_object", "as_namespace", "merge_into"]


def is_plain_object(obj: Any, is_library: Any) -> bool:
    """An instance of the user's own class whose state is its `__dict__`: every class of its MRO is the
    user's (no library base such as dict or nn.Module, whose state lives elsewhere), no slots, no metaclass."""
    tp = type(obj)
    return (type(tp) is type and isinstance(getattr(obj, "__dict__", None), dict)
            and all(c is object or (not is_library(c) and "__slots__" not in vars(c)) for c in tp.__mro__))


def as_namespace(obj: Any) -> Attributes:
    """What a plain object travels as: its attributes (the server sees attribute reads and writes only)."""
    return Attributes(**vars(obj))


def merge_into(old: Any, new: Any) -> Any:
    """`new` (what the server sent back for an outside value) written into `old` where `old` is a list, dict
    or plain object of the same shape; returns the object the caller keeps (`old` itself, when merged)."""
    if type(old) is list and type(new) is list:
        old[:] = [merge_into(o, n) for o, n in zip(old, new)] + new[len(old):]
        return old
    if type(old) is dict and type(new) is dict:
        merged = {key: merge_into(old[key], value) if key in old else value for key, value in new.items()}
        old.clear()  # the server's order is the body's (a key deleted and set again moved to the end)
        old.update(merged)
        return old
    if type(new) is Attributes and not isinstance(old, Attributes) \
            and isinstance(getattr(old, "__dict__", None), dict):
        state = vars(new)
        for key in [k for k in vars(old) if k not in state]:
            delattr(old, key)
        for key, value in state.items():
            setattr(old, key, merge_into(vars(old)[key], value) if key in vars(old) else value)
        return old
    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and _same_tensor(old, new):
        return old  # unchanged: keep the very tensor, as a local run does
    return new


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape and a.device == b.device and not a.is_meta
            and bool(torch.equal(a.detach(), b.detach())))
