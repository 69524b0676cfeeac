"""Issue 2 items 1-4: wrap and inspect, trace and get, set, plain Python and the walkthrough's helpers.

Every value read or written through tether is checked against the same computation done with plain torch
(forward hooks on an unwrapped copy, or the submodules called directly).
"""

from __future__ import annotations

import pytest
import torch

import tether
from tether import NNsight, tiny


def _hooked(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple]]:
    """Run `module(x)` with plain forward hooks on every child: (output, {name: (args, kwargs, output)})."""
    seen: dict[str, tuple] = {}
    handles = []
    for name, child in module.named_children():

        def hook(mod, args, kwargs, output, name=name):
            seen[name] = (args, kwargs, output.detach().clone())

        handles.append(child.register_forward_hook(hook, with_kwargs=True))
    try:
        out = module(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand((1, 5), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def model(tiny_net) -> NNsight:
    return NNsight(tiny_net)


# ---- 1. wrap and inspect ------------------------------------------------------------------------


def test_print_shows_the_module_tree(tiny_net, capsys):
    model = NNsight(tiny_net)
    print(model)
    printed = capsys.readouterr().out
    assert printed.strip() == str(tiny_net).strip()
    assert "(layer1): Linear(in_features=5, out_features=10, bias=True)" in printed
    assert "(layer2): Linear(in_features=10, out_features=2, bias=True)" in printed


def test_submodules_by_attribute_index_and_slice(gpt2):
    hf, _ = gpt2
    model = NNsight(hf)
    assert model.transformer.h[0]._module is hf.transformer.h[0]
    assert model.transformer.h[-1]._module is hf.transformer.h[len(hf.transformer.h) - 1]
    assert [e._module for e in model.transformer.h[0:2]] == list(hf.transformer.h[0:2])
    assert [e._module for e in model.transformer.h[::-1]] == list(hf.transformer.h)[::-1]
    assert len(model.transformer.h) == len(hf.transformer.h)
    assert model.transformer.h[-1] is model.transformer.h[1]  # one Envoy per module
    assert [e._module for e in model.transformer.h] == list(hf.transformer.h)  # iteration, in order
    import copy

    replaced = hf.transformer.h[0]
    hf.transformer.h[0] = copy.deepcopy(replaced)  # a swapped block gets its own Envoy, in loops too
    try:
        assert [e._module for e in model.transformer.h] == list(hf.transformer.h)
    finally:
        hf.transformer.h[0] = replaced
    # Attributes that are not submodules fall through to the torch module.
    assert model.config is hf.config


def test_indexed_and_sliced_modules_give_their_values(gpt2):
    hf, tok = gpt2
    ids = tok("The Eiffel Tower is in the city of", return_tensors="pt")["input_ids"]
    captured = {}
    handles = [
        block.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o.detach().clone()))
        for i, block in enumerate(hf.transformer.h)
    ]
    with torch.no_grad():
        expected_logits = hf(ids).logits
    for h in handles:
        h.remove()

    model = NNsight(hf)
    with model.trace(ids):
        first = model.transformer.h[0].output.save()
        last = model.transformer.h[-1].output.save()
        again = model.transformer.h[0].output  # already seen: re-reading is fine
        same = (again is first) or bool(torch.equal(again, first))
        logits = model.output.logits.save()
    assert same
    assert torch.equal(first, captured[0])
    assert torch.equal(last, captured[len(hf.transformer.h) - 1])
    assert torch.allclose(logits, expected_logits)

    with model.trace(ids):
        outs = tether.save([layer.output for layer in model.transformer.h[0:2]])
    assert [o.shape for o in outs] == [captured[0].shape, captured[1].shape]
    assert torch.equal(outs[0], captured[0]) and torch.equal(outs[1], captured[1])


# ---- 2. trace and get ---------------------------------------------------------------------------


def test_trace_runs_the_model_once_on_exit(tiny_net, x):
    calls = []
    tiny_net.register_forward_hook(lambda m, a, o: calls.append(1))
    model = NNsight(tiny_net)
    with model.trace(x):
        unused = 0
    assert calls == [1] and unused == 0
    with model.trace(x):
        out = model.output.save()
    assert calls == [1, 1]
    assert torch.equal(out, tiny_net(x))


