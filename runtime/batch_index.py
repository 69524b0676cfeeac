"""The transformers-5 trap: `layer.output[0]` on a decoder layer that now returns a tensor, not a tuple.

`warn_if_batch_index(value, path, frame)` warns once per process when a body indexes `[0]` right after
reading a module's tensor output whose batch size is 1. It reads the caller's bytecode (the instructions
after the `.output` read) with `dis`: version-gated, read-only, cached per code position.
"""

from __future__ import annotations

import dis
import sys
import types
import warnings
from functools import lru_cache
from typing import Any

import torch

__all__ = ["BatchIndexWarning", "warn_if_batch_index"]

_warned = False  # one warning per process: the point is to catch the first one


class BatchIndexWarning(UserWarning):
    """`.output[0]` took the batch row of a tensor output (transformers 5 decoder layers return tensors)."""


def warn_if_batch_index(value: Any, path: str, frame: types.FrameType) -> None:
    """Warn (once) when `frame` is about to index `[0]` into `value`, a tensor output of batch size 1."""
    if _warned or not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[0] != 1:
        return
    if not _indexes_zero_next(frame.f_code, frame.f_lasti):
        return
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


@lru_cache(maxsize=1024)
def _indexes_zero_next(code: types.CodeType, lasti: int) -> bool:
    """Whether the instructions after the one at `lasti` (reading `.output`) are `[0]` and nothing else."""
    if sys.version_info < (3, 10) or sys.version_info >= (3, 15):  # bytecode checked on 3.10 to 3.14
        return False
    instructions = [i for i in dis.get_instructions(code) if i.offset > lasti][:2]
    if len(instructions) < 2:
        return False
    const, subscript = instructions
    zero = const.opname in ("LOAD_CONST", "LOAD_SMALL_INT") and const.argval == 0 and type(const.argval) is int
    indexes = subscript.opname == "BINARY_SUBSCR" or (subscript.opname == "BINARY_OP" and "[" in subscript.argrepr)
    return zero and indexes
