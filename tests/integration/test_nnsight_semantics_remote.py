"""Issue 11: the nnsight 0.8.1 semantics of test_nnsight_semantics.py, run remotely on a loopback server.

Each test runs the same body locally (a fresh tiny GPT-2) and with `remote=True` (the same model, served), and
compares the results bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from tether import tiny

LONG = "The Eiffel Tower is in the city of"
SHORT = "hello"

pytestmark = [pytest.mark.usefixtures("client_config"), pytest.mark.timeout(60, func_only=True)]


def served() -> dict:
    return {"tiny": tiny.tiny_gpt2()}


def _same(a, b) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b)


def test_padded_invokes_remote_equal_local(llm, rllm):
    with llm.trace() as tracer:
        with tracer.invoke(LONG):
            long_logits = llm.output.logits.save()
        with tracer.invoke([SHORT, LONG]):
            pair = llm.output.logits.save()
    with rllm.trace(remote=True) as tracer:
        with tracer.invoke(LONG):
            r_long_logits = rllm.output.logits.save()
        with tracer.invoke([SHORT, LONG]):
            r_pair = rllm.output.logits.save()
    _same(long_logits, r_long_logits)
    _same(pair, r_pair)


def test_padded_generation_remote_equals_local(llm, rllm):
    with llm.generate([LONG, SHORT], max_new_tokens=4, min_new_tokens=4):
        tokens = llm.generator.output.save()
    with rllm.generate([LONG, SHORT], max_new_tokens=4, min_new_tokens=4, remote=True):
        r_tokens = rllm.generator.output.save()
    _same(tokens, r_tokens)


def test_per_module_next_remote_equals_local(llm, rllm):
    with llm.generate(LONG, max_new_tokens=3, min_new_tokens=3):
        h1 = llm.transformer.h[-1].next().output.save()
        t1 = llm.lm_head.next().output.save()
        t2 = llm.lm_head.next().output.save()
    with rllm.generate(LONG, max_new_tokens=3, min_new_tokens=3, remote=True):
        r_h1 = rllm.transformer.h[-1].next().output.save()
        r_t1 = rllm.lm_head.next().output.save()
        r_t2 = rllm.lm_head.next().output.save()
    for a, b in ((h1, r_h1), (t1, r_t1), (t2, r_t2)):
        _same(a, b)


def test_tracer_result_remote_equals_local(llm, rllm):
    with llm.generate(LONG, max_new_tokens=3) as tracer:
        ids = tracer.result.save()
    with rllm.generate(LONG, max_new_tokens=3, remote=True) as tracer:
        r_ids = tracer.result.save()
    _same(ids, r_ids)
    with llm.trace(LONG) as tracer:
        logits = tracer.result.logits.save()
    with rllm.trace(LONG, remote=True) as tracer:
        r_logits = tracer.result.logits.save()
    _same(logits, r_logits)


def test_skip_remote_equals_local(llm, rllm):
    with llm.trace(LONG):
        llm.transformer.h[0].skip(llm.transformer.h[0].input)
        logits = llm.output.logits.save()
    with rllm.trace(LONG, remote=True):
        rllm.transformer.h[0].skip(rllm.transformer.h[0].input)
        r_logits = rllm.output.logits.save()
    _same(logits, r_logits)


def test_barrier_and_empty_invoke_remote_equal_local(llm, rllm):
    def run(model, **options):
        with model.generate(max_new_tokens=2, min_new_tokens=2, **options) as tracer:
            barrier = tracer.barrier(2)
            with tracer.invoke("The Vatican is in the city of"):
                embeddings = model.transformer.wte.output
                barrier()
            with tracer.invoke("The Colosseum is in the city of"):
                barrier()
                model.transformer.wte.output = embeddings
            with tracer.invoke():
                tokens = model.generator.output.save()
        return tokens

    _same(run(llm), run(rllm, remote=True))


def test_iter_list_and_logit_lens_remote_equal_local(llm, rllm):
    def run(model, **options):
        with model.generate(LONG, max_new_tokens=3, min_new_tokens=3, **options) as tracer:
            heads = list().save()
            for _ in tracer.iter[[0, 2]]:
                heads.append(model.lm_head(model.transformer.ln_f(model.transformer.h[0].output)))
        return heads

    local, remote = run(llm), run(rllm, remote=True)
    assert len(local) == len(remote) == 2
    for a, b in zip(local, remote):
        _same(a, b)


def test_older_step_spellings_remote_equal_local(llm, rllm):
    def run(model, **options):
        with model.generate(LONG, max_new_tokens=3, min_new_tokens=3, **options) as tracer:
            ranged, every = list().save(), list().save()
            with tracer.iter[0:2]:
                ranged.append(model.lm_head.output)
            with model.all():
                every.append(model.lm_head.output)
        return ranged + every

    local, remote = run(llm), run(rllm, remote=True)
    assert len(local) == len(remote) == 4  # steps 0, 1, then `.all()` from the step the body is at: 1, 2
    for a, b in zip(local, remote):
        _same(a, b)