def test_output_input_and_inputs_match_plain_hooks(tiny_net, model, x):
    expected_out, seen = _hooked(tiny_net, x)
    with model.trace(x):
        l1_in = model.layer1.input.save()  # inputs come before outputs
        l1_out = model.layer1.output.save()
        l2_in = model.layer2.input.save()
        l2_inputs = model.layer2.inputs.save()
        l2_out = model.layer2.output.save()
        out = model.output.save()
    assert torch.equal(l1_in, x)
    assert torch.equal(l1_out, seen["layer1"][2])
    assert torch.equal(l2_in, seen["layer1"][2])
    args, kwargs = l2_inputs
    assert isinstance(args, tuple) and isinstance(kwargs, dict) and kwargs == {}
    assert len(args) == 1 and torch.equal(args[0], seen["layer2"][0][0])
    assert torch.equal(l2_out, seen["layer2"][2])
    assert torch.equal(out, expected_out)
    assert torch.equal(out, tiny_net.layer2(tiny_net.layer1(x)))


def test_root_input_and_inputs(tiny_net, model, x):
    with model.trace(x):
        root_in = model.input.save()
        root_inputs = model.inputs.save()
    assert torch.equal(root_in, x)
    assert torch.equal(root_inputs[0][0], x) and root_inputs[1] == {}


def test_input_of_a_keyword_only_call_is_its_first_kwarg():
    class Inner(torch.nn.Module):
        def forward(self, *, hidden):
            return hidden * 2

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(hidden=x + 1)

    model = NNsight(Outer())
    x = torch.arange(4.0).reshape(1, 4)
    with model.trace(x):
        first = model.inner.input.save()
        both = model.inner.inputs.save()
        out = model.output.save()
    assert torch.equal(first, x + 1)
    assert both[0] == () and torch.equal(both[1]["hidden"], x + 1)
    assert torch.equal(out, (x + 1) * 2)


def test_value_attribute_of_saved_tensor_is_the_tensor(model, tiny_net, x):
    with model.trace(x):
        output = model.output.save()
    assert torch.equal(output.value, tiny_net(x))
    assert isinstance(output, torch.Tensor)
    assert torch.equal(output.value + 0, output)


def test_tether_save_function_and_method_both_keep_values(model, tiny_net, x):
    with model.trace(x):
        a = tether.save(model.layer1.output)
        b = model.layer2.output.save()
        c = tether.save((model.layer1.output, model.layer2.output))  # any value, not only tensors
    assert torch.equal(a, tiny_net.layer1(x))
    assert torch.equal(b, tiny_net(x))
    assert isinstance(c, tuple) and torch.equal(c[0], a) and torch.equal(c[1], b)


def test_unsaved_value_error_says_to_call_save(model, x):
    with model.trace(x):
        l1 = model.layer1.output
        output = model.output
    for use in (
        lambda: output.value,
        lambda: print(output),
        lambda: output + 1,
        lambda: output[0],
        lambda: torch.sum(l1),
        lambda: l1.shape,
    ):
        with pytest.raises(tether.UnsavedValueError) as info:
            use()
        assert ".save()" in str(info.value)
        assert isinstance(info.value, ValueError)  # nnsight raised ValueError here


def test_save_outside_a_trace_is_an_error():
    with pytest.raises(tether.TetherError):
        tether.save(torch.zeros(1))


def test_module_values_outside_a_trace_raise_not_in_trace(model):
    with pytest.raises(tether.NotInTraceError):
        _ = model.layer1.output
    with pytest.raises(tether.NotInTraceError):
        _ = model.layer1.input


def test_trace_false_returns_the_output(model, tiny_net, x):
    out = model.trace(x, trace=False)
    assert torch.equal(out, tiny_net(x))


def test_untouched_names_and_plain_values_pass_through(model, x):
    kept = torch.ones(3)
    with model.trace(x):
        n = 3
        words = ["a", "b"]
        kept = kept  # noqa: PLW0127 - rebinding to the same object keeps it usable
    assert n == 3 and words == ["a", "b"]
    assert torch.equal(kept, torch.ones(3))


# ---- 3. set ---------------------------------------------------------------------------------------


def test_in_place_setting_matches_plain_torch(model, tiny_net, x):
    with model.trace(x):
        before = model.layer1.output.clone().save()
        model.layer1.output[:, 0] = 0
        after = model.layer1.output.save()
        out = model.output.save()
    h = tiny_net.layer1(x)
    assert torch.equal(before, h)
    h[:, 0] = 0
    assert torch.equal(after, h)
    assert after[0, 0] == 0 and torch.equal(after[:, 1:], before[:, 1:])
    assert torch.allclose(out, tiny_net.layer2(h))
    assert not torch.allclose(out, tiny_net(x))


