"""server.policy and server.source_check: the source check refuses each listed construct at the user's line; allowed code passes."""

from __future__ import annotations

import dataclasses
import os
import pickle
import textwrap

import pytest
import torch

from tether import values
from tether.safe_pickle import UnsafePickleError
from tether.server.errors import PolicyViolation
from tether.server.policy import DEFAULT_POLICY, Policy
from tether.server.source_check import (
    check_function_source,
    check_program,
    check_program_source,
    check_source,
)
from tether.v1 import program_pb2, values_pb2

WALKTHROUGH_BODIES = [
    "output = tiny_model.output.save()",
    "l1_output = tiny_model.layer1.output.save()\nl2_input = tiny_model.layer2.input.save()",
    'tracer.log("Layer 1 - out: ", tiny_model.layer1.output)',
    "l1_output = tiny_model.layer1.output\nl1_amax = torch.argmax(l1_output, dim=1).save()",
    "value = (tiny_model.layer1.output.sum() + tiny_model.layer2.output.sum()).save()",
    "l1_output_before = tiny_model.layer1.output.clone().save()\ntiny_model.layer1.output[:, 2] = 0\n"
    "l1_output_after = tiny_model.layer1.output.save()",
    "layer1_output_grad = tiny_model.layer1.output.grad.save()\ntiny_model.output.sum().backward()",
    "rand_int = torch.randint(low=-10, high=10, size=(1,))\nwith tracer.cond(rand_int % 2 == 0):\n"
    '    tracer.log("Random Integer ", rand_int, " is Even")',
    'if rand_int % 2 == 0:\n    tracer.log("even")\nelse:\n    print(f"odd {rand_int.item()}")',
    "with tracer.invoke('The Eiffel Tower is in the city of'):\n    llm.transformer.h[-1].mlp.output[0][:] = 0\n"
    "    token_ids_intervention = llm.lm_head.output.argmax(dim=-1).save()",
    "hs11 = llm.transformer.h[11].output[0][:, -1, :].save()",
    "hidden_states = tether.list().save()\nfor i in range(n_new_tokens):\n"
    "    hidden_states.append(llm.transformer.h[-1].output.save())\n    llm.transformer.h[-1].next()",
    "with tracer.all():\n    llm.transformer.h[0].output[0][:] = 0",
    "import torch.nn.functional as F\nimport math, operator, itertools, functools, collections, einops\n"
    "x = F.softmax(llm.lm_head.output / math.sqrt(2), dim=-1)\ncounts = collections.Counter()\n"
    "probs = functools.reduce(operator.add, [x, x])\npairs = list(itertools.pairwise(range(3)))\n"
    "out = {k: v for k, v in zip('ab', (x.max(), x.min()))}\nfirst = getattr(llm, 'lm_head')",
    "import numpy as np\narr = np.asarray([1, 2]).mean()",
    "def helper(h):\n    return h * 2\nsq = lambda t: t ** 2\nh = helper(sq(model.layer1.output)).save()",
    '"{0} and {name}".format(1, name="x")',
]


def check(source: str, **options):
    options.setdefault("filename", "demo.py")
    options.setdefault("first_line", 1)
    check_program_source(source, **options)


def refused(source: str, **options) -> PolicyViolation:
    with pytest.raises(PolicyViolation) as info:
        check(source, **options)
    return info.value


@pytest.mark.parametrize("source", WALKTHROUGH_BODIES)
def test_walkthrough_bodies_pass(source):
    check(source)


@pytest.mark.parametrize(
    "source, named",
    [
        ("import os", "'os'"),
        ("import subprocess as sp", "'subprocess'"),
        ("from os import path", "'os.path'"),
        ("import sys, math", "'sys'"),
        ("from . import sibling", "relative imports"),
        ("from torch import *", "import *"),
        ("import builtins", "'builtins'"),
    ],
)
def test_imports_outside_the_allow_list_are_refused(source, named):
    error = refused(source)
    assert named in str(error) and "tether.local()" in str(error)


@pytest.mark.parametrize(
    "name",
    [
        "exec",
        "eval",
        "compile",
        "open",
        "globals",
        "locals",
        "vars",
        "setattr",
        "delattr",
        "breakpoint",
        "input",
    ],
)
def test_dangerous_builtins_are_refused_called_or_not(name):
    assert f"'{name}'" in str(refused(f"{name}('x')"))
    assert f"'{name}'" in str(refused(f"f = {name}"))  # passing it around is the same as calling it


