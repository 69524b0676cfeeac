"""Numeric set-up that keeps results equal across processes: torch's vector math prepared before any model runs.

Owns `warm_vector_math`, called where a model is wrapped (NNsight) and where a server's worker starts, so a
trace gives the same numbers locally and remotely. Imports torch only; never client/ or server/.
"""

from __future__ import annotations

import torch

__all__ = ["warm_vector_math"]

# torch's unary ops that run on MKL's vector math (VML) on the CPU
_VECTOR_MATH = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin",
                "sqrt", "tan", "tanh", "trunc")
_warmed = False  # this process (or the one it was forked from, whose MKL state it shares) set them up


def warm_vector_math() -> None:
    """Call each of torch's MKL vector-math ops once, on one thread, before any model runs (once per process).

    A fresh process's first call of such an op on a tensor of more than 2048 elements runs as parallel
    chunks, and MKL's lazy set-up is not safe against two threads making their first call at once: now and
    then (more often under load) one chunk comes back computed by a less exact kernel (tanh off by ~5e-5
    relative), so a GPT-2 GELU in a fresh process's first forward could differ from the same code run in
    another process. Small tensors run on the calling thread only, so this set-up happens once, alone."""
    global _warmed
    if _warmed:
        return
    for dtype in (torch.float32, torch.float64):
        x = torch.full((16,), 0.5, dtype=dtype)
        for name in _VECTOR_MATH:
            getattr(torch, name)(x)
    _warmed = True