def test_in_place_last_index_and_shape_inside_trace(model, tiny_net, x, capsys):
    with model.trace(x):
        print(f"Layer 1 output shape: {model.layer1.output.shape}")
        model.layer1.output[:, 9] = 0
        after = model.layer1.output.save()
    assert "Layer 1 output shape: torch.Size([1, 10])" in capsys.readouterr().out
    h = tiny_net.layer1(x)
    h[:, 9] = 0
    assert torch.equal(after, h)


def test_out_of_range_set_raises_index_error(model, x):
    with pytest.raises(IndexError):
        with model.trace(x):
            model.layer1.output[:, 10] = 0


def test_replacing_an_output_matches_plain_torch(model, tiny_net, x):
    noise = 0.03 * torch.randn((1, 10), generator=torch.Generator().manual_seed(2))
    with model.trace(x):
        before = model.layer1.output.clone().save()
        model.layer1.output = before + noise
        after = model.layer1.output.save()
        out = model.output.save()
    h = tiny_net.layer1(x)
    assert torch.equal(before, h)
    assert torch.allclose(after, h + noise)
    assert torch.allclose(out, tiny_net.layer2(h + noise))


def test_replacing_the_model_output(model, x):
    with model.trace(x):
        model.output = torch.full((1, 2), 7.0)
        out = model.output.save()
    assert torch.equal(out, torch.full((1, 2), 7.0))


def test_replacing_an_input_matches_plain_torch(model, tiny_net, x):
    t = torch.linspace(-1, 1, 10).reshape(1, 10)
    with model.trace(x):
        model.layer2.input = t
        seen = model.layer2.input.save()
        out = model.output.save()
    assert torch.equal(seen, t)
    assert torch.allclose(out, tiny_net.layer2(t))


def test_replacing_inputs_args_and_kwargs(model, tiny_net, x):
    t = torch.linspace(-1, 1, 10).reshape(1, 10)
    with model.trace(x):
        model.layer2.inputs = ((t,), {})
        out = model.output.save()
    assert torch.allclose(out, tiny_net.layer2(t))


def test_editing_the_model_input_in_place(model, tiny_net, x):
    with model.trace(x):
        model.layer1.input[:, :] = 0
        out = model.output.save()
    assert torch.allclose(out, tiny_net(torch.zeros(1, 5)))


# ---- 3. operations on values ------------------------------------------------------------------------


def test_operations_torch_functions_and_operators(model, tiny_net, x):
    with model.trace(x):
        l1_output = model.layer1.output
        l1_amax = torch.argmax(l1_output, dim=1).save()
        value = (model.layer1.output.sum() + model.layer2.output.sum()).save()
        scaled = (model.layer2.output * 2 - 1).save()
        compare = (model.layer2.output > 0).save()
        matmul = (model.layer1.output @ torch.ones(10, 3)).save()
        softmax = torch.nn.functional.softmax(model.layer2.output, dim=-1).save()
        item = model.layer2.output[0, 1].item()
    h = tiny_net.layer1(x)
    o = tiny_net.layer2(h)
    assert torch.equal(l1_amax, torch.argmax(h, dim=1))
    assert torch.allclose(value, h.sum() + o.sum())
    assert torch.allclose(scaled, o * 2 - 1)
    assert torch.equal(compare, o > 0)
    assert torch.allclose(matmul, h @ torch.ones(10, 3))
    assert torch.allclose(softmax, torch.softmax(o, dim=-1))
    assert item == pytest.approx(o[0, 1].item())


def test_tether_apply_calls_any_function(model, tiny_net, x):
    def tensor_sum(tensor):
        flat = tensor.flatten()
        total = 0
        for element in flat:
            total += element.item()
        return torch.tensor(total)

    with model.trace(x):
        custom_sum = tether.apply(tensor_sum, model.layer1.output).save()
        sum = model.layer1.output.sum()  # noqa: A001 - the walkthrough's own name
        sum.save()
        kw = tether.apply(torch.clamp, model.layer1.output, min=0.0).save()
    h = tiny_net.layer1(x)
    assert torch.allclose(custom_sum, h.sum(), atol=1e-6)
    assert torch.allclose(sum, h.sum())
    assert torch.equal(kw, torch.clamp(h, min=0.0))


