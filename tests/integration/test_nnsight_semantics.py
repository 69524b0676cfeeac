"""Issue 11, items 1-3, 5-9 and 13: nnsight 0.8.1's semantics in the local engine.

Every value is compared with the plain Hugging Face model (tiny random-weight GPT-2 and Llama) run solo, with
forward hooks recording or editing what the trace reads or writes.
"""

from __future__ import annotations

import pytest
import torch

import tether
from tether import LanguageModel, tiny

LONG = "The Eiffel Tower is in the city of"
SHORT = "hello"
MIDDLE = "The Vatican is in"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["gpt2", "llama"])
def arch(request):
    """`(hf model, tokenizer, LanguageModel)` for each architecture: absolute positions (GPT-2), rotary (Llama)."""
    hf, tok = tiny.tiny_gpt2() if request.param == "gpt2" else tiny.tiny_llama()
    return hf, tok, LanguageModel(hf, tokenizer=tok)


@pytest.fixture
def gpt2_llm(gpt2):
    hf, tok = gpt2
    return hf, tok, LanguageModel(hf, tokenizer=tok)


def _solo_logits(hf, tok, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return hf(**tok(prompt, return_tensors="pt")).logits


def _solo_generation(hf, tok, prompt: str, n: int) -> torch.Tensor:
    """Greedy HF generation of exactly `n` new tokens for `prompt` alone (no padding)."""
    with torch.no_grad():
        out = hf.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    return out[0, -n:]


class _Recorder:
    """Forward hooks on HF modules that record every call's output (and may replace it)."""

    def __init__(self, edits: dict | None = None):
        self.outputs: dict = {}
        self._handles = []
        self._edits = edits or {}

    def watch(self, *modules) -> _Recorder:
        for module in {*modules, *self._edits}:
            self.outputs[module] = []

            def hook(mod, args, output, store=self.outputs[module]):
                edit = self._edits.get(mod)
                new = edit(mod, args, output) if edit is not None else None
                store.append((output if new is None else new).detach().clone())
                return new

            self._handles.append(module.register_forward_hook(hook))
        return self

    def __enter__(self) -> _Recorder:
        if not self._handles:
            self.watch()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def _hidden(value):
    return value[0] if isinstance(value, tuple) else value


# ---- 1. padded batches: each prompt gets exactly its solo run --------------------------------------------


def test_invokes_of_unequal_length_get_their_solo_logits(arch):
    hf, tok, llm = arch
    with llm.trace() as tracer:
        with tracer.invoke(LONG):
            long_logits = llm.output.logits.save()
        with tracer.invoke(SHORT):
            short_logits = llm.output.logits.save()
        with tracer.invoke(MIDDLE):
            middle_logits = llm.output.logits.save()
    for prompt, got in ((LONG, long_logits), (SHORT, short_logits), (MIDDLE, middle_logits)):
        solo = _solo_logits(hf, tok, prompt)
        assert got.shape[1] > solo.shape[1] or prompt == LONG
        assert torch.allclose(got[:, -solo.shape[1]:], solo, atol=1e-5), prompt


def test_a_list_of_prompts_gets_each_its_solo_logits(arch):
    hf, tok, llm = arch
    with llm.trace([SHORT, LONG, MIDDLE]):
        logits = llm.output.logits.save()
    for row, prompt in enumerate((SHORT, LONG, MIDDLE)):
        solo = _solo_logits(hf, tok, prompt)
        assert torch.allclose(logits[row:row + 1, -solo.shape[1]:], solo, atol=1e-5), prompt


def test_padded_generation_gives_each_prompt_its_solo_generation(arch):
    hf, tok, llm = arch
    n = 5
    with llm.generate([LONG, SHORT], max_new_tokens=n, min_new_tokens=n) as tracer:
        tokens = llm.generator.output.save()
    with llm.generate(max_new_tokens=n, min_new_tokens=n) as tracer:
        with tracer.invoke(MIDDLE):
            middle = llm.generator.output.save()
        with tracer.invoke(SHORT):
            short = llm.generator.output.save()
    assert torch.equal(tokens[0, -n:], _solo_generation(hf, tok, LONG, n))
    assert torch.equal(tokens[1, -n:], _solo_generation(hf, tok, SHORT, n))
    assert torch.equal(middle[0, -n:], _solo_generation(hf, tok, MIDDLE, n))
    assert torch.equal(short[0, -n:], _solo_generation(hf, tok, SHORT, n))


def test_an_unpadded_prompt_is_run_exactly_as_given(gpt2_llm):
    hf, tok, llm = gpt2_llm
    with llm.trace(LONG):
        inputs = llm.inputs.save()
    assert "position_ids" not in inputs[1]  # no padding: the model counts positions itself, as in a plain call
    with llm.trace([LONG, SHORT]):
        padded = llm.inputs.save()
    mask = padded[1]["attention_mask"]
    assert torch.equal(padded[1]["position_ids"], (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0))


# ---- 2. `.next()` per module ------------------------------------------------------------------------------


def test_next_moves_only_its_own_module(gpt2_llm):
    """The issue's case: after `h[-1].next()`, two `lm_head.next()` calls are steps 1 and 2 of 3."""
    hf, tok, llm = gpt2_llm
    with llm.generate(LONG, max_new_tokens=3, min_new_tokens=3):
        h0 = llm.transformer.h[-1].output.save()
        h1 = llm.transformer.h[-1].next().output.save()
        t1 = llm.lm_head.next().output.save()
        t2 = llm.lm_head.next().output.save()
    with _Recorder().watch(hf.transformer.h[-1], hf.lm_head) as seen:
        _solo_generation(hf, tok, LONG, 3)
    assert torch.equal(_hidden(h0), seen.outputs[hf.transformer.h[-1]][0])
    assert torch.equal(_hidden(h1), seen.outputs[hf.transformer.h[-1]][1])
    assert torch.equal(t1, seen.outputs[hf.lm_head][1])
    assert torch.equal(t2, seen.outputs[hf.lm_head][2])


def test_walkthrough_lm_head_next_predictions(gpt2_llm):
    hf, tok, llm = gpt2_llm
    with llm.generate(LONG, max_new_tokens=3, min_new_tokens=3):
        token_ids_1 = llm.lm_head.output.argmax(dim=-1).save()
        token_ids_2 = llm.lm_head.next().output.argmax(dim=-1).save()
        token_ids_3 = llm.lm_head.next().output.argmax(dim=-1).save()
        output = llm.generator.output.save()
    expected = _solo_generation(hf, tok, LONG, 3)
    got = [int(t[0][-1]) for t in (token_ids_1, token_ids_2, token_ids_3)]
    assert got == expected.tolist() and torch.equal(output[0, -3:], expected)


def test_next_moves_the_modules_inside_but_not_others(gpt2_llm):
    hf, tok, llm = gpt2_llm
    block, other = llm.transformer.h[0], llm.transformer.h[1]
    with llm.generate(LONG, max_new_tokens=2, min_new_tokens=2):
        other_first = other.output.save()
        block.next()
        mlp_second = block.mlp.output.save()  # inside the moved block: its second call
        other_again = other.output.save()  # not moved: still its first call
    with _Recorder().watch(hf.transformer.h[0].mlp, hf.transformer.h[1]) as seen:
        _solo_generation(hf, tok, LONG, 2)
    assert torch.equal(mlp_second, seen.outputs[hf.transformer.h[0].mlp][1])
    assert torch.equal(_hidden(other_first), seen.outputs[hf.transformer.h[1]][0])
    assert torch.equal(_hidden(other_again), _hidden(other_first))


def test_tracer_next_and_root_next_move_every_module(gpt2_llm):
    hf, tok, llm = gpt2_llm
    with llm.generate(LONG, max_new_tokens=3, min_new_tokens=3) as tracer:
        llm.transformer.h[0].next()  # a per-module move is relative: tracer.next() moves it on as well
        tracer.next()
        head = llm.lm_head.output.save()
        first_block = llm.transformer.h[0].output.save()
        llm.next()
        head_last = llm.lm_head.output.save()
    with _Recorder().watch(hf.transformer.h[0], hf.lm_head) as seen:
        _solo_generation(hf, tok, LONG, 3)
    assert torch.equal(_hidden(first_block), seen.outputs[hf.transformer.h[0]][2])
    assert torch.equal(head, seen.outputs[hf.lm_head][1])
    assert torch.equal(head_last, seen.outputs[hf.lm_head][2])


def test_walkthrough_old_next_loop_keeps_working(gpt2_llm):
    """The walkthrough's pre-0.4 loop: `layers[0]` is edited at every step; `layers[-1]` was never moved, so each
    pass reads its first call (as in nnsight, where `.next()` moved only the module it was called on). The edit
    halves the output rather than zeroing it, as a zeroed random-weight GPT-2 makes every later output zero."""
    hf, tok, llm = gpt2_llm
    layers = llm.transformer.h
    n_new_tokens = 3
    hidden_states = []
    with llm.generate(LONG, max_new_tokens=n_new_tokens, min_new_tokens=n_new_tokens):
        for _ in range(n_new_tokens):
            layers[0].output[0][:] = layers[0].output[0] * 0.5
            hidden_states.append(layers[-1].output.save())
            layers[0].next()
        tokens = llm.generator.output.save()
    assert len(hidden_states) == 3

    def halve(mod, args, output):
        return output * 0.5

    with _Recorder({hf.transformer.h[0]: halve}).watch(hf.transformer.h[-1]) as seen:
        expected = _solo_generation(hf, tok, LONG, n_new_tokens)
    assert len(seen.outputs[hf.transformer.h[0]]) == 3  # edited at each of the three steps
    assert torch.equal(tokens[0, -n_new_tokens:], expected)
    first = seen.outputs[hf.transformer.h[-1]][0]
    assert first.abs().sum() > 0
    for hidden in hidden_states:
        assert torch.allclose(_hidden(hidden), first, atol=1e-6)


# ---- 3. print(llm) ----------------------------------------------------------------------------------------


def test_print_shows_the_generator_module(gpt2_llm, capsys):
    hf, _, llm = gpt2_llm
    print(llm)
    printed = capsys.readouterr().out
    assert printed.startswith(repr(hf)[:-2])
    assert printed.rstrip().endswith("(generator): Generator(\n    (streamer): Streamer()\n  )\n)")


# ---- 5. tracer.result -------------------------------------------------------------------------------------


def test_tracer_result_in_a_trace_is_the_model_output(gpt2_llm):
    hf, tok, llm = gpt2_llm
    with llm.trace(LONG) as tracer:
        output = llm.output.save()
        result = tracer.result.save()
    assert result is output
    assert torch.allclose(result.logits, _solo_logits(hf, tok, LONG), atol=1e-5)
    assert tracer.result is output


def test_tracer_result_in_invokes_is_each_invokes_rows(gpt2_llm):
    hf, tok, llm = gpt2_llm
    with llm.trace() as tracer:
        with tracer.invoke(LONG):
            long_result = tracer.result.save()
        with tracer.invoke(SHORT):
            short_result = tracer.result.save()
    solo = _solo_logits(hf, tok, SHORT)
    assert long_result.logits.shape[0] == short_result.logits.shape[0] == 1
    assert torch.allclose(long_result.logits, _solo_logits(hf, tok, LONG), atol=1e-5)
    assert torch.allclose(short_result.logits[:, -solo.shape[1]:], solo, atol=1e-5)


def test_tracer_result_in_generate_is_the_token_ids(gpt2_llm):
    hf, tok, llm = gpt2_llm
    with llm.generate(LONG, max_new_tokens=4, min_new_tokens=4) as tracer:
        ids = tracer.result.save()
    expected = _solo_generation(hf, tok, LONG, 4)
    assert ids.shape == (1, len(tok(LONG)["input_ids"]) + 4)
    assert torch.equal(ids[0, -4:], expected)
    assert torch.equal(tracer.result, ids)


# ---- 6. module.skip -----------------------------------------------------------------------------------------


def _calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda mod, args, out: calls.append(1))
    return calls


