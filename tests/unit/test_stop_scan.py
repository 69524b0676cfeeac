"""Issue 2 items 7 and 8: early stop, scan (fake tensors) and validate (errors before the real run).

Whether a module really ran is counted around its forward, telling real tensors from fake ones.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import tether
from tether import LanguageModel, NNsight


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand((1, 5), generator=torch.Generator().manual_seed(6))


class _Calls:
    """Counts real and fake calls of the given modules' own forward (an instance attribute around it): a body's
    stop at a module's output ends the pass before the module's later forward hooks, as in nnsight."""

    def __init__(self, **modules: torch.nn.Module):
        self.real = {name: 0 for name in modules}
        self.fake = {name: 0 for name in modules}
        for name, module in modules.items():
            module.forward = self._counting(name, module.forward)

    def _counting(self, name, forward):
        def counted(*args, **kwargs):
            output = forward(*args, **kwargs)
            value = output if isinstance(output, torch.Tensor) else output[0]
            if isinstance(value, FakeTensor):
                self.fake[name] += 1
            else:
                self.real[name] += 1
            return output

        return counted


# ---- 7. early stop ---------------------------------------------------------------------------------


def test_module_output_stop_skips_later_modules(tiny_net, x):
    calls = _Calls(layer1=tiny_net.layer1, layer2=tiny_net.layer2)
    model = NNsight(tiny_net)
    with model.trace(x):
        l1_out = model.layer1.output.save()
        model.layer1.output.stop()
    assert calls.real == {"layer1": 1, "layer2": 0}
    assert torch.equal(l1_out, tiny_net.layer1(x))


def test_tracer_stop_after_a_module(tiny_net, x):
    calls = _Calls(layer1=tiny_net.layer1, layer2=tiny_net.layer2)
    model = NNsight(tiny_net)
    with model.trace(x) as tracer:
        h = model.layer1.output.save()
        tracer.stop()
        after = model.layer2.output.save()
    assert calls.real == {"layer1": 1, "layer2": 0}
    assert torch.equal(h, tiny_net.layer1(x))
    with pytest.raises(tether.ValueNotReachedError) as info:
        print(after)
    assert "stopped early" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_tracer_stop_before_any_module_runs_nothing(tiny_net, x):
    calls = _Calls(root=tiny_net, layer1=tiny_net.layer1)
    model = NNsight(tiny_net)
    with model.trace(x) as tracer:
        tracer.stop()
        never = 1
    assert calls.real == {"root": 0, "layer1": 0}
    with pytest.raises(tether.ValueNotReachedError):
        _ = never + 1


def test_saved_value_after_the_stop_point_raises_clear_error(tiny_net, x):
    model = NNsight(tiny_net)
    with model.trace(x):
        l1 = model.layer1.output.save()
        model.layer1.output.stop()
        l2_out = model.layer2.output.save()
        out = model.output.save()
    assert torch.equal(l1, tiny_net.layer1(x))
    for name, value in (("l2_out", l2_out), ("out", out)):
        with pytest.raises(tether.ValueNotReachedError) as info:
            print("L2 - Output: ", value)
        assert f"`{name}`" in str(info.value)
        assert "before the stop point" in str(info.value)
    with pytest.raises(tether.ValueNotReachedError):
        _ = l2_out.value


def test_stop_at_a_module_that_already_ran_voids_the_later_values(tiny_net, x):
    """Walkthrough cell [83]: layer2 is asked for before the stop at layer1. As in nnsight, the trace ends
    quietly and the value from after the stop point raises when used; layer2 runs only once."""
    calls = _Calls(layer1=tiny_net.layer1, layer2=tiny_net.layer2)
    model = NNsight(tiny_net)
    with model.trace(x):
        l2_out = model.layer2.output.save()
        model.layer1.output.stop()
        never = 1
    assert calls.real == {"layer1": 1, "layer2": 1}
    with pytest.raises(tether.ValueNotReachedError) as info:
        print("L2 - Output: ", l2_out)
    assert isinstance(info.value, ValueError) and "stopped early" in str(info.value)
    with pytest.raises(tether.ValueNotReachedError):
        _ = never + 1


def test_stop_at_a_later_module_stops_there_without_reading_it(tiny_net, x):
    calls = _Calls(layer1=tiny_net.layer1, layer2=tiny_net.layer2)
    model = NNsight(tiny_net)
    with model.trace(x):
        l1 = model.layer1.output.save()
        model.layer2.input.stop()  # stop before layer2 runs: its input exists, its output never will
        out = model.output.save()
    assert calls.real == {"layer1": 1, "layer2": 0}
    assert torch.equal(l1, tiny_net.layer1(x))
    with pytest.raises(tether.ValueNotReachedError):
        print(out)


def test_stop_in_a_language_model_skips_later_layers(gpt2):
    hf, tok = gpt2
    calls = _Calls(h0=hf.transformer.h[0], h1=hf.transformer.h[1], lm_head=hf.lm_head)
    llm = LanguageModel(hf, tokenizer=tok)
    with llm.trace("The Eiffel Tower is in the city of"):
        hidden = llm.transformer.h[0].output.save()
        llm.transformer.h[0].output.stop()
    assert calls.real == {"h0": 1, "h1": 0, "lm_head": 0}
    ids = tok("The Eiffel Tower is in the city of", return_tensors="pt")
    with torch.no_grad():
        expected = hf(**ids, output_hidden_states=True).hidden_states[1]
    assert torch.allclose(hidden, expected, atol=1e-5)


def test_stop_in_one_invoke_stops_the_batch(tiny_net, x):
    calls = _Calls(layer2=tiny_net.layer2)
    model = NNsight(tiny_net)
    with model.trace() as tracer:
        with tracer.invoke(x):
            h = model.layer1.output.save()
            model.layer1.output.stop()
        with tracer.invoke(x):
            out = model.output.save()
    assert calls.real["layer2"] == 0
    assert torch.allclose(h, tiny_net.layer1(x))
    with pytest.raises(tether.ValueNotReachedError):
        print(out)


def test_model_runs_normally_after_a_stopped_trace(tiny_net, x):
    model = NNsight(tiny_net)
    with model.trace(x):
        model.layer1.output.stop()
    with model.trace(x):
        out = model.output.save()
    assert torch.equal(out, tiny_net(x))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_net.modules())


# ---- 8. scan ------------------------------------------------------------------------------------------


def test_scan_gives_shapes_on_fake_tensors(tiny_net, x):
    calls = _Calls(layer1=tiny_net.layer1, layer2=tiny_net.layer2)
    model = NNsight(tiny_net)
    with model.scan(x):
        dim = model.layer1.output.shape[-1]
        is_fake = isinstance(model.layer1.output, FakeTensor)
        dtype = model.layer2.output.dtype
        out_shape = model.output.shape
    assert dim == 10
    assert out_shape == torch.Size([1, 2])
    assert dtype == torch.float32
    assert is_fake
    assert calls.real == {"layer1": 0, "layer2": 0}  # no real compute
    assert calls.fake == {"layer1": 1, "layer2": 1}


def test_scan_of_a_language_model(gpt2):
    hf, tok = gpt2
    calls = _Calls(mlp=hf.transformer.h[-1].mlp)
    llm = LanguageModel(hf, tokenizer=tok)
    with llm.scan(" "):
        dim = llm.transformer.h[-1].mlp.output.shape[-1]
        logits_shape = llm.lm_head.output.shape
    assert dim == hf.config.n_embd
    assert logits_shape == (1, len(tok(" ").input_ids), len(tok))
    assert calls.real["mlp"] == 0 and calls.fake["mlp"] == 1


def test_scan_leaves_weights_and_later_traces_real(tiny_net, x):
    before = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    model = NNsight(tiny_net)
    with model.scan(x):
        model.layer1.output[:] = 0  # edits of fake values change nothing real
    for k, v in tiny_net.state_dict().items():
        assert torch.equal(v, before[k]) and not isinstance(v, FakeTensor)
    with model.trace(x):
        out = model.output.save()
    assert not isinstance(out, FakeTensor) and torch.equal(out, tiny_net(x))


# ---- 8. validate -------------------------------------------------------------------------------------


def test_validate_reports_out_of_range_index_before_the_real_run(tiny_net, x):
    calls = _Calls(layer1=tiny_net.layer1, layer2=tiny_net.layer2)
    model = NNsight(tiny_net)
    hidden_dims = 10
    with pytest.raises(IndexError, match="out of bounds"):
        with model.trace(x, scan=True, validate=True):
            l1_output_before = model.layer1.output.clone().save()  # noqa: F841
            model.layer1.output[:, hidden_dims] = 0
            l1_output_after = model.layer1.output.save()  # noqa: F841
    assert calls.real == {"layer1": 0, "layer2": 0}  # the real model never ran


def test_validate_with_a_valid_edit_then_runs_the_real_model(tiny_net, x):
    calls = _Calls(layer1=tiny_net.layer1, layer2=tiny_net.layer2)
    model = NNsight(tiny_net)
    with model.trace(x, scan=True, validate=True):
        model.layer1.output[:, 9] = 0
        after = model.layer1.output.save()
        out = model.output.save()
    assert calls.real == {"layer1": 1, "layer2": 1}
    assert not isinstance(out, FakeTensor)
    h = tiny_net.layer1(x)
    h[:, 9] = 0
    assert torch.equal(after, h)
    assert torch.allclose(out, tiny_net.layer2(h))


def test_validate_pass_does_not_rebind_the_callers_names(tiny_net, x):
    """The fake validation pass runs on a copy of the caller's names: only the real run's values land.

    (Mutations of outside objects, such as appending to a list, happen in both passes, as documented.)
    """
    model = NNsight(tiny_net)
    with model.trace(x, validate=True, scan=True):
        total = model.layer1.output.sum().save()
    assert not isinstance(total, FakeTensor)
    assert torch.allclose(total, tiny_net.layer1(x).sum())


def test_validate_does_not_print_twice(tiny_net, x, capsys):
    model = NNsight(tiny_net)
    with model.trace(x, scan=True, validate=True):
        print("inside the body")
    assert capsys.readouterr().out.count("inside the body") == 1