def test_dunder_import_is_refused():
    assert "__import__" in str(refused("__import__('os').system('ls')"))


@pytest.mark.parametrize(
    "source, named",
    [
        ("x.__class__", "__class__"),
        ("model.layer1.__dict__['weight']", "__dict__"),
        ("t = ().__class__.__base__.__subclasses__()", "__subclasses__"),
        ("__builtins__", "__builtins__"),
        ("getattr(x, '__class__')", "__class__"),
        ("getattr(x, '__' + 'class__')", "computed attribute name"),
        ("getattr(x, name)", "computed attribute name"),
        ("import operator\nf = operator.attrgetter('__globals__')", "__globals__"),
        ("import operator\nf = operator.methodcaller('__reduce__')", "__reduce__"),
        ("from operator import attrgetter\nattrgetter('a.__class__')(x)", "__class__"),
        ("d['__builtins__']", "__builtins__"),
        ("'{0.__class__}'.format(x)", "format field"),
        ("'{0.__init__.__globals__}'.format_map(m)", "format field"),
        ("template.format(x)", "f-string"),
        ("g = (i for i in [])\nf = g.gi_frame.f_back", "f_back"),
        ("class A:\n    def __del__(self):\n        pass", "__del__"),
        ("class A:\n    def __getattribute__(self, n):\n        pass", "__getattribute__"),
        ("def __init__(self):\n    pass", "__init__"),  # only a class's own methods
        ("class A:\n    def f(self):\n        self.__init__()", "__init__"),
        ("class A:\n    def f(self):\n        super().__reduce__()", "__reduce__"),
        ("class A(metaclass=M):\n    pass", "metaclass"),
        ("class A:\n    def f(self, m):\n        super(A, m).__init__()", "__init__"),
    ],
)
def test_dunder_and_introspection_access_is_refused(source, named):
    assert named in str(refused(source))


def test_a_user_class_with_init_forward_and_super_init_is_allowed():
    check_program_source(
        "import torch\n"
        "class LORA(torch.nn.Module):\n"
        "    def __init__(self, dim):\n"
        "        super().__init__()\n"
        "        super(LORA, self).__init__()\n"
        "        self.w = torch.nn.Parameter(torch.zeros(dim))\n"
        "    def forward(self, x):\n"
        "        return x + self.w\n"
        "    def __call__(self, x):\n"
        "        return self.forward(x)\n"
        "class Data(torch.utils.data.Dataset):\n"
        "    def __len__(self):\n"
        "        return 3\n"
        "    def __getitem__(self, i):\n"
        "        return i\n",
        filename="lora.py", first_line=1)


def test_a_user_class_method_is_checked_like_any_code():
    error = refused("class A:\n    def __init__(self):\n        open('/etc/passwd')")
    assert "'open'" in str(error) and error.line == 3


@pytest.mark.parametrize("source", [
    "from torch.utils.data import DataLoader\nDataLoader([1, 2], batch_size=1)",
    "import torch\ntorch.utils.data.DataLoader([1, 2], batch_size=1, num_workers=0)",
    "from torch.utils.data import TensorDataset, random_split\nTensorDataset(x)",
])
def test_torch_utils_data_in_process_is_allowed(source):
    check_program_source(source, filename="u.py", first_line=1)


@pytest.mark.parametrize("source", [
    "from torch.utils.data import DataLoader\nDataLoader([1, 2], num_workers=2)",
    "from torch.utils.data import DataLoader\nDataLoader([1, 2], **options)",
    "import torch\ntorch.utils.data.DataLoader([1], 1, False, None, None, 4)",
])
def test_data_loaders_with_worker_processes_are_refused(source):
    assert "num_workers" in str(refused(source))


def test_the_rest_of_torch_utils_stays_refused():
    assert "torch.utils.cpp_extension" in str(refused("import torch\ntorch.utils.cpp_extension.load('x', [])"))