def test_skip_with_the_modules_own_input(gpt2_llm):
    hf, tok, llm = gpt2_llm
    attn_calls = _calls(hf.transformer.h[0].attn)
    with llm.trace(LONG):
        block = llm.transformer.h[0]
        block.skip(block.input)
        skipped = block.output.save()
        logits = llm.output.logits.save()
    assert attn_calls == []  # the block's forward never ran

    def identity(mod, args, output):
        return args[0]

    with _Recorder({hf.transformer.h[0]: identity}) as seen, torch.no_grad():
        expected = hf(**tok(LONG, return_tensors="pt")).logits
    assert torch.equal(_hidden(skipped), seen.outputs[hf.transformer.h[0]][0])
    assert torch.allclose(logits, expected, atol=1e-5)


def test_skip_with_another_modules_value(gpt2_llm):
    hf, tok, llm = gpt2_llm
    with llm.trace(LONG):
        llm.transformer.h[1].skip(llm.transformer.h[0].output)
        logits = llm.output.logits.save()
    captured = {}

    def keep(mod, args, output):
        captured["first"] = output

    def replace(mod, args, output):
        return captured["first"]

    with _Recorder({hf.transformer.h[0]: keep, hf.transformer.h[1]: replace}), torch.no_grad():
        expected = hf(**tok(LONG, return_tensors="pt")).logits
    assert torch.allclose(logits, expected, atol=1e-5)


