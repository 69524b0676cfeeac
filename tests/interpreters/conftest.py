"""These tests import only tether's torch-free modules; `make test` also runs them under every Python minor
tether supports, with interpreters that have no torch (there, see torchless.py). With torch, nothing changes.
"""

from __future__ import annotations

import importlib.util

import torchless

if importlib.util.find_spec("torch") is None:
    torchless.bind_packages()