@pytest.mark.parametrize(
    "source, named",
    [
        ("import torch\ntorch.load('weights.pt')", "torch.load"),
        ("import torch as t\nt.save(x, '/tmp/x')", "torch.save"),
        ("from torch import load", "torch.load"),
        ("import torch\ntorch.os.system('ls')", "module 'os'"),
        ("from torch import os", "module 'os'"),
        ("import torch\ntorch.hub.load('a', 'b')", "torch.hub.load"),
        ("import torch.utils.cpp_extension", "torch.utils.cpp_extension"),
        ("import numpy as np\nnp.save('f.npy', a)", "numpy.save"),
        ("import numpy as np\nnp.load('f.npy', allow_pickle=True)", "numpy.load"),
        ("import torch\ntorch._C._jit_pass_inline(g)", "private"),
        ("import torch\ntorch.set_default_dtype(torch.float64)", "torch.set_default_dtype"),
        ("import torch\ntorch.nn.functional.gelu = f", "every job"),
        ("import torch\ndel torch.load", "every job"),
        ("h.numpy().tofile('/etc/x')", "tofile"),
        ("import torch\nbig = torch.empty(1 << 28).share_memory_()", "share_memory_"),
        ("import torch\ns = torch.UntypedStorage._new_shared(1 << 30)", "_new_shared"),
        ("s = h.untyped_storage()._share_filename_cpu_()", "_share_filename_cpu_"),
        ("s = getattr(h.untyped_storage(), '_share_fd_cpu_')()", "_share_fd_cpu_"),
        ("model.layer1.register_forward_hook(f)", "register_forward_hook"),
        ("import tether.client", "tether.client"),
    ],
)
def test_allowed_modules_still_refuse_files_processes_and_shared_state(source, named):
    assert named in str(refused(source))


@pytest.mark.parametrize(
    "source, named",
    [
        ("import tether\npid = tether.loading.load_named('os:getpid')", "tether.loading.load_named"),
        ("from tether.loading import load_named", "tether.loading"),
        ("from tether import loading", "tether.loading"),
        ("import tether.runtime.cpython", "tether.runtime"),
        ("import tether\ntether.set_runner(print)", "tether.set_runner"),
        ("import tether\nkey = tether.CONFIG.API.APIKEY", "tether.CONFIG"),
        ("import tether\nm = tether.LanguageModel('gpt2')", "tether.LanguageModel"),
    ],
)
def test_tethers_own_modules_and_set_up_are_off_limits(source, named):
    error = refused(source)
    assert named in str(error) and "tether.save" not in str(error) and "save" in str(error)


def test_the_tether_names_a_body_uses_pass():
    check("import tether\nseen = tether.list().save()\nd = tether.dict(a=1)\nn = tether.int(3)\n"
          "out = tether.save(model.layer1.output)\ntry:\n    pass\nexcept tether.TetherError:\n    pass")


def test_violation_names_the_users_real_line_and_file():
    source = "h = model.layer1.output\n\nwith open('x') as f:\n    pass"
    error = refused(source, filename="experiment.py", first_line=40)
    assert error.line == 42 and error.filename == "experiment.py"
    assert str(error).startswith("experiment.py, line 42: 'open'")
    assert "with tether.local():" in str(error) and "server operator" in str(error)


def test_indented_bodies_keep_their_line_numbers():
    source = "    h = model.layer1.output\n    import os\n"
    assert refused(source, first_line=10).line == 11


def test_syntax_errors_are_violations_with_a_line():
    error = refused("x = 1\ny = (", first_line=5)
    assert error.line in (6, 7) and "cannot parse" in str(error)


def test_code_inside_local_blocks_is_not_checked():
    source = textwrap.dedent(
        """\
        hs = model.layer1.output
        with tether.local():
            import os
            hs = my_local_fn(hs)
            os.makedirs('plots', exist_ok=True)
            open('plots/h.txt', 'w').write(str(hs.__class__))
        model.layer1.output = hs
        """
    )
    check(source, first_line=20, local_block_spans=[(22, 25)])
    blocks = [program_pb2.LocalBlock(block_id="b0", first_line=22, last_line=25)]
    check(source, first_line=20, local_block_spans=blocks)
    # the same code outside the block is refused, at its line
    assert refused(source, first_line=20, local_block_spans=[(22, 23)]).line == 24