def test_skip_in_every_invoke_and_in_only_one(gpt2_llm):
    hf, tok, llm = gpt2_llm
    with llm.trace() as tracer:
        with tracer.invoke(LONG):
            llm.transformer.h[0].skip(llm.transformer.h[0].input)
            long_logits = llm.output.logits.save()
        with tracer.invoke(SHORT):
            llm.transformer.h[0].skip(llm.transformer.h[0].input)
            short_logits = llm.output.logits.save()

    def identity(mod, args, output):
        return args[0]

    with _Recorder({hf.transformer.h[0]: identity}):
        for prompt, got in ((LONG, long_logits), (SHORT, short_logits)):
            solo = _solo_logits(hf, tok, prompt)
            assert torch.allclose(got[:, -solo.shape[1]:], solo, atol=1e-5)

    with pytest.raises(tether.TetherError, match=r"model.transformer.h.0.skip\(\)` was called in some invokes"):
        with llm.trace() as tracer:
            with tracer.invoke(LONG):
                llm.transformer.h[0].skip(llm.transformer.h[0].input)
            with tracer.invoke(SHORT):
                llm.output.save()
    assert "forward" not in hf.transformer.h[0].__dict__  # the gate is removed when the run fails too


def test_skip_after_the_module_ran_is_out_of_order(gpt2_llm):
    _, _, llm = gpt2_llm
    with pytest.raises(tether.OutOfOrderError, match="model.transformer.h.0.skip"):
        with llm.trace(LONG):
            hidden = llm.transformer.h[1].output
            llm.transformer.h[0].skip(hidden)


