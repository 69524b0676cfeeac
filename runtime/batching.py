"""Batch rows: give each invoke a view of its own rows of a module value, and splice edits back in.

Values are tensors or nests of them (tuples, lists, dicts, Hugging Face ModelOutputs). A tensor whose
first dimension is the batch size is an activation and is split by rows; anything else is shared.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Slot", "narrow", "splice", "concat_inputs", "record_views", "left_padded_positions", "to_device",
           "map_tensors"]


def map_tensors(value: Any, fn, other=None) -> Any:
    """`value` with each tensor replaced by `fn(tensor)` through tuples, lists, dicts and ModelOutputs; any
    other object is kept, or replaced by `other(obj)` when given."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tensors(v, fn, other) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn, other) for v in value)
    if isinstance(value, dict):
        mapped = {k: map_tensors(v, fn, other) for k, v in value.items()}
        try:
            return type(value)(**mapped)
        except TypeError:
            return type(value)(mapped)
    return value if other is None else other(value)





def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it on `device` (inputs follow the model to its GPU); others as they are."""
    return map_tensors(value, lambda t: t if t.device == device else t.to(device))


def narrow(value: Any, rows: slice | None, batch_size: int) -> Any:
    """`value` restricted to `rows` of the batch (views, so in-place edits reach the model)."""
    if rows is None:
        return value
    return map_tensors(value, lambda t: t[rows] if t.dim() > 0 and t.shape[0] == batch_size else t)


def splice(full: Any, rows: slice | None, new: Any, batch_size: int) -> Any:
    """`full` with `rows` replaced by `new` (the whole value when `rows` is None)."""
    if rows is None:
        return new
    if isinstance(full, torch.Tensor):
        if full.dim() == 0 or full.shape[0] != batch_size:
            return new
        new = torch.as_tensor(new, dtype=full.dtype, device=full.device)
        return torch.cat([full[: rows.start], new.expand_as(full[rows]), full[rows.stop :]], dim=0)
    if isinstance(full, (tuple, list)) and isinstance(new, (tuple, list)) and len(full) == len(new):
        items = [splice(f, rows, n, batch_size) for f, n in zip(full, new)]
        return type(full)(*items) if hasattr(full, "_fields") else type(full)(items)
    if isinstance(full, dict) and isinstance(new, dict):
        merged = {k: splice(v, rows, new[k], batch_size) if k in new else v for k, v in full.items()}
        try:
            return type(full)(**merged)
        except TypeError:
            return type(full)(merged)
    return new


def record_views(view: Any, full: Any, rows: slice, out: dict) -> None:
    """Note which full tensor each row view came from (a gradient must be hooked on the full one)."""
    if isinstance(view, torch.Tensor) and isinstance(full, torch.Tensor):
        if view is not full:
            out[id(view)] = (view, full, rows)
    elif isinstance(view, (tuple, list)) and isinstance(full, (tuple, list)):
        for v, f in zip(view, full):
            record_views(v, f, rows, out)


class Slot:
    """The value a hook is handing out: a module output, or its (args, kwargs) before it runs."""

    __slots__ = ("value", "batch_size", "changed")

    def __init__(self, value: Any, batch_size: int):
        self.value = value
        self.batch_size = batch_size
        self.changed = False

    def get(self, kind: str, rows: slice | None) -> Any:
        if kind == "output":
            return narrow(self.value, rows, self.batch_size)
        args, kwargs = self.value
        if kind == "inputs":
            return narrow((args, kwargs), rows, self.batch_size)
        first = args[0] if args else next(iter(kwargs.values()), None)
        return narrow(first, rows, self.batch_size)

    def set(self, kind: str, rows: slice | None, new: Any) -> None:
        self.changed = True
        if kind == "output":
            self.value = splice(self.value, rows, new, self.batch_size)
            return
        args, kwargs = self.value
        if kind == "inputs":
            new_args, new_kwargs = new
            self.value = (tuple(splice(tuple(args), rows, tuple(new_args), self.batch_size)),
                          splice(kwargs, rows, new_kwargs, self.batch_size))
            return
        if args:
            self.value = ((splice(args[0], rows, new, self.batch_size), *args[1:]), kwargs)
        else:
            key = next(iter(kwargs))
            self.value = (args, {**kwargs, key: splice(kwargs[key], rows, new, self.batch_size)})


def concat_inputs(per_invoke: list[tuple[tuple, dict]]) -> tuple[tuple, dict, list[slice]]:
    """Batch several invokes' positional tensors along dim 0; returns args, kwargs and each one's rows."""
    rows, start = [], 0
    for args, _ in per_invoke:
        first = args[0] if args else None
        n = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() > 0 else 1
        rows.append(slice(start, start + n))
        start += n
    if len(per_invoke) == 1:
        args, kwargs = per_invoke[0]
        return args, kwargs, rows
    n_args = len(per_invoke[0][0])
    args = tuple(
        torch.cat([inv[0][i] for inv in per_invoke], dim=0)
        if isinstance(per_invoke[0][0][i], torch.Tensor)
        else per_invoke[0][0][i]
        for i in range(n_args)
    )
    return args, dict(per_invoke[0][1]), rows


def left_padded_positions(lengths: list[int], width: int) -> torch.Tensor:
    """`position_ids` of a left-padded batch, as Hugging Face `generate` derives them from the attention mask:
    each row counts from its first real token (its padding gets 0), so a short prompt in a batch sees exactly
    the positions of its solo run. (batch, width)"""
    return torch.tensor([[0] * (width - n) + list(range(n)) for n in lengths], dtype=torch.long)
