"""The transformers-5 trap: `layer.output[0]` on a decoder layer that now returns a tensor, not a tuple.

`warn_if_batch_index(value, path, frame)` warns once per process when a body indexes `[0]` right after
reading a module's tensor output whose batch size is 1. It reads the caller's bytecode (the instructions
after the `.output` read) with `dis`: version-gated, read-only, once per code object.
"""

from __future__ import annotations

import dis
import sys
import types
import warnings
from typing import Any

import torch

__all__ = ["BatchIndexWarning", "warn_if_batch_index"]

_warned = False  # one warning per process: the point is to catch the first one


class BatchIndexWarning(UserWarning):
    """`.output[0]` took the batch row of a tensor output (transformers 5 decoder layers return tensors)."""


def warn_if_batch_index(value: Any, path: str, frame: types.FrameType) -> None:
    """Warn (once) when `frame` is about to index `[0]` into `value`, a tensor output of batch size 1.

    Every `.output` read runs this: the common case is one dict lookup by the code object's id (checked
    for identity) and an empty set, before the value is looked at."""
    if _warned:
        return
    code = frame.f_code
    known = _zero_indexing.get(id(code))
    if known is None or known[0] is not code:
        known = _remember(code)
    if (known[1] and frame.f_lasti in known[1] and isinstance(value, torch.Tensor) and value.dim() >= 2
            and value.shape[0] == 1):
        _warn(value, path, frame)


def _warn(value: torch.Tensor, path: str, frame: types.FrameType) -> None:
    global _warned
    _warned = True
    warnings.warn_explicit(
        f"`{path}.output[0]` takes row 0 of the batch: this module returns a tensor of shape "
        f"{tuple(value.shape)} (transformers 5 decoder layers return the hidden states, not a tuple), so `[0]` "
        f"drops the batch dimension. For the hidden states write `{path}.output` (e.g. `.output[:, -1]` "
        f"for the last position); if you meant the first row, write `.output[0, ...]`. (Shown once.)",
        BatchIndexWarning, frame.f_code.co_filename, frame.f_lineno,
    )


_zero_indexing: dict[int, tuple[types.CodeType, frozenset[int]]] = {}  # id(code) -> (code, _offsets_before_zero)


def _remember(code: types.CodeType) -> tuple[types.CodeType, frozenset[int]]:
    if len(_zero_indexing) >= 1024:
        _zero_indexing.clear()
    known = _zero_indexing[id(code)] = (code, _offsets_before_zero(code))
    return known


def _offsets_before_zero(code: types.CodeType) -> frozenset[int]:
    """The offsets of the instructions followed by `[0]` and nothing else (where an `.output` read there
    would be indexed by 0 next)."""
    if sys.version_info < (3, 10) or sys.version_info >= (3, 15):  # bytecode checked on 3.10 to 3.14
        return frozenset()
    instructions = list(dis.get_instructions(code))
    return frozenset(before.offset for before, const, subscript in zip(instructions, instructions[1:],
                                                                        instructions[2:])
                     if _is_zero(const) and _is_subscript(subscript))


def _is_zero(instruction: dis.Instruction) -> bool:
    return (instruction.opname in ("LOAD_CONST", "LOAD_SMALL_INT") and instruction.argval == 0
            and type(instruction.argval) is int)


def _is_subscript(instruction: dis.Instruction) -> bool:
    return instruction.opname == "BINARY_SUBSCR" or (instruction.opname == "BINARY_OP" and "[" in instruction.argrepr)