def test_client_bound_names():
    # a value the client bound under a builtin's name shadows the builtin
    check("x = input * 2", bound_names={"input": None})
    assert "'input'" in str(refused("x = input * 2"))
    assert "rename" in str(refused("input = model.layer2.input"))
    # modules and functions bound by reference are checked where they are first used
    check("y = np.mean(x)", bound_names={"np": "numpy", "x": None})
    error = refused("x = 1\ny = o.system('ls')", bound_names={"o": "os"}, first_line=3)
    assert error.line == 4 and "'o' is os" in str(error)
    error = refused(
        "hs = model.layer1.output\nhs = my_local_fn(hs)", bound_names={"my_local_fn": "__main__.my_local_fn"}
    )
    assert error.line == 2 and "my_local_fn" in str(error) and "tether.local()" in str(error)
    assert "numpy.save" in str(refused("np.save('f', x)", bound_names={"np": "numpy"}))


def test_the_allow_lists_are_configurable():
    check("import json\njson.dumps({})", allowed_modules={"json"})
    with pytest.raises(PolicyViolation):
        check("import torch", allowed_modules={"json"})
    check("open('x')", allowed_callables={"open"})
    check("import torch\ntorch.load('x')", allowed_callables={"torch.load"})
    strict = dataclasses.replace(DEFAULT_POLICY, allowed_modules=frozenset({"torch"}))
    with pytest.raises(PolicyViolation, match="'math'"):
        check("import math", policy=strict)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_POLICY.allowed_modules = frozenset()


def test_shipped_functions_are_checked_the_same_way():
    fn = "def helper(h):\n    import os\n    return h"
    assert refused(fn, first_line=7).line == 8
    check_function_source("def helper(h):\n    return h.softmax(-1)", filename="lib.py", first_line=1)


def _value(obj) -> values_pb2.Value:
    return values.to_value(obj)


def test_check_program_covers_body_functions_and_bindings():
    program = program_pb2.Program(
        kind=program_pb2.PROGRAM_KIND_TRACE,
        source="h = helper(model.layer1.output)\nwith tether.local():\n    import os",
        filename="demo.py",
        first_line=10,
        model="tiny",
        bindings={"torch": _value(torch), "n": _value(3)},
        functions=[
            program_pb2.FunctionSource(name="helper", source="def helper(h):\n    return h", first_line=3)
        ],
        local_blocks=[program_pb2.LocalBlock(block_id="b0", first_line=12, last_line=12)],
    )
    check_program(DEFAULT_POLICY, program)
    program.functions[0].source = "def helper(h):\n    return eval('h')"
    with pytest.raises(PolicyViolation, match="'eval'") as info:
        check_program(DEFAULT_POLICY, program)
    assert info.value.line == 4
    program.functions[0].source = "def helper(h):\n    return h"
    program.bindings["tools"].CopyFrom(_value([os.system]))
    with pytest.raises(PolicyViolation, match="posix.system|os.system"):
        check_program(DEFAULT_POLICY, program)


def test_policy_resolvers_for_values():
    resolve = {"resolve_reference": DEFAULT_POLICY.resolve_reference, "unpickler": DEFAULT_POLICY.loads}
    assert values.from_value(_value(torch.nn.functional.gelu), **resolve) is torch.nn.functional.gelu
    with pytest.raises(PolicyViolation, match="'os'"):
        values.from_value(_value(os), **resolve)
    with pytest.raises(PolicyViolation):
        values.from_value(_value(os.system), **resolve)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/tether_policy_pwned",))

    with pytest.raises(UnsafePickleError):
        DEFAULT_POLICY.loads(pickle.dumps(Evil()))
    assert not os.path.exists("/tmp/tether_policy_pwned")


def test_custom_policy_objects():
    policy = Policy(allowed_modules=frozenset({"torch"}), denied_builtins=frozenset({"print"}))
    check_source(policy, "import torch\ninput('x')", filename="a.py", first_line=1)
    with pytest.raises(PolicyViolation, match="'print'"):
        check_source(policy, "print(1)", filename="a.py", first_line=1)


def test_tethers_names_pass_by_the_home_a_client_sends_them_by():
    """`from tether import save` in the user's script: the client binds `save` as tether.runtime.saving.save."""
    import tether

    for name in ("save", "local", "apply", "RemoteError", "TetherError"):
        obj = getattr(tether, name)
        assert DEFAULT_POLICY.path_refusal(f"{obj.__module__}.{obj.__qualname__}") == "", name
    assert "tether.runtime.saving.hand_back" in DEFAULT_POLICY.path_refusal("tether.runtime.saving.hand_back")
    assert "share_memory" in str(refused("import torch\nlayer = torch.nn.Linear(4, 4).share_memory()"))
