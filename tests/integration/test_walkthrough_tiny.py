"""The nnsight walkthrough's tiny-network cells, run in order as written, each checked against plain torch.

Only `import nnsight` becomes `import tether as nnsight`; cells that end in an error in the walkthrough are
wrapped in `pytest.raises`. The sessions/iterator cells run on the tiny net instead of a remote Llama.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import pytest
import torch

import tether as nnsight
from tether import NNsight

pytestmark = pytest.mark.timeout(60, func_only=True)


def test_walkthrough_cells_in_order(capsys):  # noqa: PLR0915 - one cell after another, like the notebook
    # [2]
    input_size = 5
    hidden_dims = 10
    output_size = 2
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        OrderedDict(
            [
                ("layer1", torch.nn.Linear(input_size, hidden_dims)),
                ("layer2", torch.nn.Linear(hidden_dims, output_size)),
            ]
        )
    ).requires_grad_(False)

    # [3]
    tiny_model = NNsight(net)

    # [4]
    print(tiny_model)
    assert capsys.readouterr().out.strip() == str(net).strip()

    # [5]
    input = torch.rand((1, input_size))  # noqa: A001 - the walkthrough's name
    with tiny_model.trace(input) as tracer:
        pass
    assert tracer is not None

    # [6]
    with tiny_model.trace(input) as tracer:
        output = tiny_model.output
    with pytest.raises(ValueError, match=r"\.save\(\)"):
        print(output.value)

    # [7]
    with tiny_model.trace(input) as tracer:
        output = tiny_model.output.save()
    print(output.value)
    assert torch.equal(output.value, net(input))
    assert str(net(input)) in capsys.readouterr().out

    # On model output: trace=False
    assert torch.equal(tiny_model.trace(input, trace=False), net(input))

    # [9]
    with tiny_model.trace(input) as tracer:
        l1_output = tiny_model.layer1.output.save()
    assert torch.equal(l1_output.value, net.layer1(input))

    # [10]
    with tiny_model.trace(input):
        l2_input = tiny_model.layer2.input.save()
    assert torch.equal(l2_input.value, net.layer1(input))

    # [11]
    with tiny_model.trace(input) as tracer:
        tracer.log("Layer 1 - out: ", tiny_model.layer1.output)
    assert capsys.readouterr().out.startswith("Layer 1 - out:  " + str(net.layer1(input))[:20])

    # [12]
    with tiny_model.trace(input):
        l1_output = tiny_model.layer1.output
        l1_amax = torch.argmax(l1_output, dim=1).save()
    print(l1_amax[0])
    assert l1_amax[0] == torch.argmax(net.layer1(input), dim=1)[0]

    # [13]
    with tiny_model.trace(input):
        value = (tiny_model.layer1.output.sum() + tiny_model.layer2.output.sum()).save()
    assert torch.allclose(value, net.layer1(input).sum() + net(input).sum())

    # [14]
    def tensor_sum(tensor):
        flat = tensor.flatten()
        total = 0
        for element in flat:
            total += element.item()
        return torch.tensor(total)

    with tiny_model.trace(input) as tracer:
        custom_sum = nnsight.apply(tensor_sum, tiny_model.layer1.output).save()
        sum = tiny_model.layer1.output.sum()  # noqa: A001
        sum.save()
    print(custom_sum, sum)
    assert torch.allclose(custom_sum, net.layer1(input).sum(), atol=1e-6)
    assert torch.allclose(sum, net.layer1(input).sum())

    # [15]
    with tiny_model.trace(input):
        l1_output_before = tiny_model.layer1.output.clone().save()
        tiny_model.layer1.output[:, 0] = 0
        l1_output_after = tiny_model.layer1.output.save()
    print("Before:", l1_output_before)
    print("After:", l1_output_after)
    expected = net.layer1(input)
    assert torch.equal(l1_output_before, expected)
    expected[:, 0] = 0
    assert torch.equal(l1_output_after, expected)

    # [16]
    with pytest.raises(IndexError):
        with tiny_model.trace(input):
            l1_output_before = tiny_model.layer1.output.clone().save()
            tiny_model.layer1.output[:, hidden_dims] = 0
            l1_output_after = tiny_model.layer1.output.save()

    # [17]
    layer1_calls = []
    handle = net.layer1.register_forward_hook(lambda m, a, o: layer1_calls.append(type(o)))
    with pytest.raises(IndexError):
        with tiny_model.trace(input, scan=True, validate=True):
            l1_output_before = tiny_model.layer1.output.clone().save()
            tiny_model.layer1.output[:, hidden_dims] = 0
            l1_output_after = tiny_model.layer1.output.save()
    handle.remove()
    assert torch.Tensor not in layer1_calls  # reported before the real model ran

    # [18]
    with tiny_model.trace(input):
        l1_output_before = tiny_model.layer1.output.clone().save()
        print(f"Layer 1 output shape: {tiny_model.layer1.output.shape}")
        tiny_model.layer1.output[:, hidden_dims - 1] = 0
        l1_output_after = tiny_model.layer1.output.save()
    assert "Layer 1 output shape: torch.Size([1, 10])" in capsys.readouterr().out
    expected = net.layer1(input)
    expected[:, hidden_dims - 1] = 0
    assert torch.equal(l1_output_after, expected)

    # [19]
    torch.manual_seed(1)
    with tiny_model.trace(input):
        l1_output_before = tiny_model.layer1.output.clone().save()
        noise = (0.001**0.5) * torch.randn(l1_output_before.shape)
        tiny_model.layer1.output = l1_output_before + noise
        l1_output_after = tiny_model.layer1.output.save()
    torch.manual_seed(1)
    expected_noise = (0.001**0.5) * torch.randn((1, hidden_dims))
    assert torch.allclose(l1_output_after, net.layer1(input) + expected_noise)

    # [20]
    with tiny_model.scan(input):
        dim = tiny_model.layer1.output.shape[-1]
    print(dim)
    assert dim == 10

    # [21]
    with tiny_model.trace(input):
        tiny_model.layer1.output.requires_grad = True
        layer1_output_grad = tiny_model.layer1.output.grad.save()
        layer2_output_grad = tiny_model.layer2.output.grad.save()
        loss = tiny_model.output.sum()
        loss.backward()
    print("Layer 1 output gradient:", layer1_output_grad)
    print("Layer 2 output gradient:", layer2_output_grad)
    h = net.layer1(input).requires_grad_(True)
    net.layer2(h).sum().backward()
    assert torch.allclose(layer1_output_grad, h.grad)
    assert torch.equal(layer2_output_grad, torch.ones(1, 2))

    # [22]
    with tiny_model.trace(input):
        tiny_model.layer1.output.requires_grad = True
        tiny_model.layer1.output.grad[:] = 0
        tiny_model.layer2.output.grad = tiny_model.layer2.output.grad * 2
        layer1_output_grad = tiny_model.layer1.output.grad.save()
        layer2_output_grad = tiny_model.layer2.output.grad.save()
        loss = tiny_model.output.sum()
        loss.backward()
    assert torch.equal(layer1_output_grad, torch.zeros(1, 10))
    assert torch.equal(layer2_output_grad, torch.full((1, 2), 2.0))

    # [23]
    layer2_calls = []
    handle = net.layer2.register_forward_hook(lambda m, a, o: layer2_calls.append(1))
    with tiny_model.trace(input):
        l1_out = tiny_model.layer1.output.save()
        tiny_model.layer1.output.stop()
    handle.remove()
    print("L1 - Output: ", l1_out)
    assert torch.equal(l1_out, net.layer1(input)) and layer2_calls == []

    # [24] (the walkthrough ends in an error here too: at the print, once the trace has ended quietly)
    with tiny_model.trace(input):
        l2_out = tiny_model.layer2.output.save()
        tiny_model.layer1.output.stop()
    with pytest.raises(ValueError):  # nnsight's "Accessing value before it's been set."
        print("L2 - Output: ", l2_out)
    capsys.readouterr()

    # [25]
    with tiny_model.trace(input) as tracer:
        rand_int = torch.randint(low=-10, high=10, size=(1,))
        with tracer.cond(rand_int % 2 == 0):
            tracer.log("Random Integer ", rand_int, " is Even")
        with tracer.cond(rand_int % 2 == 1):
            tracer.log("Random Integer ", rand_int, " is Odd")
    printed = capsys.readouterr().out.strip()
    match = re.fullmatch(r"Random Integer  tensor\(\[(-?\d+)\]\)  is (Even|Odd)", printed)
    assert match, printed  # exactly one branch ran
    assert match.group(2) == ("Even" if int(match.group(1)) % 2 == 0 else "Odd")

    # [26]
    with tiny_model.trace(input) as tracer:
        non_rand_int = 8
        with tracer.cond(non_rand_int > 0):
            with tracer.cond(non_rand_int % 2 == 0):
                tracer.log("Rand Int ", non_rand_int, " is Positive and Even")
    assert capsys.readouterr().out.strip() == "Rand Int  8  is Positive and Even"

    # [38]-style session on the tiny net: values flow without .save()
    with tiny_model.session() as session:
        with tiny_model.trace(input) as t1:  # noqa: F841
            hs = tiny_model.layer1.output[:, :]
            t1_out = tiny_model.output.save()
        with tiny_model.trace(torch.zeros(1, input_size)) as t2:  # noqa: F841
            tiny_model.layer1.output[:, :] = hs[:]
            t2_out = tiny_model.output.save()
    assert torch.equal(t1_out, net(input)) and torch.allclose(t2_out, net(input))

    # [39]
    with tiny_model.session() as session:
        session.log("-- Early Stop --")
        session.exit()
    assert capsys.readouterr().out.strip() == "-- Early Stop --"

    # [40]
    calls = []
    handle = net.register_forward_hook(lambda m, a, o: calls.append(1))
    with tiny_model.session() as session:
        with session.iter([0, 1, 2]) as item:
            with tiny_model.trace(input):
                pass
            with tiny_model.trace(input):
                pass
    handle.remove()
    assert len(calls) == 6

    # [41]
    with tiny_model.session() as session:
        li = nnsight.list()
        [li.append([num]) for num in range(0, 3)]
        li2 = nnsight.list().save()
        with session.iter(li) as item:
            with session.iter(item) as item_2:
                li2.append(item_2)
    print("\nList: ", li2)
    assert li2 == [0, 1, 2]
    assert "List:  [0, 1, 2]" in capsys.readouterr().out

    # [42]
    with tiny_model.session() as session:
        with session.iter([0, 1, 2, 3], return_context=True) as (item, iterator):
            iterator.log(item)
            with iterator.cond(item == 2):
                iterator.exit()
    assert capsys.readouterr().out.split() == ["0", "1", "2"]
