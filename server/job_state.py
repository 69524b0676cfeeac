"""Per-job state on a hosted model that must not outlive the job: gradients, train/eval modes, requires_grad.

`JobState.of(module)` records the model as served; `reset()` puts it back after each job, so no job sees
what an earlier one left (a second user reading the first user's `.grad`). Imports torch only.
"""

from __future__ import annotations

import torch

__all__ = ["JobState"]


class JobState:
    """What a job may change on a hosted module without writing its weights, as it was when served."""

    def __init__(self, module: torch.nn.Module):
        self._params = list(module.parameters())
        self._requires_grad = [p.requires_grad for p in self._params]
        self._modules = list(module.modules())
        self._training = [m.training for m in self._modules]

    @classmethod
    def of(cls, module: torch.nn.Module) -> JobState:
        return cls(module)

    def reset(self) -> None:
        """Clear parameter gradients; restore requires_grad flags and train/eval modes as served."""
        for param, flag in zip(self._params, self._requires_grad):
            if param.grad is not None:
                param.grad = None
            if param.requires_grad is not flag:
                param.requires_grad_(flag)
        for module, training in zip(self._modules, self._training):
            if module.training is not training:
                module.training = training