# ---- 4. plain Python in the trace -------------------------------------------------------------------


def _relu_sum(t: torch.Tensor) -> torch.Tensor:
    return torch.relu(t).sum()


def test_plain_if_for_print_and_helpers_work_on_real_values(model, tiny_net, x, capsys):
    h = tiny_net.layer1(x)
    expected_positive = int((h > 0).sum())

    def zero_negatives(t):
        t[t < 0] = 0
        return t

    with model.trace(x):
        l1 = model.layer1.output
        positives = 0
        for value in l1[0]:
            if value > 0:
                positives += 1
            elif value < -10:
                positives -= 100
        print("positives:", positives)
        if l1.sum() > 1e9:
            branch = "huge"
        elif l1.sum() > -1e9:
            branch = "normal"
        else:
            branch = "tiny"
        total = _relu_sum(l1).save()

        def double(t):
            return t * 2

        doubled = double(l1).save()
        zero_negatives(model.layer1.output)
        out = model.output.save()
    assert positives == expected_positive
    assert f"positives: {expected_positive}" in capsys.readouterr().out
    assert branch == "normal"
    assert torch.allclose(total, torch.relu(h).sum())
    assert torch.allclose(doubled, h * 2)
    assert torch.allclose(out, tiny_net.layer2(torch.relu(h)))


def test_values_from_the_caller_are_visible_in_the_body(model, tiny_net, x):
    scale = 3.0
    index = 4
    with model.trace(x):
        model.layer1.output[:, index] = scale
        out = model.output.save()
    h = tiny_net.layer1(x)
    h[:, 4] = 3.0
    assert torch.allclose(out, tiny_net.layer2(h))


def test_tracer_cond_runs_body_only_when_true(model, x, capsys):
    for rand_int in (torch.tensor([4]), torch.tensor([-5])):
        with model.trace(x) as tracer:
            with tracer.cond(rand_int % 2 == 0):
                tracer.log("Random Integer ", rand_int, " is Even")
            with tracer.cond(rand_int % 2 == 1):
                tracer.log("Random Integer ", rand_int, " is Odd")
        out = capsys.readouterr().out
        parity = "Even" if int(rand_int) % 2 == 0 else "Odd"
        other = "Odd" if parity == "Even" else "Even"
        assert f"is {parity}" in out and f"is {other}" not in out


def test_tracer_cond_nested_and_on_module_values(model, tiny_net, x, capsys):
    with model.trace(x) as tracer:
        non_rand_int = 8
        with tracer.cond(non_rand_int > 0):
            with tracer.cond(non_rand_int % 2 == 0):
                tracer.log("Rand Int ", non_rand_int, " is Positive and Even")
            with tracer.cond(non_rand_int % 2 == 1):
                tracer.log("never")
        with tracer.cond(non_rand_int < 0):
            with tracer.cond(True):
                tracer.log("never either")
        with tracer.cond(model.layer1.output.sum() > 1e9):
            model.layer1.output[:] = 100.0
        with tracer.cond(model.layer1.output[0, 0] == model.layer1.output[0, 0]):
            model.layer1.output[:, 0] = 0
        out = model.output.save()
    printed = capsys.readouterr().out
    assert printed.count("Rand Int  8  is Positive and Even") == 1
    assert "never" not in printed
    h = tiny_net.layer1(x)
    h[:, 0] = 0
    assert torch.allclose(out, tiny_net.layer2(h))


def test_tracer_log_prints_real_values(model, tiny_net, x, capsys):
    with model.trace(x) as tracer:
        tracer.log("Layer 1 - out: ", model.layer1.output)
    expected = tiny_net.layer1(x)
    out = capsys.readouterr().out
    assert out.startswith("Layer 1 - out: ")
    assert str(expected) in out


def test_session_iter_nested_with_tether_list(model, capsys):
    with model.session() as session:
        li = tether.list()
        [li.append([num]) for num in range(0, 3)]
        li2 = tether.list().save()
        with session.iter(li) as item:
            with session.iter(item) as item_2:
                li2.append(item_2)
    assert li2 == [0, 1, 2]


