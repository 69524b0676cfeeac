"""Issue 2 items 12 and 13: persistent edits, sessions, and the walkthrough's LoRA training loop.

References are plain torch: the unwrapped module with forward hooks that make the same edits.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

import tether
from tether import LanguageModel, NNsight

PROMPT = "The Eiffel Tower is in the city of"
OTHER = "The Vatican is in the city of"


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand((1, 5), generator=torch.Generator().manual_seed(8))


@pytest.fixture
def y() -> torch.Tensor:
    return torch.rand((1, 5), generator=torch.Generator().manual_seed(9))


def _zeroed(net, x):
    return net.layer2(torch.zeros(1, 10))


# ---- 12. edit ----------------------------------------------------------------------------------------


def test_edit_returns_a_copy_whose_edits_persist(tiny_net, x, y):
    model = NNsight(tiny_net)
    with model.edit() as edited:
        model.layer1.output[:] = 0
    assert edited is not model
    for inp in (x, y, x):
        with edited.trace(inp):
            e_out = model.output.save()
        assert torch.allclose(e_out, _zeroed(tiny_net, inp))
    # The original is untouched, before and after the edited copy ran.
    with model.trace(x):
        n_out = model.output.save()
    assert torch.equal(n_out, tiny_net(x))
    assert torch.equal(model.trace(y, trace=False), tiny_net(y))


def test_edit_body_uses_values_from_outside_and_combines_with_trace_body(tiny_net, x):
    model = NNsight(tiny_net)
    patch = torch.arange(10.0).reshape(1, 10)
    with model.edit() as edited:
        model.layer1.output = patch
    with edited.trace(x):
        seen = model.layer1.output.save()  # the trace body sees the edited value
        model.layer2.output[:, 0] = 1.0  # and can edit further
        out = model.output.save()
    assert torch.equal(seen, patch)
    expected = tiny_net.layer2(patch)
    expected[:, 0] = 1.0
    assert torch.allclose(out, expected)


def test_edit_inplace_and_clear_edits(tiny_net, x):
    model = NNsight(tiny_net)
    with model.edit(inplace=True) as edited:
        model.layer1.output[:, 2] = 0
    assert edited is model
    h = tiny_net.layer1(x)
    h[:, 2] = 0
    for _ in range(2):
        with model.trace(x):
            out = model.output.save()
        assert torch.allclose(out, tiny_net.layer2(h))
    model.clear_edits()
    with model.trace(x):
        out = model.output.save()
    assert torch.equal(out, tiny_net(x))


def test_clear_edits_on_a_copy_leaves_the_copy_plain(tiny_net, x):
    model = NNsight(tiny_net)
    with model.edit() as edited:
        model.layer1.output[:] = 0
    edited.clear_edits()
    with edited.trace(x):
        out = model.output.save()
    assert torch.equal(out, tiny_net(x))


def test_walkthrough_edit_on_a_language_model(gpt2):
    hf, tok = gpt2
    llm = LanguageModel(hf, tokenizer=tok)
    last = llm.transformer.h[-1]
    with llm.trace(PROMPT):
        hs = last.output[:, -1, :].save()  # (batch, hidden): GPT2Block returns a tensor in transformers 5
    with llm.edit() as llm_edited:
        llm.transformer.h[-1].output[:, -1, :] = hs
    with llm.trace(OTHER):
        original_tokens = llm.lm_head.output.argmax(dim=-1).save()
    with llm_edited.trace(OTHER):
        modified_tokens = llm.lm_head.output.argmax(dim=-1).save()

    ids = tok(OTHER, return_tensors="pt")

    def patch(module, args, output):
        output = output.clone()
        output[:, -1, :] = hs
        return output

    with torch.no_grad():
        plain = hf(**ids).logits.argmax(dim=-1)
        handle = hf.transformer.h[-1].register_forward_hook(patch)
        patched = hf(**ids).logits.argmax(dim=-1)
        handle.remove()
        prompt_pred = hf(**tok(PROMPT, return_tensors="pt")).logits.argmax(dim=-1)
    assert torch.equal(original_tokens, plain)
    assert torch.equal(modified_tokens, patched)
    assert modified_tokens[0, -1] == prompt_pred[0, -1]  # the edited model predicts the PROMPT's token

    with llm.edit(inplace=True):
        llm.transformer.h[-1].output[:, -1, :] = hs
    with llm.trace(OTHER):
        inplace_tokens = llm.lm_head.output.argmax(dim=-1).save()
    assert torch.equal(inplace_tokens, patched)
    llm.clear_edits()
    with llm.trace(OTHER):
        cleared = llm.lm_head.output.argmax(dim=-1).save()
    assert torch.equal(cleared, plain)


# ---- 13. sessions ------------------------------------------------------------------------------------


def test_session_values_flow_between_traces_without_save(tiny_net, x, y):
    calls = []
    tiny_net.register_forward_hook(lambda m, a, o: calls.append(1))
    model = NNsight(tiny_net)
    with model.session():
        with model.trace(x):
            hs = model.layer1.output  # no .save()
        assert len(calls) == 1  # traces run in order, each when its block ends
        with model.trace(y):
            model.layer1.output = hs
            out = model.output.save()
    assert len(calls) == 2
    assert torch.allclose(out, tiny_net(x))
    with pytest.raises(tether.UnsavedValueError):
        print(hs)


def test_walkthrough_session_cell_matches_plain_torch(gpt2):
    hf, tok = gpt2
    llm = LanguageModel(hf, tokenizer=tok)
    with llm.session():
        with llm.trace(PROMPT):
            hs_last = llm.transformer.h[-1].output[:, -1, :]  # no .save()
            t1_tokens_out = llm.lm_head.output.argmax(dim=-1).save()
        with llm.trace(OTHER):
            llm.transformer.h[0].output[:, -1, :] = hs_last[:]
            t2_tokens_out = llm.lm_head.output.argmax(dim=-1).save()

    captured = {}

    def keep(module, args, output):
        captured["hs"] = output[:, -1, :].clone()

    def patch(module, args, output):
        output = output.clone()
        output[:, -1, :] = captured["hs"]
        return output

    with torch.no_grad():
        handle = hf.transformer.h[-1].register_forward_hook(keep)
        t1 = hf(**tok(PROMPT, return_tensors="pt")).logits.argmax(dim=-1)
        handle.remove()
        handle = hf.transformer.h[0].register_forward_hook(patch)
        t2 = hf(**tok(OTHER, return_tensors="pt")).logits.argmax(dim=-1)
        handle.remove()
    assert torch.equal(t1_tokens_out, t1)
    assert torch.equal(t2_tokens_out, t2)


def test_session_exit_stops_the_session_and_keeps_what_ran(tiny_net, x, capsys):
    calls = []
    tiny_net.register_forward_hook(lambda m, a, o: calls.append(1))
    model = NNsight(tiny_net)
    with model.session() as session:
        with model.trace(x):
            first = model.output.save()
        session.log("-- Early Stop --")
        session.exit()
        with model.trace(x):
            second = model.output.save()
    assert calls == [1]
    assert torch.equal(first, tiny_net(x))
    assert "-- Early Stop --" in capsys.readouterr().out
    with pytest.raises(tether.ValueNotReachedError):
        print(second)


def test_session_with_no_traces_just_logs(tiny_net, capsys):
    model = NNsight(tiny_net)
    with model.session() as session:
        session.log("-- Early Stop --")
        session.exit()
    assert capsys.readouterr().out.strip() == "-- Early Stop --"


def test_session_traces_on_two_models(tiny_net, x):
    """A session can move values between different models (the walkthrough's vanilla/instruct swap)."""
    other_net = type(tiny_net)(*[torch.nn.Linear(5, 10), torch.nn.Linear(10, 2)])
    first, second = NNsight(tiny_net), NNsight(other_net)
    with first.session():
        with first.trace(x):
            h = first.layer1.output
        with second.trace(x):
            second[0].output = h
            out = second.output.save()
    with torch.no_grad():
        expected = other_net[1](tiny_net.layer1(x))
    assert torch.allclose(out, expected)


# ---- 13. the walkthrough's LoRA training loop -----------------------------------------------------


class LORA(torch.nn.Module):
    """The walkthrough's LoRA, as written there (`.input[0][0]`, parameters `.save()`d in __init__)."""

    def __init__(self, module, dim: int, r: int) -> None:
        super().__init__()
        self.r = r
        self.module = module
        self.WA = torch.nn.Parameter(torch.randn(dim, self.r), requires_grad=True).save()
        self.WB = torch.nn.Parameter(torch.zeros(self.r, dim), requires_grad=True).save()

    def __call__(self, alpha: float = 1.0):
        A_x = torch.matmul(self.module.input[0][0], self.WA)
        BA_x = torch.matmul(A_x, self.WB)
        h = BA_x + self.module.output
        self.module.output = h * alpha

    def parameters(self):
        return [self.WA, self.WB]


def _plain_lora_losses(hf, tok, answer_token, dim, r):
    """The same training in plain torch: the LoRA added by a forward hook, same seed, same batches."""
    torch.manual_seed(0)
    WA = torch.nn.Parameter(torch.randn(dim, r))
    WB = torch.nn.Parameter(torch.zeros(r, dim))
    optimizer = torch.optim.AdamW([WA, WB], lr=0.01)
    handle = hf.transformer.h[-1].mlp.register_forward_hook(lambda m, a, o: o + (a[0][0] @ WA) @ WB)
    losses = []
    try:
        for _ in range(10):
            logits = hf(**tok(["_"] * 10, return_tensors="pt")).logits
            loss = torch.nn.functional.cross_entropy(logits[:, -1], torch.tensor([answer_token] * 10))
            losses.append(loss.item())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        handle.remove()
    return losses


def test_walkthrough_lora_training_loop_lowers_the_loss(gpt2, capsys):
    hf, tok = gpt2
    hf.requires_grad_(False)
    llm = LanguageModel(hf, tokenizer=tok)
    answer = " Paris"
    answer_token = llm.tokenizer.encode(answer)[-1]
    lora_dim = 4
    module = llm.transformer.h[-1].mlp
    with llm.scan(" "):
        dim = module.output.shape[-1]
    assert dim == hf.config.n_embd

    torch.manual_seed(0)
    losses = []
    with llm.session() as session:
        dataset = [["_", answer_token]] * 100
        dataloader = DataLoader(dataset, batch_size=10)
        lora = LORA(module, dim, lora_dim)
        optimizer = torch.optim.AdamW(lora.parameters(), lr=0.01)
        with session.iter(dataloader, return_context=True) as (batch, iterator):
            prompt = batch[0]
            correct_token = batch[1]  # noqa: F841 - as in the walkthrough
            with llm.trace(prompt) as tracer:  # noqa: F841
                lora()
                logits = llm.lm_head.output
                loss = torch.nn.functional.cross_entropy(logits[:, -1], batch[1])
                losses.append(loss.item())
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            iterator.log(lora.WA)

    assert len(losses) == 10
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses == pytest.approx(_plain_lora_losses(hf, tok, answer_token, dim, lora_dim), abs=1e-4)
    assert capsys.readouterr().out.count("Parameter containing") == 10
    # The trained parameters were saved and came back as real, trained tensors.
    assert isinstance(lora.WB, torch.nn.Parameter) and lora.WB.abs().sum() > 0

    # Applying the trained LoRA in a trace equals plain torch with the same addition in a forward hook.
    def add_lora(mod, args, output):
        return output + (args[0][0] @ lora.WA) @ lora.WB

    ids = tok("_", return_tensors="pt")
    with torch.no_grad():
        handle = hf.transformer.h[-1].mlp.register_forward_hook(add_lora)
        expected = hf(**ids).logits
        handle.remove()
        plain = hf(**ids).logits
    with llm.trace("_"):
        lora()
        with_lora = llm.lm_head.output.save()
    with llm.trace("_"):
        without = llm.lm_head.output.save()
    assert torch.allclose(with_lora, expected, atol=1e-4)
    assert torch.allclose(without, plain, atol=1e-5)
    assert with_lora[0, -1].argmax() == answer_token

    # And in generation: with the LoRA the first new token is the answer.
    with llm.generate("_", max_new_tokens=1, min_new_tokens=1):
        lora()
        out = llm.generator.output.save()
    assert out[0, -1] == answer_token


def _trace_in_a_helper(model, inp):
    with model.trace(inp):
        out = model.output.save()
    return out


def test_trace_in_a_helper_function_at_top_level(tiny_net, x):
    model = NNsight(tiny_net)
    assert torch.equal(_trace_in_a_helper(model, x), tiny_net(x))


def test_trace_in_a_helper_function_called_inside_a_session(tiny_net, x):
    model = NNsight(tiny_net)
    with model.session():
        y = _trace_in_a_helper(model, x)
        z = (y + 1).save()
    assert torch.equal(z, tiny_net(x) + 1)
