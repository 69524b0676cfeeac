"""What a finished job sends back: the Executor's names -> a serialized JobResult within the size limit.

Saved values go in `saved`; stand-ins (unsaved activations, names never reached) go by name only, so the
client recreates them. tether's own objects (tracers, invokers) have no meaning off the server and are left out.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any

from tether.runtime.saving import NotReached, UnsavedValue
from tether.v1 import jobs_pb2, values_pb2

from .errors import ResultTooLarge

__all__ = ["encode_result"]

_CODE_TYPES = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, type, types.ModuleType)


def encode_result(values: Mapping[str, Any], encode: Callable[[Any], values_pb2.Value], limit: int) -> bytes:
    """The serialized JobResult of `values` (what `execute` returned); ResultTooLarge above `limit` bytes."""
    result = jobs_pb2.JobResult()
    for name, value in values.items():
        if isinstance(value, UnsavedValue):
            result.unsaved.append(name)
        elif isinstance(value, NotReached):
            result.unreached.append(name)
            result.unreached_reason = object.__getattribute__(value, "_why") or result.unreached_reason
        elif _sendable(value):
            encoded = encode(value)
            if encoded.WhichOneof("kind") == "pickled" and isinstance(value, _CODE_TYPES):
                continue  # a function or class defined by the program: the client has no use for its pickle
            result.saved[name].CopyFrom(encoded)
    size = result.ByteSize()
    if size > limit:
        biggest = sorted(result.saved, key=lambda n: result.saved[n].ByteSize(), reverse=True)[:3]
        raise ResultTooLarge(
            f"the job's result is {size} bytes, more than the limit of {limit} bytes (the largest saved values: "
            f"{', '.join(biggest) or 'none'}). Save less (e.g. slice or reduce tensors before .save()), or ask "
            "for a larger max_result_bytes (the server's --max-result-bytes caps it)."
        )
    return result.SerializeToString()


def _sendable(value: Any) -> bool:
    """False for tether's runtime objects (tracers, invokers, sessions, local blocks), which stay here."""
    module = type(value).__module__
    if module.startswith("tether.runtime.") and not module.endswith((".envoy", ".model", ".language_model")):
        return module == "tether.runtime.saving"  # SavedTensor
    return True
