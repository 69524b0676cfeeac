"""Which values leave a trace: the `.save()` registry, and stand-ins for values that did not.

After the outermost context, each name its body assigned is handed back to the caller: saved values as
they are (tensors get a `.value` that returns themselves, for walkthrough code), unsaved activations
as `UnsavedValue` and never-reached ones as `NotReached`, both of which raise a clear error when used.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from .errors import TetherError, UnsavedValueError, ValueNotReachedError

__all__ = ["SaveScope", "current_scope", "save", "SavedTensor", "StandIn", "error_of", "UnsavedValue", "NotReached",
           "MissingGradient", "hand_back"]

scopes = threading.local()  # .stack: this thread's open SaveScopes, innermost last (ops.save reads it inline)
_patch_lock = threading.Lock()
_patch_users = 0  # guarded by _patch_lock: scopes open in any thread


class SaveScope:
    """The saved values of one outermost context (a trace, generate or session)."""

    def __init__(self, *, tensor_save: bool = False) -> None:
        self.saved: dict[int, Any] = {}
        self.grads: dict[int, tuple] = {}  # id(tensor) -> (tensor, GradState), see grads.py
        self._tensor_save = tensor_save  # also give tensors a `.save()` for helper code (sessions)

    def add(self, value: Any) -> Any:
        self.saved[id(value)] = value
        return value

    def is_saved(self, value: Any) -> bool:
        return id(value) in self.saved

    def __enter__(self) -> SaveScope:
        _stack().append(self)
        if self._tensor_save:
            _install_tensor_save()
        return self

    def __exit__(self, *exc) -> None:
        _stack().pop()
        if self._tensor_save:
            _remove_tensor_save()


def _stack() -> list[SaveScope]:
    try:
        return scopes.stack
    except AttributeError:
        scopes.stack = []
        return scopes.stack


def current_scope() -> SaveScope | None:
    """The innermost open scope in this thread: the context that will hand saved values back."""
    stack = getattr(scopes, "stack", None)
    return stack[-1] if stack else None


def save(value: Any) -> Any:
    """Mark `value` to be kept after the trace; returns it unchanged."""
    scope = current_scope()
    if scope is None:
        raise TetherError("`.save()` was called outside a tracing context; it only has meaning inside one.")
    if isinstance(value, torch.Tensor) or not hasattr(value, "_tether_save"):
        return scope.add(value)
    return value._tether_save(scope)


def _tensor_save(self: torch.Tensor) -> torch.Tensor:
    return save(self)


def _install_tensor_save() -> None:
    """While a session runs, `tensor.save()` also works in helper code it calls (the walkthrough's LoRA).

    Trace bodies never need it (their `.save()` is compiled to tether's), so plain traces skip it.
    """
    global _patch_users
    with _patch_lock:
        _patch_users += 1
        if _patch_users == 1:
            torch.Tensor.save = _tensor_save


def _remove_tensor_save() -> None:
    global _patch_users
    with _patch_lock:
        _patch_users -= 1
        if _patch_users == 0 and getattr(torch.Tensor, "save", None) is _tensor_save:
            del torch.Tensor.save


class SavedTensor(torch.Tensor):
    """A saved tensor: an ordinary tensor that also answers `.value` (walkthrough code reads `out.value`)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def value(self) -> torch.Tensor:
        return self

    def __repr__(self, **kwargs) -> str:
        return torch.Tensor.__repr__(self.as_subclass(torch.Tensor), **kwargs)

    def __reduce_ex__(self, protocol):
        return torch.Tensor.__reduce_ex__(self.as_subclass(torch.Tensor), protocol)


class StandIn:
    """Stands for a value the caller cannot have: every use raises the error `_error()` builds."""

    __slots__ = ("_name", "_why")

    def __init__(self, name: str, why: str = ""):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_why", why)

    def _error(self) -> Exception:
        raise NotImplementedError

    def __getattr__(self, item):
        if item.startswith("_"):  # probes by IPython, debuggers, pickle: "no such attribute", not a failure
            raise AttributeError(item)
        raise self._error()

    def __repr__(self) -> str:
        """Readable, never raising (a notebook cell ending in one, a debugger's variable view): what the
        name stands for, and how to get its value."""
        return f"<{type(self).__name__} {self._name!r}: {self._error()}>"

    def __str__(self):
        raise self._error()

    def __bool__(self):
        raise self._error()

    def __len__(self):
        raise self._error()

    def __iter__(self):
        raise self._error()

    def __getitem__(self, item):
        raise self._error()

    def __setitem__(self, key, value):
        raise self._error()

    def __call__(self, *args, **kwargs):
        raise self._error()

    def __format__(self, spec):
        raise self._error()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        for arg in args:
            if isinstance(arg, StandIn):
                raise arg._error()
        raise TetherError("an unsaved trace value was passed to torch")


def _raising_binary(name: str):
    def method(self, *other):
        raise self._error()

    method.__name__ = name
    return method


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
            "lt", "le", "gt", "ge", "radd", "rsub", "rmul", "rtruediv", "rmatmul", "neg", "abs", "float", "int",
            "index"):
    setattr(StandIn, f"__{_op}__", _raising_binary(f"__{_op}__"))


def error_of(stand_in: StandIn) -> Exception:
    """The error a use of `stand_in` raises (the client raises it before sending one to a server)."""
    return stand_in._error()


class UnsavedValue(StandIn):
    """Stands for an activation that was not `.save()`d inside the trace."""

    def _error(self) -> Exception:
        return UnsavedValueError(
            f"`{self._name}` holds a value from inside the trace that was not saved, so it was freed when the "
            f"trace ended. Call `.save()` on it inside the trace, e.g. `{self._name} = ....save()`."
        )


class NotReached(StandIn):
    """Stands for a name the trace body never assigned (it stopped early or never got that far)."""

    def _error(self) -> Exception:
        why = f" ({self._why})" if self._why else ""
        return ValueNotReachedError(
            f"`{self._name}` was never set: the trace ended before reaching the line that assigns it{why}. "
            "If you stopped the model early, access only modules that run before the stop point."
        )


class MissingGradient(StandIn):
    """Stands for a gradient the trace asked for that no backward pass computed."""

    def _error(self) -> Exception:
        return ValueNotReachedError(
            f"`{self._name}` is a gradient that no backward pass computed: `.grad` was asked for after "
            "`backward()` ran (or backward never ran). Ask for it first, then run backward: "
            f"`{self._name} = h.grad.save()` on one line, `loss.backward()` on a later one."
        )


def _holds_activations(value: Any, depth: int = 0) -> bool:
    if type(value) in _PLAIN_TYPES:
        return False
    if isinstance(value, torch.Tensor) or getattr(type(value), "_tether_deferred", False):
        return not isinstance(value, torch.nn.Parameter)
    if depth > 3:
        return False
    if isinstance(value, (tuple, list)):
        return any(_holds_activations(v, depth + 1) for v in value[:64])
    if isinstance(value, dict):
        return any(_holds_activations(v, depth + 1) for v in list(value.values())[:64])
    return False


_PLAIN_TYPES = frozenset({int, float, str, bool, bytes, type(None)})


def hand_back(ns: dict, names: tuple[str, ...], scope: SaveScope, before: dict, *, why: str = "") -> dict:
    """The values to write back into the caller for `names`: saved ones, or stand-ins that explain."""
    out = {}
    for name in names:
        if name not in ns:
            out[name] = NotReached(name, why)
            continue
        value = ns[name]
        if isinstance(value, StandIn) or (name in before and value is before[name]):
            out[name] = value
        elif scope.is_saved(value):
            out[name] = finalize_saved(value)
            if isinstance(out[name], StandIn) and out[name]._name != name:  # say the caller's name
                out[name] = type(out[name])(name, out[name]._why)
        elif _holds_activations(value):
            out[name] = UnsavedValue(name)
        else:
            out[name] = value
    return out


def finalize_saved(value: Any) -> Any:
    """A saved value as the user sees it after the trace."""
    if getattr(value, "_tether_deferred", False):
        return value.resolve_for_user()
    if type(value) is torch.Tensor:
        return value.as_subclass(SavedTensor)
    return value
