"""Converts Python values to and from tether.v1 Value messages: the one module client and server both use.

Imports torch, cloudpickle, tether.v1, tether.safe_pickle and tether.tensor_codec; never grpc, client,
server or the runtime engine. Named values framed for the wire (ValueMaps, chunks) are in tether.wire.
"""

from __future__ import annotations

import functools
import importlib
import io
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

import cloudpickle
import torch
from torch._subclasses.fake_tensor import FakeTensor

from tether.safe_pickle import safe_loads
from tether.tensor_codec import DTYPES, TORCH_DTYPES, decode_tensor, encode_tensor, meta_like, neutral_tensor
from tether.v1 import values_pb2

__all__ = ["Attributes", "from_value", "from_value_map", "import_reference", "to_value", "to_value_map"]

Resolver = Callable[[Any], Any]


class Attributes(types.SimpleNamespace):
    """A plain object as it travels: its attributes only (pickled by this name, which both sides allow)."""


# ----------------------------------------------------------------------------------------------- values

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def to_value(
    obj: Any,
    *,
    allow_pickle: bool = True,
    compress: bool | None = None,
    default: Callable[[Any], values_pb2.Value | None] | None = None,
) -> values_pb2.Value:
    """The Value message for `obj`, in a language-neutral form wherever one exists.

    Neutral: None, bool, int, float, str, bytes, list, tuple, dict (any convertible keys, order kept),
    torch.Tensor, torch.Size, torch.dtype, numpy arrays, modules and importable functions/classes (as a
    Reference). `default(obj)` may return a Value for anything else (e.g. a model as ModelReference);
    otherwise the object is pickled with cloudpickle (its tensors stay neutral) if allow_pickle, or a
    TypeError names it. Subclasses of neutral types (namedtuple, OrderedDict, IntEnum) are pickled to keep
    their type, or sent as their base type when allow_pickle is False. Tensors are detached copies.

    Long on purpose: one chain of exact-type checks, most common first, runs for every item of every value
    sent; a dispatch through helpers would add a call per item to the hot path.
    """
    tp = type(obj)
    if obj is None:
        return values_pb2.Value(null_value=values_pb2.Null())
    if tp is bool:
        return values_pb2.Value(bool_value=obj)
    if tp is int:
        if _INT64_MIN <= obj <= _INT64_MAX:
            return values_pb2.Value(int_value=obj)
        return values_pb2.Value(big_int_value=str(obj))
    if tp is float:
        return values_pb2.Value(double_value=obj)
    if tp is str:
        return values_pb2.Value(string_value=obj)
    if tp is bytes:
        return values_pb2.Value(bytes_value=obj)
    if isinstance(obj, torch.Tensor) and neutral_tensor(obj):
        return values_pb2.Value(tensor=encode_tensor(obj, compress=compress))
    if tp is torch.Size:
        return values_pb2.Value(shape_value=values_pb2.Shape(dims=obj))
    if tp is torch.dtype and obj in DTYPES:
        return values_pb2.Value(data_type_value=DTYPES[obj])

    def convert(item: Any) -> values_pb2.Value:
        return to_value(item, allow_pickle=allow_pickle, compress=compress, default=default)

    if tp is list:
        return values_pb2.Value(list_value=values_pb2.ValueList(items=[convert(x) for x in obj]))
    if tp is tuple:
        return values_pb2.Value(tuple_value=values_pb2.ValueList(items=[convert(x) for x in obj]))
    if tp is dict:
        return values_pb2.Value(map_value=_map(obj, convert))
    ndarray = _numpy_tensor(obj)
    if ndarray is not None:
        return values_pb2.Value(ndarray_value=encode_tensor(ndarray, compress=compress))
    ref = _reference(obj)
    if ref is not None:
        return values_pb2.Value(reference=ref)
    if default is not None and (custom := default(obj)) is not None:
        return custom
    if allow_pickle:
        return values_pb2.Value(pickled=_pickle(obj, compress))
    for base in (bool, int, float, str, bytes):  # subclasses degrade to their base type
        if isinstance(obj, base):
            return convert(base(obj))
    if isinstance(obj, (list, tuple)):
        return convert(tuple(obj) if isinstance(obj, tuple) else list(obj))
    if isinstance(obj, Mapping):
        return values_pb2.Value(map_value=_map(obj, convert))
    raise TypeError(
        f"cannot send a {tp.__module__}.{tp.__qualname__} without pickling it: convert it to tensors, "
        f"numbers, strings, lists or dicts first (pickling is disabled here)"
    )


