"""Exact hook order: the user's own hooks and tether's on one module, against plain torch.

In plain torch a module's hooks run in the order they were registered, each seeing what the previous one
returned. As in nnsight, a body's `.output` is the value the module's forward returned, before any other
forward hook (its read and edit behave as a forward hook registered first), and its `.input` is what forward
receives, after every pre-hook registered before the read. Each test runs the same body twice: the second run
registers tether's hooks from the first run's plan, before the body starts, and must behave the same.
"""

from __future__ import annotations

import torch

from tether import NNsight

RUNS = 2  # the first run of a body, and a repeated one (hooks registered from its plan)


def _plain(net, x, hooks, pre_hooks=()):
    """Run `net(x)` with `hooks` (in this order) on `net.layer1` and `pre_hooks` on `net.layer2`."""
    handles = [net.layer1.register_forward_hook(h) for h in hooks]
    handles += [net.layer2.register_forward_pre_hook(h) for h in pre_hooks]
    try:
        with torch.no_grad():
            return net(x)
    finally:
        for h in handles:
            h.remove()


def _recording(seen, name, change):
    def hook(module, args, output):
        seen[name] = output.clone()
        return change(output)
    return hook


def _recording_pre(seen, name, change):
    def hook(module, args):
        seen[name] = args[0].clone()
        return (change(args[0]),)
    return hook


def test_a_hook_registered_before_the_trace_runs_after_tethers(tiny_net):
    """The body reads what layer1's forward returned; the user's hook sees the body's edit."""
    model = NNsight(tiny_net)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    ref = {}
    expected = _plain(tiny_net, x, [_recording(ref, "body", lambda o: o + 10),
                                    _recording(ref, "user", lambda o: o + 1)])
    for _ in range(RUNS):
        seen = {}
        handle = tiny_net.layer1.register_forward_hook(_recording(seen, "user", lambda o: o + 1))
        try:
            with torch.no_grad(), model.trace(x):
                read = model.layer1.output.clone().save()
                model.layer1.output = model.layer1.output + 10
                out = model.output.save()
        finally:
            handle.remove()
        assert torch.equal(seen["user"], ref["user"])
        assert torch.equal(read, ref["body"])
        assert torch.equal(out, expected)
        assert not tiny_net.layer1._forward_hooks


def test_the_next_modules_hook_sees_the_bodys_edit(tiny_net):
    """A user's pre-hook on the next module sees the edited value as its input, as after any hook's change."""
    model = NNsight(tiny_net)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))

    def edit(m, a, o):
        o = o.clone()
        o[:, 0] = 7.0
        return o

    expected = _plain(tiny_net, x, [edit])
    for _ in range(RUNS):
        seen = {}
        handle = tiny_net.layer2.register_forward_pre_hook(_recording_pre(seen, "layer2_in", lambda a: a))
        try:
            with torch.no_grad(), model.trace(x):
                model.layer1.output[:, 0] = 7.0
                out = model.output.save()
        finally:
            handle.remove()
        assert torch.equal(seen["layer2_in"][:, 0], torch.full((3,), 7.0))
        assert torch.equal(out, expected)


def test_a_hook_registered_in_the_body_before_the_read_runs_after_tethers(tiny_net):
    """Registered in the body before `layer1.output` is read, the user's forward hook still follows the
    body's read and edit, on every run of the same body."""
    model = NNsight(tiny_net)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    ref = {}
    expected = _plain(tiny_net, x, [_recording(ref, "body", lambda o: o + 10),
                                    _recording(ref, "user", lambda o: o * 3)])
    for _ in range(RUNS):
        seen = {}
        with torch.no_grad(), model.trace(x):
            handle = tiny_net.layer1.register_forward_hook(_recording(seen, "user", lambda o: o * 3))
            read = model.layer1.output.clone().save()
            model.layer1.output = model.layer1.output + 10
            out = model.output.save()
        handle.remove()
        assert torch.equal(seen["user"], ref["user"])
        assert torch.equal(read, ref["body"])
        assert torch.equal(out, expected)


def test_pre_hooks_registered_before_the_input_is_read_run_before_tethers(tiny_net):
    """The body's `.input` is what layer2's forward receives: after a pre-hook registered before the trace and
    one registered in the body before the read, in that order, on every run of the same body."""
    model = NNsight(tiny_net)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    ref = {}
    expected = _plain(tiny_net, x, [], [_recording_pre(ref, "early", lambda a: a + 100),
                                        _recording_pre(ref, "user", lambda a: a * 3),
                                        _recording_pre(ref, "body", lambda a: a + 10)])
    for _ in range(RUNS):
        seen = {}
        early = tiny_net.layer2.register_forward_pre_hook(_recording_pre(seen, "early", lambda a: a + 100))
        try:
            with torch.no_grad(), model.trace(x):
                handle = tiny_net.layer2.register_forward_pre_hook(_recording_pre(seen, "user", lambda a: a * 3))
                read = model.layer2.input.clone().save()
                model.layer2.input = model.layer2.input + 10
                out = model.output.save()
            handle.remove()
        finally:
            early.remove()
        assert torch.equal(seen["early"], ref["early"])
        assert torch.equal(seen["user"], ref["user"])
        assert torch.equal(read, ref["body"])
        assert torch.equal(out, expected)
        assert not tiny_net.layer2._forward_pre_hooks
