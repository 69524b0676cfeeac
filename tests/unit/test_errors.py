"""Issue 2 item 9: errors keep their type and point at the user's line; no error path hangs.

Also: tracing leaves no hooks behind (after success, stop or failure) and does not keep a model alive.
Every test that could deadlock has a timeout.
"""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch

import tether
from tether import LanguageModel, NNsight, tiny

THIS_FILE = os.path.abspath(__file__)
RUNTIME_DIR = os.path.dirname(os.path.abspath(tether.runtime.__file__)) + os.sep

pytestmark = pytest.mark.timeout(20)


def _line_of(marker: str) -> int:
    """The 1-based line of this file that contains `marker` (exactly one)."""
    with open(THIS_FILE) as f:
        hits = [i for i, line in enumerate(f, 1) if marker in line and "_line_of(" not in line]
    assert len(hits) == 1, (marker, hits)
    return hits[0]


def _frames(error: BaseException) -> list[tuple[str, int, str]]:
    out = []
    tb = error.__traceback__
    while tb is not None:
        out.append(
            (os.path.abspath(tb.tb_frame.f_code.co_filename), tb.tb_lineno, tb.tb_frame.f_code.co_name)
        )
        tb = tb.tb_next
    return out


def _assert_points_at(error: BaseException, line: int) -> None:
    """The traceback ends at `line` of this file, and no engine frame comes after the body's first frame."""
    frames = _frames(error)
    assert frames[-1][:2] == (THIS_FILE, line), frames
    engine = [i for i, f in enumerate(frames) if f[0].startswith(RUNTIME_DIR)]
    users = [i for i, f in enumerate(frames) if f[0] == THIS_FILE]
    assert not engine or max(engine) < max(users), frames
    # Only the frames the `with` statement itself passes through may be the engine's.
    assert len(engine) <= 3, frames


def _no_hooks(module: torch.nn.Module) -> bool:
    return all(
        not m._forward_hooks
        and not m._forward_pre_hooks
        and not m._backward_hooks
        and not getattr(m, "_forward_hooks_with_kwargs", {})
        for m in module.modules()
    )


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand((1, 5), generator=torch.Generator().manual_seed(7))


@pytest.fixture
def model(tiny_net) -> NNsight:
    return NNsight(tiny_net)


# ---- exceptions from the body ---------------------------------------------------------------------


def test_exception_keeps_type_and_points_at_user_line(model, tiny_net, x):
    with pytest.raises(KeyError, match="boom") as info:
        with model.trace(x):
            h = model.layer1.output
            {}["boom"] if h is not None else None  # error-marker-keyerror
    _assert_points_at(info.value, _line_of("error-marker-keyerror"))
    assert _no_hooks(tiny_net)


def test_exception_before_any_module_access(model, tiny_net, x):
    with pytest.raises(ZeroDivisionError) as info:
        with model.trace(x):
            1 / 0  # noqa: B018 error-marker-zerodiv
    _assert_points_at(info.value, _line_of("error-marker-zerodiv"))
    assert _no_hooks(tiny_net)


def test_torch_error_in_body_after_model_values(model, tiny_net, x):
    with pytest.raises(RuntimeError, match="cannot be multiplied") as info:
        with model.trace(x):
            h = model.layer1.output
            h @ torch.ones(3, 3)  # error-marker-matmul
            model.output.save()
    _assert_points_at(info.value, _line_of("error-marker-matmul"))
    assert _no_hooks(tiny_net)


def _helper_that_fails(t):
    return t.no_such_method()  # error-marker-helper


def test_exception_in_a_helper_function_points_into_the_helper(model, x):
    with pytest.raises(AttributeError, match="no_such_method") as info:
        with model.trace(x):
            _helper_that_fails(model.layer1.output)
    _assert_points_at(info.value, _line_of("error-marker-helper"))


def test_index_error_while_setting_points_at_the_line(model, x):
    with pytest.raises(IndexError) as info:
        with model.trace(x):
            model.layer1.output[:, 10] = 0  # error-marker-setitem
    _assert_points_at(info.value, _line_of("error-marker-setitem"))