def _map(obj: Mapping, convert: Callable[[Any], values_pb2.Value]) -> values_pb2.MapValue:
    return values_pb2.MapValue(
        entries=[values_pb2.MapEntry(key=convert(k), value=convert(v)) for k, v in obj.items()]
    )


def _numpy_tensor(obj: Any) -> torch.Tensor | None:
    np = sys.modules.get("numpy")  # only if the caller already uses numpy
    if np is None or type(obj) is not np.ndarray or obj.dtype.byteorder not in "=|<":
        return None
    if not obj.flags.writeable or not obj.flags.c_contiguous:
        # torch.from_numpy warns on read-only arrays and fails on negative strides
        obj = np.array(obj, order="C")
    try:
        t = torch.from_numpy(obj)
    except TypeError:  # object, string, datetime arrays...
        return None
    return t if neutral_tensor(t) else None


def _reference(obj: Any) -> values_pb2.Reference | None:
    """Modules, functions and classes travel by name, never as pickled code.

    The name is a public import path where one exists (torch.nn.functional.gelu, not torch._C._nn.gelu);
    user code (e.g. in __main__) keeps its own name, which a server refuses with an allow-list error.
    """
    if isinstance(obj, types.ModuleType):
        return values_pb2.Reference(module=obj.__name__)
    if not isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        return None
    if isinstance(obj, types.BuiltinFunctionType) and not isinstance(
        obj.__self__, (types.ModuleType, type(None))
    ):
        return None  # a bound method of some object, such as [].append
    try:
        path = _import_path(obj)
    except TypeError:  # unhashable
        path = None
    if path is None and isinstance(obj, (type, types.FunctionType)):
        path = (getattr(obj, "__module__", None) or "", obj.__qualname__)
    return values_pb2.Reference(module=path[0], qualname=path[1]) if path else None


def _is_private(dotted: str) -> bool:
    return any(part.startswith("_") or "<" in part for part in dotted.split("."))


@functools.lru_cache(maxsize=1024)
def _import_path(obj: Any) -> tuple[str, str] | None:
    module = getattr(obj, "__module__", None)
    names = [
        n for n in (getattr(obj, "__qualname__", None), getattr(obj, "__name__", None)) if isinstance(n, str)
    ]
    if not isinstance(module, str) or not names:
        return None
    found = []
    for name in names:
        try:
            if import_reference(values_pb2.Reference(module=module, qualname=name)) is obj:
                found.append((module, name))
        except (ImportError, AttributeError):
            pass
    public = [p for p in found if not _is_private(f"{p[0]}.{p[1]}")]
    if public:
        return public[0]
    # a public module of the same package that re-exports it (no imports, no lazy-module side effects)
    root, name = module.split(".")[0], names[-1]
    owners = [
        mod_name
        for mod_name, mod in list(sys.modules.items())
        if (mod_name == root or mod_name.startswith(root + "."))
        and not _is_private(mod_name)
        and getattr(mod, "__dict__", {}).get(name) is obj
    ]
    if owners and not _is_private(name):
        return (min(owners, key=lambda m: (m.count("."), len(m))), name)
    return found[0] if found else None


class _TensorPickler(cloudpickle.Pickler):
    """cloudpickle that leaves tensors out of the pickle: each becomes a persistent id into `tensors`."""

    def __init__(self, file: io.BytesIO, compress: bool | None):
        super().__init__(file, protocol=5)
        self.tensors: list[values_pb2.Tensor] = []
        self._ids: dict[int, tuple[int, torch.Tensor]] = {}  # id(tensor) -> (index, tensor kept alive)
        self._compress = compress

    def persistent_id(self, obj: Any) -> int | None:
        if not isinstance(obj, torch.Tensor) or not neutral_tensor(obj):
            return None
        if id(obj) not in self._ids:
            self._ids[id(obj)] = (len(self.tensors), obj)
            self.tensors.append(encode_tensor(obj, compress=self._compress))
        return self._ids[id(obj)][0]

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, FakeTensor):  # a scan's: shapes and dtypes travel, its data pointer is never read
            return meta_like(obj).__reduce_ex__(self.proto)
        return super().reducer_override(obj)


def _pickle(obj: Any, compress: bool | None) -> values_pb2.Pickled:
    buf = io.BytesIO()
    pickler = _TensorPickler(buf, compress)
    pickler.dump(obj)
    tp = type(obj)
    return values_pb2.Pickled(
        data=buf.getvalue(), tensors=pickler.tensors, type_name=f"{tp.__module__}.{tp.__qualname__}"
    )


