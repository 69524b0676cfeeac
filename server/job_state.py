"""Per-job state that must not outlive the job: gradients, train/eval modes and requires_grad flags of a hosted
model, and the worker thread's autograd mode (a body may call `torch.set_grad_enabled(False)`).

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
        self._grad_enabled = torch.is_grad_enabled()  # of the thread that records it: the worker's

    @classmethod
    def of(cls, module: torch.nn.Module) -> JobState:
        return cls(module)

    def reset(self) -> None:
        """Clear parameter gradients; restore requires_grad flags, train/eval modes and the autograd mode as
        served. Called by the worker thread that recorded it, after each job."""
        if torch.is_grad_enabled() is not self._grad_enabled:
            torch.set_grad_enabled(self._grad_enabled)
        for param, flag in zip(self._params, self._requires_grad):
            if param.grad is not None:
                param.grad = None
            if param.requires_grad is not flag:
                param.requires_grad_(flag)
        for module, training in zip(self._modules, self._training):
            if module.training is not training:
                module.training = training