def test_exception_cause_is_kept(model, x):
    with pytest.raises(ValueError, match="outer") as info:
        with model.trace(x):
            h = model.layer1.output
            try:
                raise KeyError(f"inner {h.shape}")
            except KeyError as inner:
                raise ValueError("outer") from inner
    assert isinstance(info.value.__cause__, KeyError)


def test_body_that_starts_with_try(model, tiny_net, x):
    with model.trace(x):
        try:
            h = model.layer1.output.save()
        except KeyError:
            h = None
    assert torch.equal(h, tiny_net.layer1(x))


def test_custom_exception_class_is_re_raised_as_itself(model, x):
    class MyError(Exception):
        pass

    with pytest.raises(MyError) as info:
        with model.trace(x):
            if model.layer1.output is not None:
                raise MyError("mine")  # error-marker-custom
    assert type(info.value) is MyError
    _assert_points_at(info.value, _line_of("error-marker-custom"))


def test_error_raised_by_the_model_itself(model, tiny_net, x):
    with pytest.raises(RuntimeError):
        with model.trace(x):
            model.layer1.output = torch.zeros(1, 3)  # wrong width: layer2 fails
            model.output.save()
    assert _no_hooks(tiny_net)
    with pytest.raises(RuntimeError):
        with model.trace(torch.rand(1, 7)):  # wrong input width
            model.output.save()
    assert _no_hooks(tiny_net)


def test_exception_in_a_session_and_in_a_nested_cond(model, x):
    with pytest.raises(LookupError):
        with model.session():
            with model.trace(x) as tracer:
                with tracer.cond(True):
                    raise LookupError("from a cond")  # error-marker-cond


# ---- out of order -------------------------------------------------------------------------------------


def test_out_of_order_access_is_a_clear_error_at_the_users_line(model, tiny_net, x):
    with pytest.raises(tether.OutOfOrderError) as info:
        with model.trace(x):
            model.layer2.output.save()
            model.layer1.output.save()  # error-marker-order
    message = str(info.value)
    assert "model.layer1.output" in message and "order" in message
    _assert_points_at(info.value, _line_of("error-marker-order"))
    assert _no_hooks(tiny_net)


def test_out_of_order_input_after_output(model, x):
    with pytest.raises(tether.OutOfOrderError):
        with model.trace(x):
            model.layer1.output.save()
            model.layer1.input.save()


def test_a_module_that_never_runs_is_an_error_not_a_hang(tiny_net, x):
    class Unused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(5, 2)
            self.unused = torch.nn.Linear(5, 2)

        def forward(self, t):
            return self.used(t)

    model = NNsight(Unused())
    with pytest.raises(tether.OutOfOrderError):
        with model.trace(x):
            model.unused.output.save()
    assert _no_hooks(model._module)


def test_too_many_next_calls_is_an_error_not_a_hang(model, x):
    with pytest.raises(tether.OutOfOrderError, match="iteration"):
        with model.trace(x):
            model.layer1.next().output.save()


def test_out_of_order_error_is_a_tether_error():
    assert issubclass(tether.OutOfOrderError, tether.TetherError)


# ---- invokes -----------------------------------------------------------------------------------------


def test_error_in_the_first_invoke_does_not_hang_the_second(model, tiny_net, x):
    with pytest.raises(ArithmeticError):
        with model.trace() as tracer:
            with tracer.invoke(x):
                model.layer1.output.save()
                raise ArithmeticError("first invoke")  # error-marker-inv1
            with tracer.invoke(x):
                model.layer2.output.save()
    assert _no_hooks(tiny_net)


def test_error_in_the_second_invoke_does_not_hang_the_first(model, tiny_net, x):
    with pytest.raises(ArithmeticError) as info:
        with model.trace() as tracer:
            with tracer.invoke(x):
                model.layer2.output.save()
            with tracer.invoke(x):
                model.layer1.output.save()
                raise ArithmeticError("second invoke")  # error-marker-inv2
    _assert_points_at(info.value, _line_of("error-marker-inv2"))
    assert _no_hooks(tiny_net)


