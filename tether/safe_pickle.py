"""Restricted unpickling: load a pickle only if every global it names is on a caller-owned allow-list.

Imports the standard library, torch and tether.runtime.errors; numpy or transformers only when an allowed name lives there.
"""

from __future__ import annotations

import importlib
import io
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tether.runtime.errors import TetherError

__all__ = ["DEFAULT_ALLOW_LIST", "PickleAllowList", "Unbuilt", "UnsafePickleError", "check_loads",
           "safe_loads"]


class UnsafePickleError(TetherError, pickle.UnpicklingError):
    """A pickle named a global outside the allow-list; nothing it asked for was called."""

    def __init__(self, name: str):
        super().__init__(
            f"refused to unpickle {name!r}: it is not on the pickle allow-list, and loading an arbitrary "
            f"global can run arbitrary code. Send plain data instead (tensors, numbers, strings, lists, "
            f"dicts travel without pickle), or, if {name} is safe to load, add it to the allow-list "
            f"(PickleAllowList.with_names; on a server, ask its operator)."
        )
        self.name = name


@dataclass(frozen=True)
class PickleAllowList:
    """What a restricted unpickler may load. Owned by the caller (a server keeps its own).

    names: exact globals, "module.qualname" (e.g. "collections.OrderedDict").
    subclasses: (module prefix, base class) pairs: a class defined in a module under the prefix is
        allowed when it subclasses the base, e.g. ("transformers", "transformers.utils.generic.ModelOutput").
        Only modules under the prefix are ever imported to check.
    """

    names: frozenset[str] = frozenset()
    subclasses: frozenset[tuple[str, str]] = frozenset()

    def with_names(self, *names: str) -> PickleAllowList:
        """A copy that also allows these exact globals."""
        return PickleAllowList(self.names | frozenset(names), self.subclasses)

    def allows(self, module: str, name: str) -> bool:
        """True if the global `module.name` may be loaded. May import modules under a subclass prefix."""
        if f"{module}.{name}" in self.names:
            return True
        if not name.isidentifier() or name.startswith("__"):
            return False  # nested or dunder names are allowed only by exact entry
        for prefix, base in self.subclasses:
            if module == prefix or module.startswith(prefix + "."):
                obj = _resolve(module, name, missing_ok=True)
                base_cls = _resolve(*base.rsplit(".", 1), missing_ok=True)
                if isinstance(obj, type) and isinstance(base_cls, type) and issubclass(obj, base_cls):
                    return True
        return False


def _resolve(module: str, qualname: str, *, missing_ok: bool = False) -> Any:
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        if missing_ok:
            return None
        raise
    return obj


def _load_storage_weights_only(data: bytes) -> Any:
    # torch pickles a storage as torch.save bytes loaded by torch.storage._load_from_bytes, which calls
    # torch.load(weights_only=False) -- an unrestricted unpickler. Load them with torch's restricted one.
    import torch

    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


# Allowed globals that are loaded as a safe stand-in instead of themselves.
_SUBSTITUTES: dict[str, Callable[..., Any]] = {"torch.storage._load_from_bytes": _load_storage_weights_only}

_TORCH_DTYPES = (
    "float32 float float64 double float16 half bfloat16 complex32 chalf complex64 cfloat complex128 cdouble "
    "bool uint8 uint16 uint32 uint64 int8 int16 short int32 int int64 long "
    "float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz float8_e8m0fnu float4_e2m1fn_x2"
).split()

