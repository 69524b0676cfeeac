"""A program on the server sees modules through guards (Policy.guarded): whatever name or container it reached a
module by, each attribute it reads is checked like the dotted path it spells."""

from __future__ import annotations

import pytest
import torch

import tether
from tether.server.errors import PolicyViolation
from tether.server.guards import GuardedModule, guarded_module
from tether.server.policy import DEFAULT_POLICY
from tether.server.source_check import check_program_source


def _run(source: str) -> dict:
    """`source` run as the server runs a program: its builtins, and `torch` and `tether` bound as references are."""
    ns = {"__builtins__": DEFAULT_POLICY.program_builtins(), "torch": DEFAULT_POLICY.guarded(torch),
          "tether": DEFAULT_POLICY.guarded(tether)}
    exec(compile(source, "user.py", "exec"), ns)
    return ns


def test_a_guarded_module_hands_out_what_the_policy_allows():
    guard = DEFAULT_POLICY.guarded(torch)
    assert isinstance(guard, GuardedModule) and guarded_module(guard) is torch
    assert guard.nn.functional.gelu is torch.nn.functional.gelu and guard.float32 is torch.float32
    assert isinstance(guard.nn, GuardedModule) and guarded_module(guard.nn) is torch.nn
    assert repr(guard) == "<module 'torch'>"


@pytest.mark.parametrize("source, named", [
    ("x = torch\npid = x.os.getpid()", "'torch.os'"),
    ("pid = [torch][0].os.getpid()", "'torch.os'"),
    ("def reach(m):\n    return m.load\nf = reach(torch)", "'torch.load'"),
    ("t = tether\nf = t.loading.load_named", "'tether.loading'"),
    ("import torch as t2\nm = {'k': t2}['k']._C", "'torch._C'"),
    ("from torch import nn\nh = nn.modules.module.torch.hub", "'torch.hub'"),
])
def test_a_module_reached_through_a_name_the_source_check_cannot_follow_is_still_checked(source, named):
    with pytest.raises(PolicyViolation, match=named):
        _run(source)


def test_a_guarded_module_cannot_be_changed_for_every_job():
    gelu = torch.nn.functional.gelu
    with pytest.raises(PolicyViolation, match="every job"):
        _run("x = torch.nn.functional\nx.gelu = print")
    assert torch.nn.functional.gelu is gelu


def test_imports_give_guarded_modules_and_denied_builtins_are_gone():
    ns = _run("import torch.nn.functional as F\nfrom torch import nn\nimport math\nroot = math.sqrt(4.0)\n"
              "y = F.relu(torch.tensor([-1.0, 2.0]))")
    assert isinstance(ns["F"], GuardedModule) and guarded_module(ns["F"]) is torch.nn.functional
    assert isinstance(ns["nn"], GuardedModule) and ns["root"] == 2.0 and ns["y"].tolist() == [0.0, 2.0]
    builtins = DEFAULT_POLICY.program_builtins()
    assert "open" not in builtins and "exec" not in builtins and "len" in builtins


_BOUND = {"torch": "torch", "tether": "tether"}
_D = '"_" * 2'  # a dunder's underscores, built at run time (no literal names it)


@pytest.mark.parametrize("source", [
    f"g = getattr\nd = {_D}\nsubs = g(g(g((), d + 'class' + d), d + 'base' + d), d + 'subclasses' + d)()",
    f"d = {_D}\nga = getattr(*(type(torch), d + 'getattr' + d))",
    f"import functools\nd = {_D}\np = functools.partial(getattr, torch.nn.functional.relu)\ngl = p(d + 'globals' + d)",
    f"d = {_D}\ngl = list(map(getattr, [torch.nn.functional.relu], [d + 'globals' + d]))[0]",
    f"import operator\nag = operator.attrgetter\nd = {_D}\ngl = ag(d + 'globals' + d)(torch.nn.functional.relu)",
    f"from operator import methodcaller\nd = {_D}\nr = methodcaller(d + 'reduce_ex' + d, 2)(torch.ones(1))",
    "L = torch.nn.Linear\ndef fwd(self, x):\n    return x\nL.forward = fwd",
    "torch.ops.import_module('http.server')",
    "m = torch.jit.script(torch.nn.Linear(2, 2))",
    "from torch.utils.data import DataLoader, TensorDataset\nDL = DataLoader\n"
    "dl = DL(TensorDataset(torch.arange(4.0)), num_workers=2)",
    "lin = torch.nn.Linear(2, 2)\nlin._forward_hooks[0] = print",
    "f = '{0.__globals__[torch].os}'.format\nleak = f(torch.nn.functional.relu)",
    "f = str.format\nleak = f('{0.' + '_' * 2 + 'class' + '_' * 2 + '}', torch)",
])
def test_names_built_at_run_time_and_functions_passed_around_are_refused(source):
    """Each of these passed the source check and reached what the policy refuses, in a trial of the server."""
    linear_forward = torch.nn.Linear.forward
    with pytest.raises(PolicyViolation):
        check_program_source(source, filename="u.py", first_line=1, bound_names=_BOUND)
        _run(source)
    assert torch.nn.Linear.forward is linear_forward


def test_the_checked_getattr_and_data_loader_still_do_their_job():
    ns = _run("from torch.utils.data import DataLoader, TensorDataset\nimport operator\n"
              "rows = [b for b in DataLoader(TensorDataset(torch.arange(4.0)), batch_size=2)]\n"
              "name = getattr(torch.nn.Linear(2, 3), 'out_features')\nmissing = getattr(torch, 'nope', 7)\n"
              "pick = operator.attrgetter('shape')(torch.ones(2, 5))")
    assert len(ns["rows"]) == 2 and ns["name"] == 3 and ns["missing"] == 7 and ns["pick"] == (2, 5)
