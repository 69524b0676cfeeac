"""`tracer.cache()`: record many modules' values in one run, read back by path or by navigation.

A `CacheView` is plain data (values by module path, and the model's aliases), so it is saved, handed back
and sent from a server like any other value. Imports torch and the engine; never client or server.
"""

from __future__ import annotations

from typing import Any

import torch

from . import batching, rename
from .errors import TetherError
from .interleaver import current_interleaver
from .mediator import Mediator

__all__ = ["CacheView", "start_cache"]

_OUTPUT, _INPUTS = 0, 1  # an entry is [output, inputs]: one visit of a module


class CacheView:
    """The cached values at one node of the module tree (the root above the model at first).

    `cache["model.transformer.h.0"].output` or `cache.model.transformer.h[0].output`: a module visited once
    gives its value; one visited at every generation step gives a list, one value per visit.
    """

    def __init__(self, entries: dict[str, list[list]], aliases: dict[str, str] | None = None,
                 path: str | None = None):
        object.__setattr__(self, "_entries", entries)
        object.__setattr__(self, "_aliases", aliases or {})  # alias path -> the native path it names
        object.__setattr__(self, "_path", path)

    def __reduce__(self):  # plain data only: the restricted unpickler allows this class and builtins
        return CacheView, (self._entries, self._aliases, self._path)

    # ---- values --------------------------------------------------------------------------------
    def _visits(self) -> list[list]:
        if self._path is None:
            raise TetherError("The cache's root is not a module: select one, e.g. `cache.model.output` or "
                              "`cache['model.transformer.h.0'].output`.")
        visits = self._entries.get(self._path)
        if not visits:
            raise TetherError(f"`{self._path}` was not cached. Cached modules: {', '.join(self.keys()) or 'none'}.")
        return visits

    def _values(self, index: int) -> Any:
        values = [visit[index] for visit in self._visits()]
        return values[0] if len(values) == 1 else values

    @property
    def output(self) -> Any:
        return self._values(_OUTPUT)

    @property
    def inputs(self) -> Any:
        """`(args, kwargs)` of each visit (cached with `include_inputs=True`)."""
        return self._values(_INPUTS)

    @property
    def input(self) -> Any:
        """The first argument of each visit (the first keyword argument if none)."""
        firsts = []
        for visit in self._visits():
            inputs = visit[_INPUTS]
            values = [] if inputs is None else [*inputs[0], *inputs[1].values()]
            firsts.append(values[0] if values else None)
        return firsts[0] if len(firsts) == 1 else firsts

    def __len__(self) -> int:
        return len(self._visits())

    def keys(self) -> list[str]:
        """The cached module paths at or below this node (all of them at the root)."""
        prefix = self._path
        return [k for k, visits in self._entries.items()
                if visits and (prefix is None or k == prefix or k.startswith(prefix + "."))]

    # ---- navigation ----------------------------------------------------------------------------
    def _resolve(self, path: str) -> str:
        """`path` with aliases replaced by the native names, component by component."""
        out = ""
        for part in path.split("."):
            out = f"{out}.{part}" if out else part
            out = self._aliases.get(out, out)
        return out

    def _at(self, path: str) -> CacheView:
        path = self._resolve(path)
        if path not in self._entries and not any(k.startswith(path + ".") for k in self._entries):
            raise AttributeError(f"`{path}` is not a cached module (nor above one). "
                                 f"Cached modules: {', '.join(self.keys()) or 'none'}.")
        return CacheView(self._entries, self._aliases, path)

    def __getattr__(self, name: str) -> CacheView:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._path is None:
            root = next(iter(self._entries), "model").split(".")[0]
            return self._at(name if name == root else f"{root}.{name}")  # `cache.transformer` = `cache.model.transformer`
        return self._at(f"{self._path}.{name}")

    def __getitem__(self, key: str | int) -> CacheView:
        if isinstance(key, int):
            if self._path is None:
                raise TypeError("Index a module list of the cache, e.g. `cache.model.transformer.h[0]`.")
            if key < 0:
                indices = {int(k[len(self._path) + 1:].split(".")[0]) for k in self.keys() if k != self._path
                           and k[len(self._path) + 1:].split(".")[0].isdigit()}
                key += max(indices, default=-1) + 1
            return self._at(f"{self._path}.{key}")
        if self._path is None:
            return self._at(key)
        return self._at(f"{self._path}.{key}")

    def __contains__(self, key: str) -> bool:
        return bool(self._entries.get(self._resolve(key)))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("A cache is read-only.")

    def __repr__(self) -> str:
        where = "root" if self._path is None else repr(self._path)
        return f"CacheView({where}, cached={self.keys()})"


class _Recorder:
    """Appends one module's values to the cache entries as the model's pass reaches it (so the entries are in
    the order the modules finished, as nnsight keeps them)."""

    __slots__ = ("entries", "path", "kind", "paired", "transform", "rows", "batch_size")

    def __init__(self, entries: dict, path: str, kind: int, paired: bool, transform, rows: slice | None,
                 batch_size: int):
        self.entries, self.path, self.kind, self.paired, self.transform = entries, path, kind, paired, transform
        self.rows, self.batch_size = rows, batch_size

    def __call__(self, value: Any) -> None:
        value = self.transform(batching.narrow(value, self.rows, self.batch_size))
        visits = self.entries.setdefault(self.path, [])
        if self.kind == _INPUTS:
            visits.append([None, value])
        elif self.paired and visits and visits[-1][_OUTPUT] is None:
            visits[-1][_OUTPUT] = value  # the visit whose inputs were recorded when it began
        else:
            visits.append([value, None])


def _transformer(device: Any, dtype: Any, detach: bool, non_blocking: bool):
    def move(t: torch.Tensor) -> torch.Tensor:
        if detach:
            t = t.detach()
        if device is not None or dtype is not None:
            t = t.to(device=device, dtype=dtype, non_blocking=non_blocking)
        return t

    def transform(value: Any) -> Any:
        return batching.map_tensors(value, move)

    return transform


def start_cache(root: Any, mediator: Mediator, modules: list | None, *, device: Any, dtype: Any, detach: bool,
                include_output: bool, include_inputs: bool, non_blocking: bool = False) -> CacheView:
    """Hook the selected modules (Envoys or paths; None for all) for this run; returns the view they fill."""
    interleaver = current_interleaver()
    if interleaver is None:
        raise TetherError("`tracer.cache()` only works inside the body of a trace or generate block.")
    if mediator.seen or mediator.pending is not None:
        raise TetherError("Call `tracer.cache()` before reading or changing any module value in the body.")
    if modules is None:
        envoys = root.modules()
    else:
        envoys = [rename.envoy_at(root, m) if isinstance(m, str) else m for m in modules]
    entries: dict[str, list[list]] = {}
    transform = _transformer(device, dtype, detach, non_blocking)
    rows, batch_size = mediator.rows, interleaver.batch_size
    for envoy in envoys:
        if include_inputs:
            interleaver.observe(envoy._module, "pre",
                                _Recorder(entries, envoy._path, _INPUTS, False, transform, rows, batch_size))
        if include_output:
            interleaver.observe(envoy._module, "fwd", _Recorder(entries, envoy._path, _OUTPUT, include_inputs,
                                                                transform, rows, batch_size))
    return CacheView(entries, rename.alias_paths(root))