def test_invoke_waiting_for_a_name_an_erroring_invoke_never_set(model, tiny_net, x):
    with pytest.raises(RuntimeError, match="first"):
        with model.trace() as tracer:
            with tracer.invoke(x):
                raise RuntimeError("first")
                hidden = model.layer1.output  # noqa: F841 - never reached
            with tracer.invoke(x):
                model.layer1.output = hidden
    assert _no_hooks(tiny_net)


def test_out_of_order_in_one_invoke_among_several(model, tiny_net, x):
    with pytest.raises(tether.OutOfOrderError):
        with model.trace() as tracer:
            with tracer.invoke(x):
                model.output.save()
            with tracer.invoke(x):
                model.layer2.output.save()
                model.layer1.output.save()
    assert _no_hooks(tiny_net)


def test_error_during_generation_does_not_hang(gpt2):
    hf, tok = gpt2
    llm = LanguageModel(hf, tokenizer=tok)
    with pytest.raises(FloatingPointError):
        with llm.generate("hello", max_new_tokens=3, min_new_tokens=3):
            llm.transformer.h[0].output.save()
            llm.transformer.h[0].next().output.save()
            raise FloatingPointError("step 2")
    assert _no_hooks(hf)


def test_model_works_after_errors(model, tiny_net, x):
    for _ in range(3):
        with pytest.raises(ValueError):
            with model.trace(x):
                model.layer1.output.save()
                raise ValueError("again")
    with model.trace(x):
        out = model.output.save()
    assert torch.equal(out, tiny_net(x))


# ---- nothing left behind ------------------------------------------------------------------------------


def test_tracing_leaves_no_hooks(tiny_net, x):
    model = NNsight(tiny_net)
    assert _no_hooks(tiny_net)  # wrapping installs nothing
    with model.trace(x):
        model.layer1.input.save()
        model.layer1.output[:] = 0
        model.layer2.output.save()
    assert _no_hooks(tiny_net)
    with model.trace(x):
        model.layer1.output.stop()
    assert _no_hooks(tiny_net)
    with model.scan(x):
        model.layer2.output.save()
    assert _no_hooks(tiny_net)
    with model.trace() as tracer:
        with tracer.invoke(x):
            model.layer1.output.save()
        with tracer.invoke(x):
            model.layer2.output.save()
    assert _no_hooks(tiny_net)


def test_tracing_keeps_existing_user_hooks(tiny_net, x):
    seen = []
    handle = tiny_net.layer1.register_forward_hook(lambda m, a, o: seen.append(o.clone()))
    model = NNsight(tiny_net)
    with model.trace(x):
        model.layer1.output[:] = 0
    with pytest.raises(KeyError):
        with model.trace(x):
            model.layer1.output.save()
            raise KeyError("x")
    assert list(tiny_net.layer1._forward_hooks) == [handle.id]
    # the user's hook runs after tether's (as in nnsight): it saw the first trace's edit, and the second
    # trace's body failed at layer1's output, before it
    assert len(seen) == 1 and not seen[0].any()
    handle.remove()


def test_generation_leaves_no_hooks(gpt2):
    hf, tok = gpt2
    llm = LanguageModel(hf, tokenizer=tok)
    with llm.generate("hello", max_new_tokens=3, min_new_tokens=3):
        llm.transformer.h.all()
        llm.transformer.h[0].output[:] = 0
    assert _no_hooks(hf)
    with llm.trace("hello"):
        llm.lm_head.output.save()
    assert _no_hooks(hf)


def _trace_and_forget(net, x, *, fail: bool) -> torch.Tensor | None:
    model = NNsight(net)
    if not fail:
        with model.trace(x):
            out = model.output.save()
        return out
    try:
        with model.trace(x):
            model.layer1.output.save()
            raise ValueError("fail")
    except ValueError:
        pass
    return None


@pytest.mark.parametrize("fail", [False, True])
def test_traced_model_can_be_garbage_collected(x, fail):
    net = tiny.tiny_net()
    ref = weakref.ref(net)
    out = _trace_and_forget(net, x, fail=fail)
    del net
    gc.collect()
    assert ref() is None, gc.get_referrers(ref()) if ref() is not None else None
    if out is not None:
        assert out.shape == (1, 2)  # saved values outlive the model


