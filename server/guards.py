"""What a program on the server holds at run time instead of what it could misuse: guarded modules, and checked
stand-ins for the calls that read attributes by a name computed at run time.

The source check (source_check.py) refuses what a program spells; a program can still reach a module through a
variable, a list or a call, and build an attribute's name at run time (`getattr(f, "_" * 2 + "globals" + ...)`).
So the program's modules are guards (`GuardedModule`: each attribute read is checked as the dotted path it spells,
by the policy), and its `getattr`, `operator.attrgetter` and `operator.methodcaller` refuse the attribute names
the source check refuses (dunders, denied attributes) whatever spelled them. Imports the standard library, torch's
data loader and the server's errors and
policy (its hints and rules; the Policy itself is handed in).
"""

from __future__ import annotations

import builtins
import functools
import operator
import sys
import types
from typing import Any

from .errors import PolicyViolation, RefusedAttribute
from .policy import ALLOW_HINT, LOADER_RULE, MOVE_HINT, Policy

__all__ = ["GuardedModule", "guarded", "guarded_module", "program_builtins"]

class GuardedModule:
    """A module as a program on the server sees it (Policy.guarded). It holds no attribute of its own (a program
    could read any): the module and what was read from it are in `_GUARDED`, by the guard's id."""

    __slots__ = ("__weakref__",)

    def __getattr__(self, name: str) -> Any:
        module, policy, seen = _GUARDED[id(self)]
        hit = seen.get(name)
        if hit is None:
            path = f"{module.__name__}.{name}"
            reason = policy.path_refusal(path)
            if reason:
                hit = f"{reason}; {ALLOW_HINT}"
            else:
                value = _STAND_INS[path](policy) if path in _STAND_INS else getattr(module, name)
                hit = (guarded(policy, value) if isinstance(value, types.ModuleType) else value,)
            seen[name] = hit
        if isinstance(hit, str):
            raise RefusedAttribute(hit, sys._getframe(1).f_lineno)
        return hit[0]

    def __setattr__(self, name: str, value: Any) -> None:
        raise PolicyViolation(f"assigning to a module's attribute ('{name}') is not allowed on the server: it would "
                              f"change it for every job; {MOVE_HINT}", sys._getframe(1).f_lineno)

    def __delattr__(self, name: str) -> None:
        self.__setattr__(name, None)

    def __dir__(self) -> list[str]:
        return dir(_GUARDED[id(self)][0])

    def __repr__(self) -> str:
        return f"<module {_GUARDED[id(self)][0].__name__!r}>"


_GUARDED: dict[int, tuple[types.ModuleType, Policy, dict[str, Any]]] = {}  # guard id -> its module


def guarded_module(guard: GuardedModule) -> types.ModuleType:
    """The module behind a guard (for the server's own code: sending it back to the client by name)."""
    return _GUARDED[id(guard)][0]


@functools.cache  # (one guard per module and policy, kept: modules are few and stay loaded)
def guarded(policy: Policy, module: types.ModuleType) -> GuardedModule:
    guard = GuardedModule()
    _GUARDED[id(guard)] = (module, policy, {})
    return guard


@functools.cache
def program_builtins(policy: Policy) -> dict[str, Any]:
    """The builtins a program runs with: Python's less the denied ones, an `import` whose modules come guarded,
    and a `getattr` that refuses what the source check refuses (however the name was built, wherever the
    function is passed: functools.partial, map, reduce)."""

    def guarded_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        return guarded(policy, builtins.__import__(name, globals, locals, fromlist, level))

    def checked_getattr(obj: Any, name: str, *default: Any) -> Any:
        _check_name(policy, name)
        return getattr(obj, name, *default)

    allowed = {name: obj for name, obj in builtins.__dict__.items()
               if name not in policy.denied_builtins or policy.lifted(name)}  # (the source check refuses them too)
    return {**allowed, "__import__": guarded_import, "getattr": checked_getattr}


def _check_name(policy: Policy, name: Any) -> None:
    """Refuse an attribute name the source check would refuse spelled out: a dunder, or a denied attribute."""
    if not isinstance(name, str):
        return  # (getattr raises its own TypeError)
    for part in name.split("."):
        if policy.refuses_attribute(part):
            raise RefusedAttribute(f"the attribute '{part}' is not allowed on the server; {MOVE_HINT}",
                                   sys._getframe(2).f_lineno)


def _attrgetter(policy: Policy) -> Any:
    def attrgetter(*names: str) -> operator.attrgetter:
        for name in names:
            _check_name(policy, name)
        return operator.attrgetter(*names)

    return attrgetter


def _methodcaller(policy: Policy) -> Any:
    def methodcaller(name: str, /, *args: Any, **kwargs: Any) -> operator.methodcaller:
        _check_name(policy, name)
        return operator.methodcaller(name, *args, **kwargs)

    return methodcaller


def _data_loader(policy: Policy) -> type:
    from torch.utils.data import DataLoader

    class InProcessDataLoader(DataLoader):
        """torch's DataLoader as a program on the server gets it, by whatever name: it loads in the job's own
        thread (worker processes would outlive the job's limits)."""

        def __init__(self, *args: Any, **kwargs: Any):
            if kwargs.get("num_workers") or kwargs.get("multiprocessing_context") is not None or len(args) > 5:
                raise PolicyViolation(f"{LOADER_RULE}; {MOVE_HINT}", sys._getframe(1).f_lineno)
            super().__init__(*args, **kwargs)

    return InProcessDataLoader


# what a guarded module hands out in place of these (made for the guard's policy)
_STAND_INS = {"operator.attrgetter": _attrgetter, "operator.methodcaller": _methodcaller,
              "torch.utils.data.DataLoader": _data_loader, "torch.utils.data.dataloader.DataLoader": _data_loader}
