"""The interpreter tricks (runtime/cpython.py) and block capture, under every Python minor tether supports.

Torch-free: `make test` also runs this folder with each claimed minor's plain interpreter.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import os
import pathlib
import subprocess
import sys
import traceback

import pytest
from replay import Replay

from tether.runtime import capture, cpython
from tether.runtime.errors import SourceUnavailableError


def test_a_block_runs_once_by_tether_and_its_names_come_back():
    runs = []
    with Replay() as r:
        runs.append(1)
        total = sum(runs) + 41
    assert (r.runs, runs, total) == (1, [1], 42)


def test_which_with_item_is_entered_first_last_and_middle():
    """`with a, r as t:` on 3.10 once raised AttributeError (its instructions carry no columns)."""
    with contextlib.nullcontext(5) as a, Replay() as r:
        got = a + 1
    assert (r.block.item, r.runs, got) == (1, 1, 6)
    with Replay() as r2, contextlib.nullcontext(7):  # the body is skipped before later items are entered
        got2 = 8
    assert (r2.block.item, r2.runs, got2) == (0, 1, 8)
    with contextlib.nullcontext(), Replay() as r3, contextlib.nullcontext():
        got3 = 3
    assert (r3.block.item, r3.runs, got3) == (1, 1, 3)


def test_a_parenthesized_multi_line_with_header():
    with (
        contextlib.nullcontext(2) as a,
        Replay() as r,
    ):
        got = a * 2
    assert (r.block.item, got) == (1, 4)


def test_tuple_target_is_bound():
    with contextlib.nullcontext(), Replay(pair=9) as (r, nine):
        got = nine + 1
    assert (got, r.runs) == (10, 1)


def test_column_and_count_rules_agree_where_both_exist():
    """3.11+ tells the entered item by instruction columns; 3.10 by counting `__enter__` instructions."""
    seen = []

    class Probe:
        def __enter__(self):
            frame = sys._getframe(1)
            node = capture.find_block(frame).node
            seen.append((cpython._item_by_count(frame, node),
                         cpython._item_by_position(frame, node) if cpython._POSITIONS else None))
            return self

        def __exit__(self, *exc):
            return False

    with contextlib.nullcontext(), Probe():
        pass
    with Probe(), contextlib.nullcontext():
        pass
    expect = [(1, 1), (0, 0)] if cpython._POSITIONS else [(1, None), (0, None)]
    assert seen == expect


def test_written_back_into_function_locals_and_closures():
    x = 1
    read_x = lambda: x  # noqa: E731 (a closure: x is a cell variable)
    with Replay():
        x = 2
    assert (x, read_x()) == (2, 2)


MODULE = '''
from replay import Replay
with Replay() as r:
    y = 40 + 2
'''


def test_written_back_into_module_globals():
    capture.register_source("<tether-module-test>", MODULE)
    ns: dict = {"__name__": "user_module"}
    exec(compile(MODULE, "<tether-module-test>", "exec"), ns)
    assert (ns["y"], ns["r"].runs) == (42, 1)


def test_the_block_sees_what_the_caller_was_handling_and_nothing_after():
    try:
        raise KeyError("outer")
    except KeyError as error:
        outer = error
        with Replay():
            inside = sys.exc_info()[1]
        assert sys.exc_info()[1] is outer
    assert inside is outer
    with Replay():
        nothing = sys.exc_info()
    assert nothing == (None, None, None)
    assert sys.exc_info() == (None, None, None)


def test_a_bare_raise_in_the_block_reraises_the_handled_exception():
    with pytest.raises(ValueError, match="handled"):
        try:
            raise ValueError("handled")
        except ValueError:
            with Replay():
                raise


def test_an_exception_in_the_block_reaches_the_caller_with_its_line():
    with pytest.raises(ZeroDivisionError) as info:
        with Replay():
            1 / 0  # noqa: B018
    lines = [f.line for f in traceback.extract_tb(info.value.__traceback__)]
    assert "1 / 0  # noqa: B018" in lines


def test_the_trace_function_is_restored():
    before = sys.gettrace()
    with Replay():
        pass
    assert sys.gettrace() is before
    assert sys._getframe().f_trace is None


def test_shared_ctypes_prototypes_are_left_alone():
    """Private prototypes: the process-wide `ctypes.pythonapi` function objects keep their own argtypes."""
    for name in ("PyErr_SetExcInfo", "Py_IncRef", "PyFrame_LocalsToFast"):
        assert getattr(ctypes.pythonapi, name).argtypes is None, name


def test_tether_frames_are_told_by_module_name():
    with pytest.raises(SourceUnavailableError) as info:
        capture.find_in_text("<no with here>", "x = 1\n", 1)
    frames = [f for f, _ in traceback.walk_tb(info.value.__traceback__)]
    assert not cpython.is_tether_frame(frames[0])  # this test
    assert cpython.is_tether_frame(frames[-1])  # capture.py
    assert [cpython.is_tether_frame(f) for f in (sys._getframe(),)] == [False]


def test_ast_of_captured_block_is_the_with_statement():
    with Replay() as r:
        pass
    assert isinstance(r.block.node, ast.With)


FIRST_SKIP = '''
import torchless
torchless.bind_packages()
from replay import Replay

def run():
    ran = []
    with Replay() as r:
        ran.append(1)
    return r.runs, ran

print(run())
'''


def test_the_first_skip_in_a_process_skips(tmp_path):
    """3.12 enabled opcode events only once some frame had asked for them before `sys.settrace`: the first
    block of a process ran in the caller."""
    script = tmp_path / "first_skip.py"
    script.write_text(FIRST_SKIP)
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parent)}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "(1, [1])", out.stderr


def test_an_installed_trace_function_is_kept_and_the_body_still_skipped():
    calls = []

    def tracer(frame, event, arg):
        calls.append(event)
        return None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        with Replay() as r:
            ran = 1
    finally:
        sys.settrace(previous)
    assert (r.runs, ran) == (1, 1)
