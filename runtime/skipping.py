"""`module.skip(replacement)`: a gate in place of a module's forward, so a skipped module never runs.

PyTorch binds `module.forward` before it runs the pre-hooks, so the gate is installed (as an instance
attribute, removed in `finally` like a hook) before the module is called. Imports torch and errors only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .errors import TetherError

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

    def replacement(self, batch_size: int, root: torch.nn.Module, module: torch.nn.Module) -> Any:
        """The module's output: the replacements joined in row order, which must cover the whole batch."""
        whole = [value for rows, value in self.parts if rows is None]  # an empty invoke (or the only one)
        if whole:
            return whole[-1]
        parts = sorted(self.parts, key=lambda part: part[0].start)
        if sum(rows.stop - rows.start for rows, _ in parts) != batch_size:
            name = next((name for name, inner in root.named_modules() if inner is module), "")
            raise TetherError(
                f"`model.{name}.skip()` was called in some invokes but not in others: the module runs once for "
                "the whole batch, so it cannot run for only some rows. Skip it in every invoke (or in an empty "
                "`tracer.invoke()`, which sees the whole batch), or in none."
            )
        return join_rows([value for _, value in parts])


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