DEFAULT_ALLOW_LIST = PickleAllowList(
    names=frozenset(
        [
            f"builtins.{n}"
            for n in "set frozenset slice complex range bytearray list dict tuple object Ellipsis".split()
        ]
        + [f"collections.{n}" for n in ("OrderedDict", "defaultdict", "deque", "Counter")]
        + ["copyreg._reconstructor", "tether.values.Attributes"]  # a plain object's attributes travel as one
        + [f"torch.{n}" for n in _TORCH_DTYPES]
        + ["torch.Size", "torch.device", "torch.dtype", "torch.Tensor", "torch.strided"]
        + [
            f"torch._utils.{n}"
            for n in (
                "_rebuild_tensor",
                "_rebuild_tensor_v2",
                "_rebuild_parameter",
                "_rebuild_parameter_with_state",
                "_rebuild_meta_tensor_no_storage",
            )
        ]
        + ["torch._tensor._rebuild_from_type_v2", "torch.nn.parameter.Parameter"]
        + ["torch.storage._load_from_bytes", "torch.storage.UntypedStorage", "torch.storage.TypedStorage"]
        + [
            f"{core}.multiarray.{n}"
            for core in ("numpy.core", "numpy._core")
            for n in ("_reconstruct", "scalar")
        ]
        + ["numpy.ndarray", "numpy.dtype"]
        + ["transformers.tokenization_utils_base.BatchEncoding"]
        + ["tether.runtime.cache.CacheView"]  # plain data: its own reduce builds it from dicts and lists
    ),
    subclasses=frozenset(
        [
            ("transformers", "transformers.utils.generic.ModelOutput"),
            ("transformers", "transformers.cache_utils.Cache"),
            ("transformers", "transformers.cache_utils.CacheLayerMixin"),
            ("torch.return_types", "builtins.tuple"),  # torch.max(...) and friends return these
        ]
    ),
)


class Unbuilt:
    """What `check_loads` builds in place of an allowed global whose object it does not build: every call,
    state and item is accepted and dropped, so no allowed callable runs on the checking side."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Unbuilt:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Unbuilt:
        return Unbuilt()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def add(self, item: Any) -> None:
        pass


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, allow: PickleAllowList):
        super().__init__(file)
        self._allow = allow

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if not self._allow.allows(module, name):
            raise UnsafePickleError(full)
        if full in _SUBSTITUTES:
            return _SUBSTITUTES[full]
        return _resolve(module, name)


class _CheckingUnpickler(_RestrictedUnpickler):
    """Refuses what _RestrictedUnpickler refuses; every allowed global stands in as Unbuilt, never called."""

    def find_class(self, module: str, name: str) -> Any:
        super().find_class(module, name)
        return Unbuilt


def check_loads(
    data: bytes,
    *,
    allow: PickleAllowList | Iterable[str] = DEFAULT_ALLOW_LIST,
    persistent_load: Callable[[Any], Any] | None = None,
) -> Any:
    """Check `data` as safe_loads would (UnsafePickleError for a global outside `allow`) without calling any
    global it names: each stands in as `Unbuilt`, so what is built (containers, strings, numbers) costs no
    more than the pickle's own opcodes. For a process that must refuse a bad pickle but must not pay for a
    good one (a server's front door: `bytearray(3 << 30)` is an allowed call and a 48-byte pickle, and even a
    plain constructor like `list(range(n))` or `tuple` applied to a memoized list again and again amplifies).
    What an allowed global would refuse when called (a malformed tensor, say) is refused where it is loaded."""
    return _load(_CheckingUnpickler, data, allow, persistent_load)


def safe_loads(
    data: bytes,
    *,
    allow: PickleAllowList | Iterable[str] = DEFAULT_ALLOW_LIST,
    persistent_load: Callable[[Any], Any] | None = None,
) -> Any:
    """Unpickle `data`, refusing (with UnsafePickleError) any global not on `allow`.

    `allow` is a PickleAllowList or an iterable of exact "module.qualname" names. `persistent_load` resolves
    persistent ids (tether.values stores the tensors of a pickled object that way); without it a pickle
    holding persistent ids is refused.
    """
    return _load(_RestrictedUnpickler, data, allow, persistent_load)


def _load(kind: type[_RestrictedUnpickler], data: bytes, allow: PickleAllowList | Iterable[str],
          persistent_load: Callable[[Any], Any] | None) -> Any:
    if not isinstance(allow, PickleAllowList):
        allow = PickleAllowList(names=frozenset(allow))
    unpickler = kind(io.BytesIO(data), allow)
    if persistent_load is not None:
        unpickler.persistent_load = persistent_load
    return unpickler.load()
