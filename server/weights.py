"""Notices a job that changed a hosted model's weights in place and puts them back before the next job,
so one job cannot silently change every later job's results. Reads only PyTorch's per-tensor version
counters (no copies); restoring loads the model again from its source and copies the changed tensors."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .errors import WeightsChanged
from .placement import module_in

__all__ = ["WeightWatch"]

_log = logging.getLogger("tether.server")


class WeightWatch:
    """The version counters of one model replica's parameters, compared around each job.

    `reload`, when the server knows the model's source, returns a fresh copy of the model (a torch module,
    a `(model, tokenizer)` pair or an NNsight) whose parameters replace changed ones. Without it, or if it
    fails, the watch is `broken`: the replica must not run more jobs.
    """

    def __init__(self, module: torch.nn.Module, reload: Callable[[], Any] | None = None):
        self._params = list(module.named_parameters())
        self._reload = reload
        self.broken = ""  # why this replica's weights could not be put back ("" while they are right)

    def snapshot(self) -> list[int]:
        return [p._version for _, p in self._params]

    def check(self, before: list[int]) -> None:
        """Raise `WeightsChanged` naming the parameters whose counters moved since `before`, after putting
        them back (or, when that is impossible, marking the watch broken)."""
        changed = [(name, p) for (name, p), version in zip(self._params, before) if p._version != version]
        if not changed:
            return
        names = [name for name, _ in changed]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        what = (f"The job changed the hosted model's weights in place ({shown}). Jobs may change activations "
                "(`.output`, `.input`), not parameters: copy a weight first (`w = module.weight.clone()`).")
        try:
            self._restore(changed)
        except Exception as error:  # a source that no longer loads: stop serving rather than serve wrong weights
            self.broken = f"a job changed its weights ({shown}) and they could not be restored: {error}"
            _log.error("%s", self.broken)
            raise WeightsChanged(f"{what} They could not be put back ({error}), so the server stops running "
                                 "this model: its operator must restart `tether serve`.") from None
        _log.warning("a job changed the weights %s; restored from the model's source", shown)
        raise WeightsChanged(f"{what} The server has put them back; later jobs see the original weights.")

    def _restore(self, changed: list[tuple[str, torch.nn.Parameter]]) -> None:
        if self._reload is None:
            raise RuntimeError("the server was given this model as an object, without a way to load it again")
        fresh = dict(_module_of(self._reload()).named_parameters())
        with torch.no_grad():
            for name, param in changed:
                source = fresh.get(name)
                if source is None or source.shape != param.shape:
                    raise RuntimeError(f"a fresh load of the model has no parameter {name} of shape "
                                       f"{tuple(param.shape)}")
                param.copy_(source)


def _module_of(obj: Any) -> torch.nn.Module:
    """The torch module of what a model source returns: a module, a `(model, tokenizer)` pair or an NNsight."""
    module = module_in(obj)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"the model's source returned {type(obj).__name__}, not a torch module")
    return module
