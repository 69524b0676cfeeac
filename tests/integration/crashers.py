"""A test-only model whose forward crashes the worker process on request (never hosted outside the tests).

Each row's x[i, 0] picks: 1 aborts (SIGABRT, as a C extension's assert would), 2 reads address 0 (SIGSEGV);
anything else runs a Linear layer. So one job's row crashes a batched run it shares with others.
"""

from __future__ import annotations

import ctypes
import os

import torch

ABORT, SEGFAULT = 1.0, 2.0


class Crasher(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hows = set(x[:, 0].tolist())
        if ABORT in hows:
            os.abort()
        if SEGFAULT in hows:
            ctypes.string_at(0)
        return self.layer(x)


def crasher() -> Crasher:
    """The `module:factory` of the model (seeded: it loads the same weights every time)."""
    torch.manual_seed(0)
    return Crasher()