# ---- 7. tracer.barrier ------------------------------------------------------------------------------------------


def test_barrier_hands_embeddings_to_the_next_invoke(gpt2_llm):
    hf, tok, llm = gpt2_llm
    source, target = "The Vatican is in the city of", "The Colosseum is in the city of"
    assert len(tok(source)["input_ids"]) == len(tok(target)["input_ids"])
    with llm.generate(max_new_tokens=3, min_new_tokens=3) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(source):
            embeddings = llm.transformer.wte.output
            barrier()
        with tracer.invoke(target):
            barrier()
            llm.transformer.wte.output = embeddings
            head = llm.lm_head.output.save()
            tokens = llm.generator.output.save()
    # the target runs on the source's embeddings at the first step, so it continues exactly as the source alone
    assert torch.equal(tokens[0, -3:], _solo_generation(hf, tok, source, 3))
    assert torch.allclose(head, _solo_logits(hf, tok, source)[:, -1:], atol=1e-5)
    assert not torch.allclose(head, _solo_logits(hf, tok, target)[:, -1:], atol=1e-5)


def test_barrier_that_too_few_invokes_reach_says_so(gpt2_llm):
    _, _, llm = gpt2_llm
    with pytest.raises(tether.TetherError, match=r"tracer.barrier\(2\)` was reached by only 1 invoke"):
        with llm.trace() as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke(LONG):
                llm.transformer.wte.output.save()
                barrier()
            with tracer.invoke(SHORT):
                llm.output.save()


