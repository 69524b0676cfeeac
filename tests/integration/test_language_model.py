"""Issue 2 items 10 and 11: LanguageModel inputs, padding, tokenizer, lazy loading, and generation.

A 2-layer random-weight GPT-2 and an in-process tokenizer; every result is compared with the plain Hugging
Face model run on the same (padded) batch, with forward hooks where the trace intervenes.
"""

from __future__ import annotations

import pytest
import torch

import tether
from tether import LanguageModel

PROMPT = "The Eiffel Tower is in the city of"
OTHER = "The Vatican is in the city of"

pytestmark = pytest.mark.timeout(60, func_only=True)


@pytest.fixture
def llm(gpt2) -> LanguageModel:
    hf, tok = gpt2
    return LanguageModel(hf, tokenizer=tok)


def _logits(hf, tok, prompts) -> torch.Tensor:
    """Plain HF logits of the left-padded batch, each row at its own positions (as HF `generate` counts them)."""
    batch = tok(prompts, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    batch["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        return hf(**batch).logits


def _generate(hf, tok, prompts, n: int, hooks: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Greedy HF generation of exactly `n` tokens; `hooks` maps module -> forward hook (kept on while it runs).

    Returns (token ids, {module: [outputs of every call]}).
    """
    batch = tok(prompts, return_tensors="pt", padding=True)
    seen: dict = {}
    handles = []
    for module, hook in (hooks or {}).items():
        seen[module] = []

        def wrapped(mod, args, output, hook=hook, store=seen[module]):
            new = hook(mod, args, output) if hook is not None else None
            store.append((new if new is not None else output).detach().clone())
            return new

        handles.append(module.register_forward_hook(wrapped))
    try:
        with torch.no_grad():
            out = hf.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


def _zero(mod, args, output):
    return torch.zeros_like(output)


# ---- 10. inputs ------------------------------------------------------------------------------------


def test_tokenizer_is_attached_and_pads_left(gpt2):
    hf, tok = gpt2
    llm = LanguageModel(hf, tokenizer=tok)
    assert llm.tokenizer is tok
    assert llm.tokenizer.padding_side == "left" and llm.tokenizer.pad_token is not None
    assert llm.tokenizer.decode(llm.tokenizer(PROMPT)["input_ids"]) == PROMPT
    print(llm)  # prints the module tree like the HF model, with the `(generator)` module nnsight adds
    assert repr(llm) == repr(hf)[:-2] + "\n  (generator): Generator(\n    (streamer): Streamer()\n  )\n)"


def test_string_input_matches_plain_forward(gpt2, llm):
    hf, tok = gpt2
    with llm.trace(PROMPT):
        llm.transformer.h[-1].mlp.output[:] = 0
        token_ids = llm.lm_head.output.argmax(dim=-1).save()
        logits = llm.output.logits.save()

    handle = hf.transformer.h[-1].mlp.register_forward_hook(_zero)
    expected = _logits(hf, tok, PROMPT)
    handle.remove()
    assert torch.allclose(logits, expected, atol=1e-5)
    assert torch.equal(token_ids, expected.argmax(dim=-1))
    prediction = llm.tokenizer.decode(token_ids[0][-1])
    assert prediction == tok.decode(expected[0, -1].argmax())


def test_list_of_strings_is_a_padded_batch(gpt2, llm):
    hf, tok = gpt2
    prompts = [PROMPT, "hello", OTHER]
    with llm.trace(prompts):
        mask = llm.inputs.save()
        logits = llm.output.logits.save()
    expected = _logits(hf, tok, prompts)
    assert logits.shape == expected.shape
    assert torch.allclose(logits, expected, atol=1e-5)
    padded = tok(prompts, return_tensors="pt", padding=True)
    assert torch.equal(mask[1]["attention_mask"], padded["attention_mask"])
    assert torch.equal(mask[1]["input_ids"], padded["input_ids"])


@pytest.mark.parametrize("form", ["list", "tensor", "nested", "encoding"])
def test_token_id_inputs(gpt2, llm, form):
    hf, tok = gpt2
    ids = tok(PROMPT)["input_ids"]
    value = {
        "list": ids,
        "tensor": torch.tensor([ids]),
        "nested": [ids],
        "encoding": tok(PROMPT, return_tensors="pt"),
    }[form]
    with llm.trace(value):
        logits = llm.output.logits.save()
    assert torch.allclose(logits, _logits(hf, tok, PROMPT), atol=1e-5)


def test_batched_invokes_are_one_padded_forward(gpt2, llm):
    hf, tok = gpt2
    prompts = [PROMPT, "hello", OTHER]
    calls = []
    hf.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    with llm.trace() as tracer:
        with tracer.invoke(prompts[0]):
            llm.transformer.h[-1].mlp.output[:] = 0
            first = llm.lm_head.output.save()
        with tracer.invoke(prompts[1:]):
            wte = llm.transformer.wte.output.save()
            rest = llm.lm_head.output.save()
    assert len(calls) == 1
    padded = tok(prompts, return_tensors="pt", padding=True)
    assert torch.equal(calls[0]["input_ids"], padded["input_ids"])
    assert torch.equal(calls[0]["attention_mask"], padded["attention_mask"])

    def ablate_first_row(mod, args, output):
        output = output.clone()
        output[0] = 0
        return output

    handle = hf.transformer.h[-1].mlp.register_forward_hook(ablate_first_row)
    expected = _logits(hf, tok, prompts)
    handle.remove()
    assert torch.allclose(first, expected[0:1], atol=1e-5)
    assert torch.allclose(rest, expected[1:3], atol=1e-5)
    assert torch.equal(wte, hf.transformer.wte(padded["input_ids"][1:3]))


def test_language_model_without_a_tokenizer_takes_token_ids(gpt2):
    hf, tok = gpt2
    llm = LanguageModel(hf)
    ids = tok(PROMPT)["input_ids"]
    with llm.trace(ids):
        logits = llm.output.logits.save()
    assert torch.allclose(logits, _logits(hf, tok, PROMPT), atol=1e-5)
    with pytest.raises(tether.TetherError, match="tokenizer"):
        with llm.trace(PROMPT):
            llm.output.save()


# ---- 10. lazy loading -----------------------------------------------------------------------------


@pytest.fixture
def saved_dir(gpt2, tmp_path):
    hf, tok = gpt2
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path


def _on_meta(module: torch.nn.Module) -> bool:
    return all(p.device.type == "meta" for p in module.parameters())


def test_model_from_a_directory_is_meta_until_the_first_trace(gpt2, saved_dir):
    hf, tok = gpt2
    llm = LanguageModel(str(saved_dir))
    assert _on_meta(llm._module)
    assert type(llm._module) is type(hf)
    assert llm.tokenizer is not None and llm.tokenizer(PROMPT)["input_ids"] == tok(PROMPT)["input_ids"]
    print(llm)  # the tree is there without weights
    block = llm.transformer.h[-1]  # Envoys made before loading keep working after it
    with llm.trace(PROMPT):
        hidden = block.output.save()
        logits = llm.output.logits.save()
    assert not any(p.device.type == "meta" for p in llm._module.parameters())
    assert torch.allclose(logits, _logits(hf, tok, PROMPT), atol=1e-5)
    with torch.no_grad():
        expected_hidden = hf(**tok(PROMPT, return_tensors="pt"), output_hidden_states=True).hidden_states[-1]
    # hidden_states[-1] is after ln_f; compare the block output through ln_f.
    with torch.no_grad():
        assert torch.allclose(hf.transformer.ln_f(hidden), expected_hidden, atol=1e-5)
    # A second trace does not reload.
    weight = llm.transformer.wte.weight
    with llm.trace(OTHER):
        llm.output.save()
    assert llm.transformer.wte.weight is weight


def test_dispatch_true_loads_at_once(gpt2, saved_dir):
    hf, tok = gpt2
    llm = LanguageModel(str(saved_dir), dispatch=True)
    assert not any(p.device.type == "meta" for p in llm._module.parameters())
    assert torch.equal(llm.transformer.wte.weight, hf.transformer.wte.weight)
    with llm.trace(PROMPT):
        logits = llm.output.logits.save()
    assert torch.allclose(logits, _logits(hf, tok, PROMPT), atol=1e-5)


def test_directory_model_with_an_explicit_tokenizer(gpt2, saved_dir):
    hf, tok = gpt2
    llm = LanguageModel(str(saved_dir), tokenizer=tok)
    assert llm.tokenizer is tok


def test_unknown_model_name_is_a_clear_error(tmp_path):
    with pytest.raises(tether.TetherError, match="never downloads"):
        LanguageModel(str(tmp_path / "no-such-model"))


# ---- 11. generation --------------------------------------------------------------------------------


def test_generator_output_equals_hf_generate(gpt2, llm):
    hf, tok = gpt2
    with llm.generate(PROMPT, max_new_tokens=5, min_new_tokens=5):
        output = llm.generator.output.save()
    expected, _ = _generate(hf, tok, PROMPT, 5)
    assert torch.equal(output, expected)
    assert output.value.shape == (1, len(tok(PROMPT)["input_ids"]) + 5)
    assert llm.tokenizer.batch_decode(output.value) == tok.batch_decode(expected)


def test_per_step_next_matches_hf_generate_calls(gpt2, llm):
    hf, tok = gpt2
    with llm.generate(PROMPT, max_new_tokens=3, min_new_tokens=3):
        token_ids_1 = llm.lm_head.output.argmax(dim=-1).save()
        token_ids_2 = llm.lm_head.next().output.argmax(dim=-1).save()
        token_ids_3 = llm.lm_head.next().output.argmax(dim=-1).save()
        output = llm.generator.output.save()
    expected, seen = _generate(hf, tok, PROMPT, 3, {hf.lm_head: None})
    calls = seen[hf.lm_head]
    assert len(calls) == 3
    for mine, theirs in zip((token_ids_1, token_ids_2, token_ids_3), calls):
        assert torch.equal(mine, theirs.argmax(dim=-1))
    n = len(tok(PROMPT)["input_ids"])
    assert 0 not in expected[0, n:].tolist()  # no EOS was suppressed, so argmax is the generated token
    assert [int(t[0][-1]) for t in (token_ids_1, token_ids_2, token_ids_3)] == expected[0, n:].tolist()
    assert torch.equal(output, expected)


def test_per_step_hidden_states_shapes_and_values(gpt2, llm):
    hf, tok = gpt2
    last = llm.transformer.h[-1]
    with llm.generate(PROMPT, max_new_tokens=3, min_new_tokens=3):
        hidden_states1 = last.output.save()
        hidden_states2 = last.next().output.save()
        hidden_states3 = last.next().output.save()
    _, seen = _generate(hf, tok, PROMPT, 3, {hf.transformer.h[-1]: None})
    calls = seen[hf.transformer.h[-1]]
    n = len(tok(PROMPT)["input_ids"])
    assert hidden_states1.shape == (1, n, hf.config.n_embd)
    assert hidden_states2.shape == hidden_states3.shape == (1, 1, hf.config.n_embd)
    for mine, theirs in zip((hidden_states1, hidden_states2, hidden_states3), calls):
        assert torch.allclose(mine, theirs, atol=1e-5)


def test_tracer_next_moves_every_module(gpt2, llm):
    hf, tok = gpt2
    with llm.generate(PROMPT, max_new_tokens=3, min_new_tokens=3) as tracer:
        step0 = llm.lm_head.output.save()
        tracer.next()
        step1_h = llm.transformer.h[0].output.save()
        step1 = llm.lm_head.output.save()
    _, seen = _generate(hf, tok, PROMPT, 3, {hf.lm_head: None, hf.transformer.h[0]: None})
    assert torch.allclose(step0, seen[hf.lm_head][0], atol=1e-5)
    assert torch.allclose(step1, seen[hf.lm_head][1], atol=1e-5)
    assert torch.allclose(step1_h, seen[hf.transformer.h[0]][1], atol=1e-5)


def test_intervention_on_one_step_only(gpt2, llm):
    hf, tok = gpt2
    with llm.generate(PROMPT, max_new_tokens=3, min_new_tokens=3):
        llm.transformer.h[0].next().output[:] = 0  # step 1 only
        output = llm.generator.output.save()
    calls = {"n": 0}

    def zero_on_step_1(mod, args, output):
        calls["n"] += 1
        return torch.zeros_like(output) if calls["n"] == 2 else None

    expected, _ = _generate(hf, tok, PROMPT, 3, {hf.transformer.h[0]: zero_on_step_1})
    assert torch.equal(output, expected)


def test_module_all_applies_the_edit_at_every_step(gpt2, llm):
    hf, tok = gpt2
    layers = llm.transformer.h
    with llm.generate(PROMPT, max_new_tokens=3, min_new_tokens=3):
        hidden_states = tether.list().save()
        layers.all()
        layers[0].output[0][:] = 0  # batch row 0 (GPT2Block returns a tensor in transformers 5)
        hidden_states.append(layers[-1].output)
    output_check = None
    with llm.generate(PROMPT, max_new_tokens=3, min_new_tokens=3):
        layers.all()
        layers[0].output[0][:] = 0
        output_check = llm.generator.output.save()
    expected, seen = _generate(hf, tok, PROMPT, 3, {hf.transformer.h[0]: _zero, hf.transformer.h[-1]: None})
    plain, _ = _generate(hf, tok, PROMPT, 3)
    assert len(hidden_states) == 3
    for mine in hidden_states:  # `.next()` moved layers[0] only: layers[-1] is read at its first call each time
        assert torch.allclose(mine, seen[hf.transformer.h[-1]][0], atol=1e-5)
    assert torch.equal(output_check, expected)
    assert not torch.equal(expected, plain)  # the edit matters


def test_tracer_all_and_root_all(gpt2, llm):
    hf, tok = gpt2
    with llm.generate(PROMPT, max_new_tokens=4, min_new_tokens=4) as tracer:
        tokens = tether.list().save()
        tracer.all()
        llm.transformer.h[0].output[:] = 0
        tokens.append(int(llm.lm_head.output[0, -1].argmax()))
    with llm.generate(PROMPT, max_new_tokens=4, min_new_tokens=4):
        llm.all()
        llm.transformer.h[0].output[:] = 0
        output = llm.generator.output.save()
    expected, seen = _generate(hf, tok, PROMPT, 4, {hf.transformer.h[0]: _zero, hf.lm_head: None})
    # Raw argmax of each step's logits (generate itself may suppress EOS before min_new_tokens).
    assert tokens == [int(logits[0, -1].argmax()) for logits in seen[hf.lm_head]]
    assert torch.equal(output, expected)


def test_walkthrough_old_loop_with_next(gpt2, llm):
    hf, tok = gpt2
    layers = llm.transformer.h
    hidden_states = []
    with llm.generate(PROMPT, max_new_tokens=3, min_new_tokens=3):
        for i in range(3):  # noqa: B007 - as in the walkthrough
            layers[0].output[0][:] = 0
            hidden_states.append(layers[-1].output.save())
            layers[0].next()
    _, seen = _generate(hf, tok, PROMPT, 3, {hf.transformer.h[0]: _zero, hf.transformer.h[-1]: None})
    assert len(hidden_states) == 3
    for mine in hidden_states:  # `.next()` moved layers[0] only: layers[-1] is read at its first call each time
        assert torch.allclose(mine, seen[hf.transformer.h[-1]][0], atol=1e-5)


@pytest.mark.parametrize("steps", [slice(0, 3), slice(None), slice(1, 3)])
def test_tracer_iter_loops_over_steps(gpt2, llm, steps):
    hf, tok = gpt2
    n_new = 4
    with llm.generate(PROMPT, max_new_tokens=n_new, min_new_tokens=n_new) as tracer:
        logits_steps = tether.list().save()
        seen_steps = tether.list().save()
        for step in tracer.iter[steps]:
            seen_steps.append(step)
            logits_steps.append(llm.lm_head.output[0, -1].argmax())
    expected, calls = _generate(hf, tok, PROMPT, n_new, {hf.lm_head: None})
    wanted = list(range(n_new))[steps]
    assert list(seen_steps) == wanted
    assert [int(t) for t in logits_steps] == [int(calls[hf.lm_head][s][0, -1].argmax()) for s in wanted]
    n = len(tok(PROMPT)["input_ids"])
    if 0 not in expected[0, n:].tolist():  # no EOS suppressed by min_new_tokens: the tokens themselves
        assert [int(t) for t in logits_steps] == [int(expected[0, n + s]) for s in wanted]


def test_tracer_iter_with_an_edit_every_step(gpt2, llm):
    hf, tok = gpt2
    with llm.generate(PROMPT, max_new_tokens=3, min_new_tokens=3) as tracer:
        for _step in tracer.iter[:]:
            llm.transformer.h[0].output[:] = 0
        output = llm.generator.output.save()
    expected, _ = _generate(hf, tok, PROMPT, 3, {hf.transformer.h[0]: _zero})
    assert torch.equal(output, expected)


def test_generation_with_two_invokes(gpt2, llm):
    hf, tok = gpt2
    with llm.generate(max_new_tokens=3, min_new_tokens=3) as tracer:
        with tracer.invoke(PROMPT):
            first = llm.generator.output.save()
        with tracer.invoke("hello"):
            second = llm.generator.output.save()
    expected, _ = _generate(hf, tok, [PROMPT, "hello"], 3)
    assert torch.equal(first, expected[0:1])
    assert torch.equal(second, expected[1:2])


def test_generation_edit_in_one_invoke_only(gpt2, llm):
    hf, tok = gpt2
    with llm.generate(max_new_tokens=3, min_new_tokens=3) as tracer:
        with tracer.invoke(PROMPT):
            llm.all()
            llm.transformer.h[0].output[:] = 0
            first = llm.generator.output.save()
        with tracer.invoke(OTHER):
            second = llm.generator.output.save()

    def zero_row_0(mod, args, output):
        output = output.clone()
        output[0] = 0
        return output

    expected, _ = _generate(hf, tok, [PROMPT, OTHER], 3, {hf.transformer.h[0]: zero_row_0})
    assert torch.equal(first, expected[0:1])
    assert torch.equal(second, expected[1:2])


def test_iterating_tracer_all(gpt2, llm):
    hf, tok = gpt2
    with llm.generate(PROMPT, max_new_tokens=3, min_new_tokens=3) as tracer:
        steps = tether.list().save()
        for step in tracer.all():
            steps.append(step)
            llm.transformer.h[0].output[:] = 0
        output = llm.generator.output.save()
    expected, _ = _generate(hf, tok, PROMPT, 3, {hf.transformer.h[0]: _zero})
    assert list(steps) == [0, 1, 2]
    assert torch.equal(output, expected)


def _early_eos(hf, tok) -> tuple[int, int]:
    """(an eos id that makes greedy generation of PROMPT stop early, how many tokens plain HF generate then
    makes when asked for 5)."""
    expected, _ = _generate(hf, tok, PROMPT, 2)
    n = len(tok(PROMPT)["input_ids"])
    eos = int(expected[0, n + 1])
    with torch.no_grad():
        plain = hf.generate(**tok(PROMPT, return_tensors="pt"), max_new_tokens=5, do_sample=False, pad_token_id=0,
                            eos_token_id=eos)
    return eos, plain.shape[1] - n


def test_all_stops_with_generation_on_early_eos(gpt2, llm):
    hf, tok = gpt2
    eos, plain_new = _early_eos(hf, tok)
    with llm.generate(PROMPT, max_new_tokens=5, eos_token_id=eos):
        tokens = tether.list().save()
        llm.all()
        tokens.append(int(llm.lm_head.output[0, -1].argmax()))
    assert len(tokens) == plain_new


def test_tracer_iter_stops_with_generation_on_early_eos(gpt2, llm):
    hf, tok = gpt2
    eos, plain_new = _early_eos(hf, tok)
    with llm.generate(PROMPT, max_new_tokens=5, eos_token_id=eos) as tracer:
        tokens = tether.list().save()
        for _step in tracer.iter[:]:
            tokens.append(int(llm.lm_head.output[0, -1].argmax()))
    assert len(tokens) == plain_new


def test_scan_does_not_load_the_weights(gpt2, saved_dir):
    llm = LanguageModel(str(saved_dir))
    with llm.scan(" "):
        dim = llm.transformer.h[-1].mlp.output.shape[-1]
    assert dim == gpt2[0].config.n_embd
    assert _on_meta(llm._module)