def test_session_iter_runs_traces_per_item(model, tiny_net, x):
    with model.session() as session:
        outs = tether.list().save()
        with session.iter([0, 1, 2]) as item:
            with model.trace(x):
                model.layer1.output[:, item] = 0
                outs.append(model.output)
    assert len(outs) == 3
    for i, out in enumerate(outs):
        h = tiny_net.layer1(x)
        h[:, i] = 0
        assert torch.allclose(out, tiny_net.layer2(h))


def test_session_iter_return_context_and_exit(model, capsys):
    seen = []
    with model.session() as session:
        with session.iter([0, 1, 2, 3], return_context=True) as (item, iterator):
            iterator.log(item)
            seen.append(item)
            with iterator.cond(item == 2):
                iterator.exit()
        after_loop = True
    assert capsys.readouterr().out.split() == ["0", "1", "2"]
    assert seen == [0, 1, 2]
    assert after_loop  # exit leaves the loop, not the session


def test_session_iter_nested_return_context(model):
    pairs = []
    with model.session() as session:
        with session.iter([1, 2], return_context=True) as (outer, outer_it):
            with outer_it.iter(["a", "b", "c"], return_context=True) as (inner, inner_it):
                pairs.append((outer, inner))
                with inner_it.cond(inner == "b"):
                    inner_it.exit()
    assert pairs == [(1, "a"), (1, "b"), (2, "a"), (2, "b")]


def test_tether_builtins_build_ordinary_values(model, tiny_net, x):
    with model.trace(x):
        d = tether.dict().save()
        d["argmax"] = int(model.layer1.output.argmax())
        li = tether.list().save()
        li.append(model.layer2.output)
        tu = tether.tuple([1, 2]).save()
        se = tether.set([1, 1, 2]).save()
        i = tether.int(model.layer1.output.argmax())
        f = tether.float(model.layer1.output.sum())
        s = tether.str(3)
        b = tether.bool(1)
        by = tether.bytes(2)
        ba = tether.bytearray(b"ab")
        c = tether.complex(1, 2)
    h = tiny_net.layer1(x)
    assert len(li) == 1 and torch.equal(li[0], tiny_net(x))
    assert d == {"argmax": int(h.argmax())}
    assert tu == (1, 2) and se == {1, 2}
    assert i == int(h.argmax()) and f == pytest.approx(float(h.sum()))
    assert (s, b, by, ba, c) == ("3", True, b"\x00\x00", bytearray(b"ab"), complex(1, 2))


@tether.trace
def _clip(t):
    return t.clamp(-0.1, 0.1)


def test_tether_trace_decorator_and_local_block_just_run_locally(model, tiny_net, x):
    assert _clip.__tether_traced__ is True
    with model.trace(x):
        with tether.local():
            clipped = _clip(model.layer1.output).save()
            model.layer1.output = clipped
        out = model.output.save()
    h = tiny_net.layer1(x)
    assert torch.equal(clipped, h.clamp(-0.1, 0.1))
    assert torch.allclose(out, tiny_net.layer2(h.clamp(-0.1, 0.1)))


def test_tracer_object_is_the_as_target(model, x):
    with model.trace(x) as tracer:
        inside = tracer
    assert inside is tracer
    assert hasattr(tracer, "invoke") and hasattr(tracer, "cond") and hasattr(tracer, "log")


def test_a_fresh_tiny_net_is_the_walkthrough_shape():
    net = tiny.tiny_net()
    model = NNsight(net)
    x = torch.rand(3, 5)
    with model.trace(x):
        shape = model.layer1.output.shape
    assert shape == torch.Size([3, 10])


def test_empty_trace_body_with_only_pass_runs_the_model(tiny_net, x):
    calls = []
    tiny_net.register_forward_hook(lambda m, a, o: calls.append(1))
    model = NNsight(tiny_net)
    with model.trace(x) as tracer:  # walkthrough cell [5]
        pass
    assert calls == [1]
    assert tracer is not None


def test_a_trace_among_other_context_managers_binds_its_own_as_target(model, x):
    """`with torch.no_grad(), model.trace(x) as tracer:` binds `tracer` (and the other items run as usual)."""
    with torch.no_grad(), model.trace(x) as tracer:
        out = model.layer1.output.save()
        grad_mode = torch.is_grad_enabled()
    assert isinstance(tracer, type(model.trace(x))) and not grad_mode
    with torch.no_grad(), model.trace() as tracer2:
        with tracer2.invoke(x):
            again = model.layer1.output.save()
    assert torch.equal(out, model._module.layer1(x)) and torch.equal(again, out)
