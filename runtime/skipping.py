"""`module.skip(replacement)`: a gate in place of a module's forward, so a skipped module never runs.

PyTorch binds `module.forward` before it runs the pre-hooks, so the gate is installed (as an instance
attribute, removed in `finally` like a hook) before the module is called. Imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["SkipGate", "SkipSlot", "join_rows"]


class SkipGate:
    """Routes calls of `module.forward` through `gate(module, forward, args, kwargs)`; `remove()` undoes it."""

    __slots__ = ("_module", "_previous")

    _ABSENT = object()

    def __init__(self, module: torch.nn.Module, gate: Callable[..., Any]):
        self._module = module
        self._previous = module.__dict__.get("forward", self._ABSENT)  # e.g. an accelerate hook's wrapper
        forward = module.forward

        def gated(*args: Any, **kwargs: Any) -> Any:
            return gate(module, forward, args, kwargs)

        module.__dict__["forward"] = gated

    def remove(self) -> None:
        if self._previous is self._ABSENT:
            self._module.__dict__.pop("forward", None)
        else:
            self._module.__dict__["forward"] = self._previous


class SkipSlot:
    """What a gate collects while it serves: each skipping invoke's rows and replacement (Slot's interface)."""

    __slots__ = ("parts", "value", "changed")

    def __init__(self) -> None:
        self.parts: list[tuple[slice | None, Any]] = []
        self.value = None
        self.changed = False

    def get(self, kind: str, rows: slice | None) -> None:
        return None

    def set(self, kind: str, rows: slice | None, new: Any) -> None:
        self.parts.append((rows, new))


def join_rows(values: list[Any]) -> Any:
    """Invokes' replacements, in row order, as one batched value (tensors joined along dim 0)."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values, dim=0)
    if isinstance(first, (tuple, list)):
        items = [join_rows([v[i] for v in values]) for i in range(len(first))]
        return type(first)(*items) if hasattr(first, "_fields") else type(first)(items)
    if isinstance(first, dict):
        joined = {k: join_rows([v[k] for v in values]) for k in first}
        try:
            return type(first)(**joined)
        except TypeError:
            return type(first)(joined)
    return first
