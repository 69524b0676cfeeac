"""Issue 2 item 6: `.grad` of module values, read and written, in both spellings.

The walkthrough asks for `.grad` first and calls a bare `loss.backward()` later in the trace; current nnsight
writes `with loss.backward():`. Every gradient is checked against plain torch autograd, where edits are made
with tensor hooks (`register_hook`) on the same tensors.
"""

from __future__ import annotations

import pytest
import torch

import tether
from tether import NNsight


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand((1, 5), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def model(tiny_net) -> NNsight:
    return NNsight(tiny_net)


def _torch_grads(net, x, *, edit_h=None, edit_o=None, loss_fn=lambda o: o.sum()):
    """Gradients of layer1's and layer2's outputs under plain autograd, with optional gradient edits.

    `edit_o`/`edit_h` are tensor hooks: what they return replaces the gradient flowing back.
    Returns (grad seen at layer1 output after edits, grad seen at layer2 output after edits).
    """
    seen = {}
    h = net.layer1(x).detach().requires_grad_(True)
    o = net.layer2(h)
    if edit_o is not None:
        o.register_hook(edit_o)
    o.register_hook(lambda g: seen.__setitem__("o", g.clone()))
    if edit_h is not None:
        h.register_hook(edit_h)
    h.register_hook(lambda g: seen.__setitem__("h", g.clone()))
    loss_fn(o).backward()
    return seen["h"], seen["o"]


def test_walkthrough_read_gradients(model, tiny_net, x):
    with model.trace(x):
        model.layer1.output.requires_grad = True
        layer1_output_grad = model.layer1.output.grad.save()
        layer2_output_grad = model.layer2.output.grad.save()
        loss = model.output.sum()
        loss.backward()
    expected_h, expected_o = _torch_grads(tiny_net, x)
    assert torch.allclose(layer1_output_grad, expected_h)
    assert torch.equal(layer2_output_grad, torch.ones(1, 2))
    assert torch.equal(layer2_output_grad, expected_o)
    # layer1's gradient is W2^T applied to ones: a closed form as a second reference.
    assert torch.allclose(layer1_output_grad, tiny_net.layer2.weight.sum(dim=0, keepdim=True))


def test_walkthrough_zero_and_double_gradients(model, tiny_net, x):
    with model.trace(x):
        model.layer1.output.requires_grad = True
        model.layer1.output.grad[:] = 0
        model.layer2.output.grad = model.layer2.output.grad * 2
        layer1_output_grad = model.layer1.output.grad.save()
        layer2_output_grad = model.layer2.output.grad.save()
        loss = model.output.sum()
        loss.backward()
    expected_h, expected_o = _torch_grads(tiny_net, x, edit_h=torch.zeros_like, edit_o=lambda g: g * 2)
    assert torch.equal(layer1_output_grad, torch.zeros(1, 10))
    assert torch.equal(layer1_output_grad, expected_h)
    assert torch.equal(layer2_output_grad, torch.full((1, 2), 2.0))
    assert torch.equal(layer2_output_grad, expected_o)


def test_edited_gradient_flows_to_earlier_modules(model, tiny_net, x):
    """Doubling layer2's gradient doubles what reaches layer1 (read after the edit)."""
    with model.trace(x):
        model.layer1.output.requires_grad = True
        model.layer2.output.grad = model.layer2.output.grad * 2
        layer1_output_grad = model.layer1.output.grad.save()
        model.output.sum().backward()
    expected_h, _ = _torch_grads(tiny_net, x, edit_o=lambda g: g * 2)
    plain_h, _ = _torch_grads(tiny_net, x)
    assert torch.allclose(layer1_output_grad, expected_h)
    assert torch.allclose(layer1_output_grad, 2 * plain_h)


def test_in_place_gradient_edit_of_one_column(model, tiny_net, x):
    with model.trace(x):
        model.layer1.output.requires_grad = True
        model.layer2.output.grad[:, 0] = 0
        layer1_output_grad = model.layer1.output.grad.save()
        loss = (model.output**2).sum()
        loss.backward()

    def zero_first(g):
        g = g.clone()
        g[:, 0] = 0
        return g

    expected_h, _ = _torch_grads(tiny_net, x, edit_o=zero_first, loss_fn=lambda o: (o**2).sum())
    assert torch.allclose(layer1_output_grad, expected_h)


def test_expressions_over_gradients(model, tiny_net, x):
    with model.trace(x):
        model.layer1.output.requires_grad = True
        norm = model.layer1.output.grad.norm().save()
        scaled = (model.layer1.output.grad * 3 + 1).save()
        first = model.layer1.output.grad[0, 0].save()
        model.output.sum().backward()
    expected_h, _ = _torch_grads(tiny_net, x)
    assert torch.allclose(norm, expected_h.norm())
    assert torch.allclose(scaled, expected_h * 3 + 1)
    assert torch.allclose(first, expected_h[0, 0])


def test_with_loss_backward_block(model, tiny_net, x):
    with model.trace(x):
        hidden = model.layer1.output
        hidden.requires_grad = True
        logits = model.output
        loss = (logits**2).sum()
        with loss.backward():
            out_grad = logits.grad.save()
            hidden_grad = hidden.grad.save()
    o = tiny_net(x)
    expected_h, expected_o = _torch_grads(tiny_net, x, loss_fn=lambda out: (out**2).sum())
    assert torch.allclose(out_grad, 2 * o)
    assert torch.allclose(out_grad, expected_o)
    assert torch.allclose(hidden_grad, expected_h)


def test_with_loss_backward_block_edits(model, tiny_net, x):
    with model.trace(x):
        hidden = model.layer1.output
        hidden.requires_grad = True
        logits = model.output
        with logits.sum().backward():
            logits.grad[:] = 0.5
            hidden_grad = hidden.grad.save()
    expected_h, _ = _torch_grads(tiny_net, x, edit_o=lambda g: torch.full_like(g, 0.5))
    assert torch.allclose(hidden_grad, expected_h)


def test_gradients_of_a_model_with_trainable_parameters(gpt2):
    hf, tok = gpt2
    ids = tok("The Eiffel Tower is in the city of", return_tensors="pt")["input_ids"]
    # Plain torch: retain the MLP output's gradient.
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["mlp"] = output

    handle = hf.transformer.h[0].mlp.register_forward_hook(keep)
    hf.zero_grad()
    hf(ids).logits[0, -1].logsumexp(-1).backward()
    handle.remove()
    expected = captured["mlp"].grad.clone()
    expected_wte_grad = hf.transformer.wte.weight.grad.clone()
    hf.zero_grad()

    model = NNsight(hf)
    with model.trace(ids):
        mlp_grad = model.transformer.h[0].mlp.output.grad.save()
        loss = model.output.logits[0, -1].logsumexp(-1)
        loss.backward()
    assert torch.allclose(mlp_grad, expected, atol=1e-6)
    # The backward also reached the real parameters, as a plain backward would.
    assert torch.allclose(hf.transformer.wte.weight.grad, expected_wte_grad, atol=1e-6)
    hf.zero_grad()


def test_grad_of_a_leaf_asked_after_backward(model, tiny_net, x):
    with model.trace(x):
        hidden = model.layer1.output
        hidden.requires_grad = True
        model.output.sum().backward()
        late = hidden.grad.save()
    expected_h, _ = _torch_grads(tiny_net, x)
    assert torch.allclose(late, expected_h)


def test_grad_without_backward_is_not_reached(model, x):
    with model.trace(x):
        model.layer1.output.requires_grad = True
        never = model.layer1.output.grad.save()
        model.output.sum()  # no backward
    with pytest.raises(tether.ValueNotReachedError):
        print(never)


def test_grad_of_a_value_that_does_not_require_grad_is_a_clear_error(model, x):
    with pytest.raises(tether.TetherError, match="requires_grad"):
        with model.trace(x):
            model.layer1.output.grad.save()


def test_grad_hooks_do_not_outlive_the_trace(model, tiny_net, x):
    """A second backward on the same graph after the trace sees plain gradients (no replayed edits)."""
    with model.trace(x):
        hidden = model.layer1.output
        hidden.requires_grad = True
        hidden.grad[:] = 0
        out = model.output
        out.sum().backward(retain_graph=True)
        kept = tether.save((hidden, out))
    hidden, out = kept
    hidden.grad = None
    out.sum().backward()
    expected_h, _ = _torch_grads(tiny_net, x)
    assert torch.allclose(hidden.grad, expected_h)


def test_gradients_in_a_batched_trace_are_the_invokes_rows(gpt2):
    from tether import LanguageModel

    hf, tok = gpt2
    prompts = ["The Eiffel Tower is in the city of", "hello"]
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["h0"] = output

    handle = hf.transformer.h[0].register_forward_hook(keep)
    batch = tok(prompts, return_tensors="pt", padding=True)
    hf(**batch).logits[0:1].sum().backward()
    handle.remove()
    expected = captured["h0"].grad.clone()
    hf.zero_grad()

    llm = LanguageModel(hf, tokenizer=tok)
    with llm.trace() as tracer:
        with tracer.invoke(prompts[0]):
            grad = llm.transformer.h[0].output.grad.save()
            llm.lm_head.output.sum().backward()
        with tracer.invoke(prompts[1]):
            llm.lm_head.output.save()
    hf.zero_grad()
    assert torch.allclose(grad, expected[0:1], atol=1e-6)
