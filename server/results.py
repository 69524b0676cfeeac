"""What a finished job sends back: the Executor's names -> a serialized JobResult within the size limit.

Saved values go in `saved`; stand-ins (unsaved activations, names never reached) go by name only, so the
client recreates them. tether's own objects (tracers, invokers) have no meaning off the server and are left out.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any

import torch

from tether.framing import value_map_entry
from tether.runtime.saving import NotReached, UnsavedValue
from tether.safe_pickle import safe_loads
from tether.tensor_codec import neutral_tensor
from tether.v1 import jobs_pb2, values_pb2
from tether.values import import_reference
from tether.wire import container_pieces, encode_value_map

from .errors import ResultTooLarge
from .guards import GuardedModule, guarded_module

__all__ = ["encode_result", "encode_result_pieces"]

_CODE_TYPES = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, type, types.ModuleType)


def encode_result(values: Mapping[str, Any], encode: Callable[[Any], values_pb2.Value], limit: int,
                  log: Callable[..., None] = print) -> bytes:
    """The serialized JobResult of `values` as one bytes object (see encode_result_pieces)."""
    return b"".join(encode_result_pieces(values, encode, limit, log))


def encode_result_pieces(values: Mapping[str, Any], encode: Callable[[Any], values_pb2.Value], limit: int,
                         log: Callable[..., None] = print) -> list[bytes | memoryview]:
    """The serialized JobResult of `values` (what `execute` returned) as pieces that concatenate into it
    (result_bytes.ResultBytes cuts chunks from them); ResultTooLarge above `limit` bytes.

    A value a client could not load (a pickle naming globals outside tether's default allow-list, such as a
    torch.Generator, or a function the program defined) is left out, with a line in the job's log.
    Tensors take tether.values' wire fast path: their pieces are views of the tensors' memory (no copy;
    each chunk sent copies its part once), except for tensors that a later job could change in place (a
    model's parameters, and views of them), which are copied once here so the kept result cannot change,
    and small views of large storages (see _shared).
    """
    pieces: list[bytes | memoryview] = []
    sizes: dict[str, int] = {}
    stand_ins = jobs_pb2.JobResult()
    for name, value in values.items():
        if isinstance(value, UnsavedValue):
            stand_ins.unsaved.append(name)
        elif isinstance(value, NotReached):
            stand_ins.unreached.append(name)
            stand_ins.unreached_reason = object.__getattribute__(value, "_why") or stand_ins.unreached_reason
        else:
            entry = _entry(name, value, encode, log)
            if entry:
                pieces += entry
                sizes[name] = sum(len(p) for p in entry)
    pieces.append(stand_ins.SerializeToString())  # serialized messages concatenate into one
    size = sum(len(p) for p in pieces)
    if size > limit:
        biggest = sorted(sizes, key=sizes.get, reverse=True)[:3]
        raise ResultTooLarge(
            f"the job's result is {size} bytes, more than the limit of {limit} bytes (the largest saved values: "
            f"{', '.join(biggest) or 'none'}). Save less (e.g. slice or reduce tensors before .save()), or ask "
            "for a larger max_result_bytes (the server's --max-result-bytes caps it)."
        )
    return pieces


def _entry(name: str, value: Any, encode: Callable[[Any], values_pb2.Value],
           log: Callable[..., None]) -> list[bytes | memoryview]:
    """The pieces of the JobResult.saved entry `name` -> `value`; none (with a line in the log where the user
    would wonder) for a value no client could load."""
    if isinstance(value, GuardedModule):  # a module the program reached (Policy.guarded): it goes by its name
        value = guarded_module(value)
    if isinstance(value, torch.Tensor) and neutral_tensor(value):  # (a scan's fakes go as meta: the encoder's)
        entry = encode_value_map({name: value})
        return [bytes(p) if isinstance(p, memoryview) else p for p in entry] if _shared(value) else entry
    try:
        framed = container_pieces(value, copy=_shared)  # tensors in lists, tuples, dicts
    except Exception:  # (e.g. a device copy failed): the general path below says what it leaves out
        framed = None
    if framed is not None:
        return value_map_entry(name, framed)
    if not _sendable(value):
        return []
    if not isinstance(value, _CODE_TYPES) and not _importable_class(type(value)):
        log(f"tether: `{name}` ({type(value).__qualname__}) stays on the server: its class was defined by "
            "the program, so no client can load it; save its tensors or numbers instead to get them back")
        return []
    try:
        encoded = encode(value)
    except Exception as error:  # e.g. an optimizer or loader holding locks: it has no wire form
        log(f"tether: `{name}` ({type(value).__qualname__}) stays on the server: it cannot be sent "
            f"({error}); convert it to tensors, numbers, strings, lists or dicts to get it back")
        return []
    if encoded.WhichOneof("kind") == "reference" and not _importable(encoded.reference, value):
        return []  # a function or class the program defined: the client cannot import it
    unloadable = _unloadable(encoded, value)
    if unloadable:
        log(f"tether: `{name}` ({unloadable}) stays on the server: it has no form a "
            "client can load; convert it to tensors, numbers, strings, lists or dicts to get it back")
        return []
    return [values_pb2.ValueMap(values={name: encoded}).SerializeToString()]  # = one JobResult.saved entry


def _importable_class(tp: type) -> bool:
    try:
        return import_reference(values_pb2.Reference(module=tp.__module__, qualname=tp.__qualname__)) is tp
    except Exception:
        return False


def _importable(reference: values_pb2.Reference, value: Any) -> bool:
    try:
        return import_reference(reference) is value
    except Exception:
        return False


def _unloadable(encoded: values_pb2.Value, value: Any) -> str:
    """The type name of a pickled part of `encoded` (itself, or inside its lists, tuples and dicts) that a
    client could not load; "" when it all loads."""
    kind = encoded.WhichOneof("kind")
    if kind == "pickled":
        return "" if _loadable(encoded.pickled, value) else encoded.pickled.type_name
    if kind in ("list_value", "tuple_value"):
        return next((bad for item in getattr(encoded, kind).items if (bad := _unloadable(item, None))), "")
    if kind == "map_value":
        return next((bad for e in encoded.map_value.entries
                     if (bad := _unloadable(e.key, None) or _unloadable(e.value, None))), "")
    return ""


def _loadable(pickled: values_pb2.Pickled, value: Any) -> bool:
    """Whether a client with tether's default pickle allow-list can load it (tried with the same unpickler)."""
    if isinstance(value, _CODE_TYPES):
        return False
    try:
        safe_loads(pickled.data, persistent_load=lambda pid: torch.empty(0))
    except Exception:
        return False
    return True


def _sendable(value: Any) -> bool:
    """False for tether's runtime objects (tracers, invokers, sessions, local blocks) and client-only
    stand-ins, which stay here."""
    module = type(value).__module__
    if module == "tether.server.program_codec":
        return False
    if module.startswith("tether.runtime.") and not module.endswith((".envoy", ".model", ".language_model")):
        return module in ("tether.runtime.saving", "tether.runtime.cache")  # SavedTensor, CacheView
    return True


def _shared(t: torch.Tensor) -> bool:
    """Whether the result should not keep a view of the tensor's memory: it belongs to something that
    outlives the job (a parameter, a view of one, a leaf that requires grad), or the tensor is a small part
    of a larger storage (keeping the view would keep all of it alive for the result's retention time)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        return False  # the encoder sends a fresh copy (on the host, contiguous) anyway
    if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter) or (t.is_leaf and t.requires_grad):
        return True
    size = t.numel() * t.element_size()
    return t.untyped_storage().nbytes() > 2 * size + (64 << 10)