def import_reference(ref: values_pb2.Reference) -> Any:
    """Imports a Reference's module and walks its qualname. Trusts the sender: a server passes its own."""
    obj: Any = importlib.import_module(ref.module)
    for part in filter(None, ref.qualname.split(".")):
        obj = getattr(obj, part)
    return obj


def from_value(
    msg: values_pb2.Value,
    *,
    unpickler: Callable[..., Any] = safe_loads,
    resolve_reference: Resolver | None = None,
    resolve_model: Resolver | None = None,
    tensor: Callable[[values_pb2.Tensor], torch.Tensor] = decode_tensor,
) -> Any:
    """The Python object for a Value message (inverse of to_value).

    unpickler(data, persistent_load=...) loads Pickled values; the default refuses globals outside
    tether.safe_pickle's default allow-list. resolve_reference(Reference) and resolve_model(ModelReference)
    turn references into objects; without one such a value raises ValueError (a client passes
    import_reference, a server its policy's checked resolver). tensor(Tensor) builds each tensor (a server's
    front door builds only small ones).

    Long on purpose, as to_value: one branch per kind of the Value oneof, read in one place against the
    proto, on the path of every item received.
    """
    kind = msg.WhichOneof("kind")

    def convert(item: values_pb2.Value) -> Any:
        return from_value(
            item, unpickler=unpickler, resolve_reference=resolve_reference, resolve_model=resolve_model,
            tensor=tensor,
        )

    if kind == "tensor":
        return tensor(msg.tensor)
    if kind in ("int_value", "double_value", "string_value", "bool_value", "bytes_value"):
        return getattr(msg, kind)
    if kind == "null_value":
        return None
    if kind == "list_value":
        return [convert(x) for x in msg.list_value.items]
    if kind == "tuple_value":
        return tuple(convert(x) for x in msg.tuple_value.items)
    if kind == "map_value":
        return {convert(e.key): convert(e.value) for e in msg.map_value.entries}
    if kind == "shape_value":
        return torch.Size(msg.shape_value.dims)
    if kind == "data_type_value":
        if msg.data_type_value not in TORCH_DTYPES:
            raise ValueError(
                f"unknown data_type_value {msg.data_type_value}; the sender is newer than tether"
            )
        return TORCH_DTYPES[msg.data_type_value]
    if kind == "big_int_value":
        return int(msg.big_int_value)
    if kind == "ndarray_value":
        array = tensor(msg.ndarray_value)
        return array if array.is_meta else array.numpy()
    if kind == "reference":
        ref = msg.reference
        if resolve_reference is None:
            raise ValueError(
                f"received a reference to {ref.module}{'.' if ref.qualname else ''}{ref.qualname} but no "
                f"resolver was given: pass resolve_reference=tether.values.import_reference to trust the sender"
            )
        return resolve_reference(ref)
    if kind == "model_reference":
        if resolve_model is None:
            raise ValueError(
                f"received a reference to model {msg.model_reference.name!r} but no model resolver"
            )
        return resolve_model(msg.model_reference)
    if kind == "pickled":
        tensors, decoded = msg.pickled.tensors, {}

        def persistent_load(pid: Any) -> torch.Tensor:  # one tensor per id, however often it is referenced
            if type(pid) is not int or not 0 <= pid < len(tensors):
                raise ValueError(f"pickled value refers to tensor {pid!r}, but only {len(tensors)} were sent")
            if pid not in decoded:
                decoded[pid] = tensor(tensors[pid])
            return decoded[pid]

        return unpickler(msg.pickled.data, persistent_load=persistent_load)
    raise ValueError("empty Value message (no kind set); the sender is broken or newer than tether")


def to_value_map(values: Mapping[str, Any], **options: Any) -> values_pb2.ValueMap:
    """A ValueMap of named values; options as for to_value."""
    return values_pb2.ValueMap(values={name: to_value(v, **options) for name, v in values.items()})


def from_value_map(
    msg: values_pb2.ValueMap | Mapping[str, values_pb2.Value], **options: Any
) -> dict[str, Any]:
    """A dict from a ValueMap (or a proto map<string, Value> field); options as for from_value."""
    entries = msg.values if isinstance(msg, values_pb2.ValueMap) else msg
    return {name: from_value(v, **options) for name, v in entries.items()}
