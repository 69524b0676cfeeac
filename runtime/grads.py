"""Gradients asked for before the backward pass that computes them.

Walkthrough code reads and edits `x.grad` first and calls `loss.backward()` later. `.grad` therefore
returns a `Deferred` that records reads, item assignments and replacements; a tensor hook replays them,
in the order written, when backward reaches `x`. `with loss.backward():` runs backward at block end.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable
from typing import Any

import torch

from .errors import TetherError
from .mediator import current_mediator

__all__ = ["Deferred", "GradState", "grad_of", "set_grad", "backward_block"]

_UNSET = object()


def resolve(value: Any) -> Any:
    """The concrete value of `value`, looking through deferred gradients (and nests of them)."""
    if isinstance(value, Deferred):
        return value.concrete()
    if isinstance(value, (tuple, list)):
        return type(value)(resolve(v) for v in value)
    if isinstance(value, slice):
        return slice(resolve(value.start), resolve(value.stop), resolve(value.step))
    return value


class Deferred:
    """A value that exists once backward has run: a gradient, or an expression over gradients."""

    _tether_deferred = True

    def __init__(self, label: str, compute: Callable[[], Any] | None = None, state: GradState | None = None):
        self._label = label
        self._compute = compute
        self._state = state  # set for a direct read of a gradient: item assignment edits that gradient
        self._value = _UNSET

    def concrete(self) -> Any:
        if self._value is _UNSET and self._compute is not None:
            self._value = self._compute()
        if self._value is _UNSET:
            raise TetherError(
                f"{self._label} is not available yet: it is computed by the backward pass. Call "
                "`loss.backward()` in the trace (or use `with loss.backward():`) before using it."
            )
        return self._value

    def resolve_for_user(self) -> Any:
        from .saving import MissingGradient, finalize_saved

        try:
            return finalize_saved(self.concrete())
        except TetherError:
            return MissingGradient(self._label)

    def _tether_save(self, scope) -> Deferred:
        scope.add(self)
        return self

    def _derive(self, fn: Callable[..., Any], *args: Any, label: str = "") -> Deferred:
        return Deferred(label or self._label, lambda: fn(*resolve(args)))

    def __getitem__(self, key):
        return self._derive(operator.getitem, self, key)

    def __setitem__(self, key, value):
        if self._state is None:
            raise TetherError("Item assignment works on a gradient itself (`x.grad[...] = v`), not on an expression.")
        self._state.ops.append(("setitem", key, value))

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._derive(getattr, self, name, label=f"{self._label}.{name}")

    def __call__(self, *args, **kwargs):
        return Deferred(self._label, lambda: self.concrete()(*resolve(args), **{k: resolve(v) for k, v in kwargs.items()}))

    def __repr__(self) -> str:
        if self._value is not _UNSET:
            return repr(self._value)
        return f"<{self._label}: pending until backward>"


def _binary(fn, reflected=False):
    def method(self, other):
        return self._derive((lambda a, b: fn(b, a)) if reflected else fn, self, other)

    return method


for _name, _fn in {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
                   "matmul": operator.matmul, "pow": operator.pow, "floordiv": operator.floordiv}.items():
    setattr(Deferred, f"__{_name}__", _binary(_fn))
    setattr(Deferred, f"__r{_name}__", _binary(_fn, reflected=True))
Deferred.__neg__ = lambda self: self._derive(operator.neg, self)


class GradState:
    """The edits recorded on one tensor's gradient; replayed by a tensor hook during backward."""

    def __init__(self, tensor: torch.Tensor, label: str, rows: slice | None = None):
        self.label = label
        self.rows = rows  # set when `tensor` is the full batch and the body holds a view of these rows
        self.ops: list[tuple] = []  # ("read", node) | ("setitem", key, value) | ("replace", value)
        self.current: torch.Tensor | None = None
        self.handle = tensor.register_hook(self._on_grad)

    def read(self) -> Any:
        if self.current is not None:
            return self.current
        node = Deferred(self.label, state=self)
        self.ops.append(("read", node))
        return node

    def _on_grad(self, grad: torch.Tensor) -> torch.Tensor:
        edits = any(op[0] != "read" for op in self.ops)
        full = grad.clone() if edits else grad
        self.current = full if self.rows is None else full[self.rows]
        for op in self.ops:
            if op[0] == "read":
                op[1]._value = self.current
            elif op[0] == "setitem":
                self.current[resolve(op[1])] = resolve(op[2])
            else:
                new = torch.as_tensor(resolve(op[1]), dtype=grad.dtype, device=grad.device)
                if self.rows is None:
                    full = self.current = new
                else:
                    full[self.rows] = new
                    self.current = full[self.rows]
        self.ops.clear()
        self.handle.remove()
        return full


def grad_of(tensor: Any, states: dict[int, tuple[torch.Tensor, GradState]]) -> Any:
    """`tensor.grad` inside a trace: the real one when known, else a `Deferred` resolved by backward."""
    if not isinstance(tensor, torch.Tensor):
        return tensor.grad
    if tensor.is_leaf and tensor.grad is not None:
        return tensor.grad
    entry = states.get(id(tensor))
    if entry is None:
        if not tensor.requires_grad:
            raise TetherError(
                "`.grad` was asked of a value that does not require grad, so backward will never reach it. "
                "Set `.requires_grad = True` on it (or on an earlier module's output) first."
            )
        mediator = current_mediator()
        view = mediator.views.get(id(tensor)) if mediator is not None else None
        if view is not None and view[0] is tensor:
            state = GradState(view[1], "gradient", rows=view[2])
        else:
            state = GradState(tensor, "gradient")
        entry = states[id(tensor)] = (tensor, state)
    return entry[1].read()


def set_grad(tensor: torch.Tensor, value: Any, states: dict[int, tuple[torch.Tensor, GradState]]) -> None:
    """`tensor.grad = value` inside a trace: replaces the gradient flowing back through `tensor`."""
    grad_of(tensor, states)
    states[id(tensor)][1].ops.append(("replace", value))


@contextlib.contextmanager
def backward_block(loss: torch.Tensor, *args: Any, **kwargs: Any):
    """`with loss.backward():` — gradients asked for in the block are filled when it ends."""
    yield None
    loss.backward(*args, **kwargs)
