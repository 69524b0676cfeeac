"""Notices a job that changed a hosted model's weights in place, so it fails instead of silently
changing every later job's results. Reads only PyTorch's per-tensor version counters (no copies)."""

from __future__ import annotations

import grpc
import torch

from .errors import ServerError

__all__ = ["WeightWatch", "WeightsChanged"]


class WeightsChanged(ServerError):
    """A job wrote into the hosted model's parameters."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class WeightWatch:
    """The version counters of one model replica's parameters, compared around each job."""

    def __init__(self, module: torch.nn.Module):
        self._params = list(module.named_parameters())

    def snapshot(self) -> list[int]:
        return [p._version for _, p in self._params]

    def check(self, before: list[int]) -> None:
        """Raise `WeightsChanged` naming the parameters whose counters moved since `before`."""
        changed = [name for (name, p), version in zip(self._params, before) if p._version != version]
        if changed:
            shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            raise WeightsChanged(
                f"The job changed the hosted model's weights in place ({shown}). Jobs may change activations "
                "(`.output`, `.input`), not parameters: copy a weight first (`w = module.weight.clone()`). "
                "The server operator should restart `tether serve` to restore the weights."
            )