def _generate_and_forget(hf, tok) -> torch.Tensor:
    llm = LanguageModel(hf, tokenizer=tok)
    with llm.generate("hello", max_new_tokens=2, min_new_tokens=2):
        llm.transformer.h[0].output.save()
        out = llm.generator.output.save()
    return out


def test_generated_model_can_be_garbage_collected():
    hf, tok = tiny.tiny_gpt2()
    ref = weakref.ref(hf)
    out = _generate_and_forget(hf, tok)
    del hf
    gc.collect()
    assert ref() is None
    assert out.shape[0] == 1


def test_trace_functions_are_restored(model, x):
    import sys

    before = sys.gettrace()
    with model.trace(x):
        model.output.save()
    assert sys.gettrace() is before
    with pytest.raises(KeyError):
        with model.trace(x):
            model.layer1.output.save()
            raise KeyError("k")
    assert sys.gettrace() is before
    with pytest.raises(tether.OutOfOrderError):
        with model.trace(x):
            model.layer2.output.save()
            model.layer1.output.save()
    assert sys.gettrace() is before


def test_the_model_runs_with_what_the_caller_handles_not_the_skip_exception(model, tiny_net, x):
    """The block runs from `__exit__`, while the skip exception is being handled: the model must see what the
    caller handles, as in plain Python, not that artefact (each exception raised in the forward would be
    chained to it and built eagerly, a cost per raise); the caller's own handled exception is back after."""
    import sys

    seen = []
    handle = tiny_net.layer1.register_forward_hook(lambda m, a, o: seen.append(sys.exc_info()[1]))
    try:
        with pytest.raises(KeyError) as info:
            with model.trace(x):
                model.layer2.output.save()  # (layer1's hook runs before the body raises)
                raise KeyError("k")
        try:
            raise ValueError("outer")
        except ValueError as error:
            outer = error
            with model.trace(x):
                out = model.layer2.output.save()
            assert sys.exc_info()[1] is outer
    finally:
        handle.remove()
    assert seen == [None, outer]
    assert info.value.__context__ is None
    assert torch.equal(out, tiny_net.layer2(tiny_net.layer1(x)))
    assert sys.exc_info() == (None, None, None)


def _uncollected_after(run) -> list:
    """What the cyclic garbage collector would have to free after `run()` (it should be nothing)."""
    run()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        run()
        gc.collect()
        return [type(o).__name__ for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_traces_leave_no_reference_cycles():
    """A trace frees its model output and namespaces as soon as it ends, not at the next GC pass: the
    collector would otherwise free whole activation graphs at random points (and slow every trace)."""
    hf, tok = tiny.tiny_gpt2()
    lm = LanguageModel(hf, tokenizer=tok)

    def bodies():
        with lm.trace("hello world") as tracer:
            lm.transformer.h[0].output.save()
        with lm.trace() as tracer:
            with tracer.invoke("hello"):
                lm.transformer.h[0].output.save()
            with tracer.invoke("world there"):
                lm.transformer.h[1].output[:, 0].save()
        with lm.generate("hello", max_new_tokens=2, min_new_tokens=2) as tracer:
            steps = tether.list().save()
            for _ in tracer.iter[:]:
                steps.append(lm.transformer.h[-1].output.save())
        with lm.session():
            with lm.trace("hi"):
                first = lm.transformer.h[0].output
            with lm.trace("there"):
                (lm.transformer.h[0].output + first.sum()).save()
        with lm.generate(max_new_tokens=2, min_new_tokens=2) as tracer:  # skip, barrier, per-module next
            barrier = tracer.barrier(2)
            with tracer.invoke("hello"):
                lm.transformer.h[0].skip(lm.transformer.h[0].input)
                barrier()
                lm.transformer.h[1].next().output.save()
            with tracer.invoke("world"):
                lm.transformer.h[0].skip(lm.transformer.h[0].input)
                barrier()

    assert _uncollected_after(bodies) == []
    assert "forward" not in hf.transformer.h[0].__dict__  # the skip gate is gone
