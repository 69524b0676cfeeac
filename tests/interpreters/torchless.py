"""Binds `tether` and `tether.runtime` to their source folders without running their `__init__` (which
imports torch), so the torch-free modules import under interpreters that have no torch.
"""

from __future__ import annotations

import pathlib
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parents[2]


def bind_packages() -> None:
    for name, folder in (("tether", "tether"), ("tether.runtime", "runtime")):
        package = types.ModuleType(name)
        package.__path__ = [str(ROOT / folder)]
        sys.modules[name] = package
