"""Issue 2 item 5: invokes batch into one forward pass; each sees and edits only its own rows.

References are plain torch: the same batch run through the unwrapped module, with forward hooks making the
same edits on the same rows.
"""

from __future__ import annotations

import pytest
import torch

import tether
from tether import LanguageModel, NNsight

PROMPT = "The Eiffel Tower is in the city of"
BLANKS = "_ _ _ _ _ _ _ _ _ _"


@pytest.fixture
def a() -> torch.Tensor:
    return torch.rand((1, 5), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def b() -> torch.Tensor:
    return torch.rand((2, 5), generator=torch.Generator().manual_seed(4))


def _count_calls(module: torch.nn.Module) -> list[torch.Tensor]:
    """Record the first argument of every call of `module` (a plain forward pre-hook, never removed)."""
    calls: list[torch.Tensor] = []
    module.register_forward_pre_hook(lambda m, args: calls.append(args[0].detach().clone()))
    return calls


def test_invokes_run_one_batched_forward(tiny_net, a, b):
    calls = _count_calls(tiny_net)
    model = NNsight(tiny_net)
    with model.trace() as tracer:
        with tracer.invoke(a):
            out_a = model.output.save()
        with tracer.invoke(b):
            out_b = model.output.save()
    assert len(calls) == 1
    assert torch.equal(calls[0], torch.cat([a, b]))
    assert out_a.shape == (1, 2) and out_b.shape == (2, 2)
    assert torch.allclose(out_a, tiny_net(a)) and torch.allclose(out_b, tiny_net(b))


def test_each_invoke_sees_only_its_own_rows(tiny_net, a, b):
    model = NNsight(tiny_net)
    with model.trace() as tracer:
        with tracer.invoke(a):
            in_a = model.layer1.input.save()
            h_a = model.layer1.output.save()
            inputs_a = model.layer2.inputs.save()
        with tracer.invoke(b):
            in_b = model.layer1.input.save()
            h_b = model.layer1.output.save()
            inputs_b = model.layer2.inputs.save()
    assert torch.equal(in_a, a) and torch.equal(in_b, b)
    assert torch.allclose(h_a, tiny_net.layer1(a)) and torch.allclose(h_b, tiny_net.layer1(b))
    assert inputs_a[0][0].shape == (1, 10) and inputs_b[0][0].shape == (2, 10)


def test_edits_stay_in_their_invoke_rows(tiny_net, a, b):
    model = NNsight(tiny_net)
    with model.trace() as tracer:
        with tracer.invoke(a):
            before = model.layer1.output.clone().save()
            model.layer1.output[:] = 0
            out_a = model.output.save()
        with tracer.invoke(b):
            model.layer1.output[:, 3] = 5.0
            h_b = model.layer1.output.save()
            out_b = model.output.save()

    # Plain torch: the same batch, the same edits on the same rows, with a forward hook.
    def edit(module, args, output):
        output = output.clone()
        output[0:1] = 0
        output[1:3, 3] = 5.0
        return output

    handle = tiny_net.layer1.register_forward_hook(edit)
    expected = tiny_net(torch.cat([a, b]))
    handle.remove()
    assert torch.allclose(before, tiny_net.layer1(a))
    assert torch.allclose(out_a, expected[0:1]) and torch.allclose(out_b, expected[1:3])
    assert torch.allclose(out_a, tiny_net.layer2(torch.zeros(1, 10)))
    assert torch.all(h_b[:, 3] == 5.0)
    h = tiny_net.layer1(b)
    h[:, 3] = 5.0
    assert torch.allclose(h_b, h)


def test_replacing_a_value_in_one_invoke_leaves_the_others(tiny_net, a, b):
    model = NNsight(tiny_net)
    t = torch.full((2, 10), 0.5)
    with model.trace() as tracer:
        with tracer.invoke(a):
            out_a = model.output.save()
        with tracer.invoke(b):
            model.layer1.output = t
            out_b = model.output.save()
    assert torch.allclose(out_a, tiny_net(a))
    assert torch.allclose(out_b, tiny_net.layer2(t))


def test_values_flow_from_one_invoke_to_the_next(tiny_net, a):
    model = NNsight(tiny_net)
    other = torch.zeros(1, 5)
    with model.trace() as tracer:
        with tracer.invoke(a):
            hidden = model.layer1.output  # not saved: only used by the next invoke
        with tracer.invoke(other):
            model.layer1.output = hidden
            transplanted = model.output.save()
        with tracer.invoke(other):
            control = model.output.save()
    assert torch.allclose(transplanted, tiny_net(a))
    assert torch.allclose(control, tiny_net(other))


def test_multi_row_invoke_and_single_input_trace_agree(tiny_net, b):
    model = NNsight(tiny_net)
    with model.trace(b):
        whole = model.layer1.output.save()
    with model.trace() as tracer:
        with tracer.invoke(b):
            invoked = model.layer1.output.save()
    assert torch.allclose(whole, invoked) and torch.allclose(whole, tiny_net.layer1(b))


# ---- LanguageModel invokes --------------------------------------------------------------------------


def _hf_padded(tok, prompts):
    """The tokenizer's left-padded batch, with `position_ids` from the mask as Hugging Face `generate` derives them."""
    batch = tok(prompts, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    batch["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return batch


def test_language_model_invokes_are_padded_rows_of_one_batch(gpt2):
    hf, tok = gpt2
    llm = LanguageModel(hf, tokenizer=tok)
    with llm.trace() as tracer:
        with tracer.invoke(PROMPT):
            llm.transformer.h[-1].mlp.output[:] = 0
            ablated = llm.lm_head.output.save()
        with tracer.invoke("hello"):
            original = llm.lm_head.output.save()
    batch = _hf_padded(tok, [PROMPT, "hello"])

    def ablate(module, args, output):
        output = output.clone()
        output[0] = 0
        return output

    handle = hf.transformer.h[-1].mlp.register_forward_hook(ablate)
    with torch.no_grad():
        expected = hf(**batch).logits
    handle.remove()
    assert ablated.shape == expected[0:1].shape and original.shape == expected[1:2].shape
    assert torch.allclose(ablated, expected[0:1], atol=1e-5)
    assert torch.allclose(original, expected[1:2], atol=1e-5)
    # Left padding: the short prompt's pad positions come first, as in the tokenizer's own batch.
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1


def test_walkthrough_embedding_transplant_matches_plain_torch(gpt2):
    hf, tok = gpt2
    llm = LanguageModel(hf, tokenizer=tok)
    with llm.trace() as tracer:
        with tracer.invoke(PROMPT):
            embeddings = llm.transformer.wte.output
        with tracer.invoke(BLANKS):
            llm.transformer.wte.output = embeddings
            token_ids_intervention = llm.lm_head.output.argmax(dim=-1).save()
        with tracer.invoke(BLANKS):
            token_ids_original = llm.lm_head.output.argmax(dim=-1).save()

    batch = _hf_padded(tok, [PROMPT, BLANKS, BLANKS])

    def transplant(module, args, output):
        output = output.clone()
        output[1] = output[0]
        return output

    handle = hf.transformer.wte.register_forward_hook(transplant)
    with torch.no_grad():
        expected = hf(**batch).logits.argmax(dim=-1)
    handle.remove()
    assert torch.equal(token_ids_intervention, expected[1:2])
    assert torch.equal(token_ids_original, expected[2:3])
    assert not torch.equal(token_ids_intervention, token_ids_original)


def test_list_of_prompts_in_one_invoke_is_several_rows(gpt2):
    hf, tok = gpt2
    llm = LanguageModel(hf, tokenizer=tok)
    prompts = [PROMPT, "hello", "The Vatican is in the city of"]
    with llm.trace() as tracer:
        with tracer.invoke(prompts[:2]):
            two = llm.lm_head.output.save()
        with tracer.invoke(prompts[2]):
            one = llm.lm_head.output.save()
    with torch.no_grad():
        expected = hf(**_hf_padded(tok, prompts)).logits
    assert two.shape[0] == 2 and one.shape[0] == 1
    assert torch.allclose(two, expected[0:2], atol=1e-5) and torch.allclose(one, expected[2:3], atol=1e-5)


def test_invoker_args_match_keyword_arguments_of_invoke(gpt2):
    hf, tok = gpt2
    llm = LanguageModel(hf, tokenizer=tok)
    long_prompt = "The quick brown fox jumps over the lazy dog."
    assert len(tok(long_prompt).input_ids) > 3
    with llm.trace(long_prompt, invoker_args={"max_length": 3, "truncation": True}) as tracer:
        invoker = tracer.invoker
        via_trace = llm.lm_head.output.save()
    with llm.trace() as tracer:
        with tracer.invoke(long_prompt, max_length=3, truncation=True) as inv:
            same_invoker = inv
            via_invoke = llm.lm_head.output.save()
    expected_ids = tok(long_prompt, max_length=3, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = hf(**expected_ids).logits
    assert via_trace.shape == (1, 3, len(tok)) and torch.allclose(via_trace, expected, atol=1e-5)
    assert torch.allclose(via_invoke, expected, atol=1e-5)
    assert invoker is not None and same_invoker is not None
    assert invoker.inputs is not None and same_invoker.inputs is not None
    assert tracer is not None


def test_tracer_invoker_of_a_single_input_trace(gpt2):
    hf, tok = gpt2
    llm = LanguageModel(hf, tokenizer=tok)
    with llm.trace("hello") as tracer:
        invoker = tracer.invoker
    assert invoker is not None
    # The prepared inputs hold the tokenized prompt.
    assert tok("hello").input_ids in [list(r) for r in invoker.inputs.args[0]]


def test_batched_invokes_with_saving_in_a_loop(tiny_net):
    model = NNsight(tiny_net)
    xs = [torch.full((1, 5), float(i)) for i in range(3)]
    with model.trace() as tracer:
        outs = tether.list().save()
        for x in xs:
            with tracer.invoke(x):
                outs.append(model.output)
    assert len(outs) == 3
    for x, out in zip(xs, outs):
        assert torch.allclose(out, tiny_net(x))


def test_replacing_an_input_in_one_invoke(tiny_net, a, b):
    model = NNsight(tiny_net)
    t = torch.linspace(-1, 1, 20).reshape(2, 10)
    with model.trace() as tracer:
        with tracer.invoke(a):
            out_a = model.output.save()
        with tracer.invoke(b):
            model.layer2.input = t
            seen = model.layer2.input.save()
            out_b = model.output.save()
    assert torch.allclose(out_a, tiny_net(a))
    assert torch.equal(seen, t)
    assert torch.allclose(out_b, tiny_net.layer2(t))


def test_in_place_input_edit_in_one_invoke(tiny_net, a, b):
    model = NNsight(tiny_net)
    with model.trace() as tracer:
        with tracer.invoke(a):
            model.layer1.input[:] = 0
            out_a = model.output.save()
        with tracer.invoke(b):
            out_b = model.output.save()
    assert torch.allclose(out_a, tiny_net(torch.zeros(1, 5)))
    assert torch.allclose(out_b, tiny_net(b))
