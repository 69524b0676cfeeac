"""One error hierarchy: every exception class any tether module defines subclasses TetherError, or is one of
the control-flow exceptions runtime/errors.py lists (and documents); warnings, which are not errors, are
named in that docstring too. No model, no network."""

from __future__ import annotations

import importlib
import pathlib

import pytest

from tether.runtime import errors
from tether.runtime.errors import CONTROL_FLOW, TetherError

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = {"tether": "tether", "runtime": "tether.runtime", "client": "tether.client", "server": "tether.server"}


def _modules() -> list[str]:
    names = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            names.append(package if path.stem == "__init__" else f"{package}.{path.stem}")
    return names


def _exception_classes() -> dict[str, type]:
    """module.qualname -> class, for every exception class (warnings included) defined at the top of a
    tether module."""
    found = {}
    for name in _modules():
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == name:
                found[f"{name}.{obj.__qualname__}"] = obj
    return found


CLASSES = _exception_classes()


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_exception_is_a_tether_error_or_listed_control_flow(name):
    if issubclass(CLASSES[name], Warning):
        assert f"`{name}`" in errors.__doc__, f"the warning {name} is not named in runtime/errors.py's docstring"
        return
    assert issubclass(CLASSES[name], TetherError) or name in CONTROL_FLOW, (
        f"{name} is neither a TetherError nor listed in tether.runtime.errors.CONTROL_FLOW")


def test_the_control_flow_list_is_true_and_documented():
    assert set(CONTROL_FLOW) <= set(CLASSES), set(CONTROL_FLOW) - set(CLASSES)
    for name in CONTROL_FLOW:
        assert not issubclass(CLASSES[name], TetherError), name
        assert f"`{name}`" in errors.__doc__, f"{name} is not described in runtime/errors.py's docstring"


def test_no_two_exception_classes_share_a_name():  # twins that mean different things are confusing
    by_name: dict[str, list[str]] = {}
    for name, cls in CLASSES.items():
        by_name.setdefault(cls.__name__.lstrip("_").removesuffix("Error"), []).append(name)  # JobCancelled, JobCancelledError
    assert not {n: where for n, where in by_name.items() if len(where) > 1}


def test_tether_errors_live_in_one_module_per_layer():
    homes = {name.rsplit(".", 1)[0] for name, cls in CLASSES.items() if issubclass(cls, TetherError)}
    assert homes == {"tether.runtime.errors", "tether.server.errors", "tether.safe_pickle"}
