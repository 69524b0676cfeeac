"""tether's benchmarks: `python -m bench.run` (or `make bench`) runs every module here and writes bench/results/.

A benchmark is a module in this package with `run(options: bench.Options) -> dict`, returning a result in
the shape `run.py` renders (see `bench/run.py`). Nothing here is a test: pytest never collects it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Options"]


@dataclass
class Options:
    """What `bench.run` passes to each benchmark."""

    budget_scale: float = 1.0  # multiplies each benchmark's timing budget; 0.1 for a smoke run
    profile: bool = False  # profile even when the targets are met
    skip_nnsight: bool = False  # do not compare against nnsight even if it is installed
    parts: tuple[str, ...] = ()  # run only these parts of a benchmark (its docstring names them); () = all
