"""Which hooks a model's bodies asked for the last time they ran, so the next run registers them at once, and
the parent map that says which ancestors' hooks a requested hook needs. Imports torch only.
"""

from __future__ import annotations

import torch

__all__ = ["HookPlan", "parents_of"]


class HookPlan:
    """Which hooks the same bodies asked for the last time they ran on this model.

    The next run registers them before the forward pass, in one tight loop, instead of one at a time
    between layers (where each registration costs several times more). A planned hook whose module no
    body asks for this time does nothing, exactly as if it were absent, and is dropped from the plan.
    `closures` remembers, per requested hook, the hooks it needs with it (its ancestors', see Interleaver._closure).
    """

    __slots__ = ("hooks", "closures", "single_pass")

    def __init__(self) -> None:
        self.hooks: list[tuple[torch.nn.Module, str]] = []  # (module, "fwd" | "pre"), in request order
        self.closures: dict[tuple[int, str], tuple] = {}  # hook key -> ((key, module, group), ...)
        self.single_pass = True  # whether the closures are for one forward pass (the root is not hooked)


def parents_of(root: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """id(module) -> its parent, for every module under `root`."""
    return {id(child): module for module in root.modules() for child in module._modules.values()
            if child is not None}
