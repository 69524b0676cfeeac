"""A test-only model whose layer notes each of its runs in a file: from outside the worker process, the one
way for a test to see how far a job got while its client runs a `local()` block."""

from __future__ import annotations

from pathlib import Path

import torch


class NotedLinear(torch.nn.Linear):
    def __init__(self, notes: Path):
        super().__init__(4, 4)
        self.notes = str(notes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with open(self.notes, "a") as notes:
            notes.write("ran\n")
        return super().forward(x)


class RunsTwice(torch.nn.Module):
    """Runs its one layer twice per forward pass, noting each run."""

    def __init__(self, notes: Path):
        super().__init__()
        torch.manual_seed(0)
        self.layer = NotedLinear(notes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.layer(x))


def runs(notes: Path) -> int:
    """How many times the layer ran since the file was emptied."""
    return notes.read_text().count("\n") if notes.exists() else 0