# ---- 8. tracer.iter spellings ---------------------------------------------------------------------------------


def test_iter_over_a_list_of_steps(gpt2_llm):
    hf, tok, llm = gpt2_llm
    heads = []
    with llm.generate(LONG, max_new_tokens=4, min_new_tokens=4) as tracer:
        for step in tracer.iter[[0, 2, 3]]:
            heads.append((step, llm.lm_head.output.save()))
    with _Recorder().watch(hf.lm_head) as seen:
        _solo_generation(hf, tok, LONG, 4)
    assert [step for step, _ in heads] == [0, 2, 3]
    for step, head in heads:
        assert torch.equal(head, seen.outputs[hf.lm_head][step])


def test_with_iter_and_with_module_all_run_their_block_at_each_step(gpt2_llm):
    hf, tok, llm = gpt2_llm
    ranged, every = [], []
    with llm.generate(LONG, max_new_tokens=3, min_new_tokens=3) as tracer:
        with tracer.iter[0:2]:
            ranged.append(llm.lm_head.output.save())
    with llm.generate(LONG, max_new_tokens=3, min_new_tokens=3):
        with llm.all():
            every.append(llm.lm_head.output.save())
    with _Recorder().watch(hf.lm_head) as seen:
        _solo_generation(hf, tok, LONG, 3)
    expected = seen.outputs[hf.lm_head]
    assert len(ranged) == 2 and len(every) == 3
    for got, want in zip(ranged + every, expected[:2] + expected):
        assert torch.equal(got, want)


def test_iter_index_that_is_not_a_step_says_what_works(gpt2_llm):
    _, _, llm = gpt2_llm
    with pytest.raises(tether.TetherError, match=r"tracer.iter\[\[0, 2\]\]"):
        with llm.generate(LONG, max_new_tokens=2) as tracer:
            for _ in tracer.iter[["a"]]:
                pass


# ---- 9. an empty invoke ------------------------------------------------------------------------------------------


def test_empty_invoke_sees_the_whole_batch(gpt2_llm):
    hf, tok, llm = gpt2_llm
    with llm.trace() as tracer:
        with tracer.invoke(LONG):
            long_head = llm.lm_head.output.save()
        with tracer.invoke(SHORT):
            short_head = llm.lm_head.output.save()
        with tracer.invoke():
            llm.transformer.h[-1].mlp.output[:] = 0  # an edit of every row
            whole = llm.lm_head.output.save()
    assert whole.shape[0] == 2 and whole is not long_head
    assert torch.equal(whole, torch.cat([long_head, short_head]))

    def zero(mod, args, output):
        return torch.zeros_like(output)

    with _Recorder({hf.transformer.h[-1].mlp: zero}):
        for row, prompt in enumerate((LONG, SHORT)):
            solo = _solo_logits(hf, tok, prompt)
            assert torch.allclose(whole[row:row + 1, -solo.shape[1]:], solo, atol=1e-5)


def test_only_empty_invokes_is_an_error(gpt2_llm):
    _, _, llm = gpt2_llm
    with pytest.raises(tether.TetherError, match="No invoke has an input"):
        with llm.trace() as tracer:
            with tracer.invoke():
                llm.output.save()


# ---- 13. the logit lens --------------------------------------------------------------------------------------


def test_logit_lens_calls_modules_out_of_order(gpt2_llm):
    hf, tok, llm = gpt2_llm
    with llm.trace(LONG):
        lens = list().save()
        for block in llm.transformer.h:
            lens.append(llm.lm_head(llm.transformer.ln_f(_hidden(block.output))))
        logits = llm.lm_head.output.save()
    with _Recorder().watch(*hf.transformer.h) as seen, torch.no_grad():
        expected_logits = hf(**tok(LONG, return_tensors="pt")).logits
        expected = [hf.lm_head(hf.transformer.ln_f(seen.outputs[block][0])) for block in hf.transformer.h]
    assert torch.allclose(logits, expected_logits, atol=1e-5)
    for got, want in zip(lens, expected):
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(lens[-1], logits, atol=1e-5)
