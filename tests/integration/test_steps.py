"""Every-step spellings of generation: `with tracer.all():`, `for step in tracer.all():`."""

import torch

import tether
from tether import LanguageModel


def _greedy(hf, tok, prompt, n):
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_with_tracer_all_runs_the_block_at_every_step(gpt2):
    hf, tok = gpt2
    llm = LanguageModel(hf, tokenizer=tok)
    with llm.generate("hello there", max_new_tokens=5, min_new_tokens=5, do_sample=False) as tracer:
        chosen = tether.list().save()
        with tracer.all():
            chosen.append(int(llm.lm_head.output[0, -1].argmax()))
        out = llm.generator.output.save()
    assert chosen == _greedy(hf, tok, "hello there", 5)
    assert out[0, -5:].tolist() == chosen


def test_for_step_in_tracer_all_visits_each_step(gpt2):
    hf, tok = gpt2
    llm = LanguageModel(hf, tokenizer=tok)
    with llm.generate("hello there", max_new_tokens=3, min_new_tokens=3) as tracer:
        visited = tether.list().save()
        for step in tracer.all():
            visited.append((step, tuple(llm.transformer.h[0].output.shape)))
    assert [s for s, _ in visited] == [0, 1, 2]
    assert visited[1][1][1] == 1  # later steps see one new token
