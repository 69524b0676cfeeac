"""One job's window of a cross-job batch: left-padded token rows with their positions, and views and edits
restricted to the job's rows (and, for a shorter prompt, its last columns). Imports torch only."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .batching import map_tensors
from .errors import SharedValueError

__all__ = ["Window", "pad_rows", "lend", "write_back", "splice", "SharedValueError", "Withheld"]

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, slice,
          type(Ellipsis))


class Withheld:
    """Stands, in a batched job, for an object the whole batch shares (e.g. a key/value cache): it holds every
    job's rows, so using it raises. The job's own tensors and containers of them are never withheld."""

    __slots__ = ("_kind",)

    def __init__(self, kind: str):
        object.__setattr__(self, "_kind", kind)

    def _error(self) -> SharedValueError:
        return SharedValueError(
            f"this {self._kind} is shared by every job of a batched run (it holds their rows too), so a batched job "
            "cannot use it. Use your rows' tensors instead, or run the job alone (e.g. on a server started with "
            "--max-batch 1)."
        )

    def __getattr__(self, name: str) -> Any:
        raise self._error()

    def __getitem__(self, key: Any) -> Any:
        raise self._error()

    def __iter__(self):
        raise self._error()

    def __len__(self) -> int:
        raise self._error()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._error()

    def __repr__(self) -> str:
        return f"<{self._kind} shared by the batch>"


@dataclass(frozen=True)
class Window:
    """Where a job's values lie in a batch value: `rows` of dim 0, and from column `first_col` of dim 1
    on tensors whose dim 1 is `width` (the padded prompt positions); `width` 0: no column window."""

    rows: slice
    first_col: int = 0
    width: int = 0
    last_col: int | None = None  # exclusive end of the columns (a generation's output: prompt + own steps)

    def cols(self, t: torch.Tensor) -> slice | None:
        if t.dim() < 2 or (self.first_col == 0 and self.last_col is None):
            return None
        if self.width and t.shape[1] != self.width:
            return None
        return slice(self.first_col, self.last_col)


def pad_rows(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """Token rows padded on the left: (input_ids, attention_mask, position_ids), each (batch, width).

    Positions count real tokens only (0 at each row's first real token), so a padded row gets the positions
    it would have alone; the padding's own positions are 0 and masked out.
    """
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _withheld(value: Any) -> Any:
    """A non-tensor object the batch shares (a key/value cache...) is withheld from a job; plain values pass."""
    if isinstance(value, _PLAIN) or isinstance(value, Withheld):
        return value
    return Withheld(type(value).__name__)


def _map(value: Any, fn) -> Any:
    """`value` with each tensor replaced by `fn(tensor)`, and each other object the batch shares withheld."""
    return map_tensors(value, fn, _withheld)


def lend(value: Any, window: Window, batch_size: int, lent: list,
         owned: weakref.WeakValueDictionary | None = None) -> Any:
    """The job's window of `value` as tensors of its own (no view reaches another job's rows or storage).

    Each copy of a batched tensor is noted in `lent` as (copy, its version, the view it came from): an
    in-place edit of the copy is written back into the job's window by `write_back`. Copies of values the
    batch shares are the job's alone: its in-place edits of them do not reach the model. Every copy is also
    noted in `owned` (id -> copy): what the job saves from its copies needs no copy of its own at its end.
    """

    def copy(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] != batch_size:
            own = t.clone()
        else:
            view = t[window.rows]
            cols = window.cols(view)
            if cols is not None:
                view = view[:, cols]
            own = view.clone()
            lent.append((own, own._version, view))
        if owned is not None:
            owned[id(own)] = own
        return own

    return _map(value, copy)


def write_back(lent: list) -> None:
    """Put the in-place edits of lent copies into the batch's tensors (their jobs' windows only)."""
    for own, version, view in lent:
        if own._version != version:
            view.copy_(own)
    lent.clear()


def splice(full: Any, window: Window, new: Any, batch_size: int) -> Any:
    """`full` with the job's window replaced by `new`; a value the batch shares cannot be replaced."""
    if isinstance(new, Withheld):  # handed back as the job got it
        return full
    if isinstance(full, torch.Tensor):
        if full.dim() == 0 or full.shape[0] != batch_size:
            raise SharedValueError(
                f"this value (shape {tuple(full.shape)}) is shared by every job of the batch, not split by rows, "
                "so one job cannot replace it. Edit your rows of a batched activation instead."
            )
        cols = window.cols(full)
        target = full[window.rows] if cols is None else full[window.rows][:, cols]
        try:
            new = torch.as_tensor(new, dtype=full.dtype, device=full.device).expand_as(target)
        except (TypeError, ValueError, RuntimeError):
            raise SharedValueError(
                f"a {type(new).__name__} of shape {tuple(getattr(new, 'shape', ()))} cannot replace this job's part "
                f"of shape {tuple(target.shape)}: in a batched run a job keeps its values' shapes. Assign a tensor "
                "of the same shape."
            ) from None
        out = full.clone()
        if cols is None:
            out[window.rows] = new
        else:
            out[window.rows, cols] = new
        return out
    if isinstance(full, (tuple, list)) and isinstance(new, (tuple, list)) and len(full) == len(new):
        items = [f if n is f else splice(f, window, n, batch_size) for f, n in zip(full, new)]
        return type(full)(*items) if hasattr(full, "_fields") else type(full)(items)
    if isinstance(full, dict) and isinstance(new, dict):
        merged = {k: splice(v, window, new[k], batch_size) if k in new and new[k] is not v else v
                  for k, v in full.items()}
        try:
            return type(full)(**merged)
        except TypeError:
            return type(full)(merged)
    if new is full:
        return full
    raise SharedValueError(
        f"a {type(full).__name__} shared by every job of the batch cannot be replaced by one job; edit the "
        "tensors of your own rows instead."
    )
