"""Cross-job batching in the runtime: several Programs in one batched run, each with its solo outcome.

Every job's values are compared with the same Program run alone through `execute`, and with plain Hugging
Face computations (tiny random-weight models from tether.tiny).
"""

from __future__ import annotations

import textwrap

import pytest
import torch

import tether
from tether import LanguageModel, NNsight, tiny
from tether.runtime.errors import OutOfOrderError, RunStopped
from tether.runtime.job_batch import BatchJob, batch_key, batchable, execute_batch
from tether.runtime.program import Program, execute


def lm() -> LanguageModel:
    model, tokenizer = tiny.tiny_gpt2()
    return LanguageModel(model, tokenizer=tokenizer)


def prog(source: str, *args, kind: str = "trace", **kwargs) -> Program:
    return Program(kind=kind, source=textwrap.dedent(source).lstrip("\n"), filename="job.py", first_line=3, tracer_name="tracer",
                   args=args, kwargs=kwargs)


def binds(model) -> dict:
    return {"model": model, "torch": torch, "tether": tether}


def solo(program: Program, **kw) -> dict:
    model = lm()
    return execute(model, program, binds(model), **kw)


def same(a, b, atol=1e-5) -> None:
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape, (a.shape, b.shape)
        assert torch.allclose(a.float(), b.float(), atol=atol), (a - b).abs().max()
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y, atol)
    else:
        assert a == b


def collector(lines: list):
    """A `print` that keeps its lines."""
    return lambda *args, **_: lines.append(" ".join(map(str, args)))


def run_batch(programs: list[Program], **per_job) -> tuple[list, LanguageModel]:
    model = lm()
    jobs = [BatchJob(p, binds(model), **{k: v[i] for k, v in per_job.items()}) for i, p in enumerate(programs)]
    return execute_batch(model, jobs), model


PROMPTS = ["The quick brown fox jumps over", "hi", "a b c d"]


def test_traces_with_unequal_prompts_and_different_edits_get_their_solo_values():
    programs = [
        prog("h = model.transformer.h[0].output[0].save()\nlogits = model.lm_head.output.save()\n", PROMPTS[0]),
        prog("model.transformer.h[0].output[0][:, -1] = 0\nlogits = model.lm_head.output.save()\n", PROMPTS[1]),
        prog("model.transformer.h[1].mlp.output[:] = model.transformer.h[1].mlp.output * 2\n"
             "logits = model.output.logits.save()\nn = logits.shape[1]\n", PROMPTS[2]),
    ]
    outcomes, _ = run_batch(programs)
    for program, outcome in zip(programs, outcomes):
        assert outcome.error is None, outcome.error
        assert outcome.batch_size == 3
        expected = solo(program)
        assert set(outcome.values) == set(expected)
        for name in expected:
            same(outcome.values[name], expected[name])


def test_a_batched_trace_matches_plain_hugging_face():
    model, tokenizer = tiny.tiny_gpt2()
    programs = [prog("logits = model.lm_head.output.save()\n", p) for p in PROMPTS]
    outcomes, _ = run_batch(programs)
    for prompt, outcome in zip(PROMPTS, outcomes):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            plain = model(input_ids=ids).logits
        same(outcome.values["logits"], plain)


def test_generations_with_different_max_new_tokens_and_per_step_saves():
    source = """
    steps = list().save()
    with tracer.all():
        steps.append(model.lm_head.output[0, -1].argmax(dim=-1).save())
    out = model.generator.output.save()
    """
    programs = [prog(source, PROMPTS[0], kind="generate", max_new_tokens=6),
                prog(source, PROMPTS[1], kind="generate", max_new_tokens=2),
                prog(source, PROMPTS[2], kind="generate", max_new_tokens=4)]
    outcomes, _ = run_batch(programs)
    model, tokenizer = tiny.tiny_gpt2()
    for program, outcome in zip(programs, outcomes):
        assert outcome.error is None, outcome.error
        expected = solo(program)
        same(outcome.values["out"], expected["out"])
        assert len(outcome.values["steps"]) == program.kwargs["max_new_tokens"]
        same(outcome.values["steps"], expected["steps"])
        ids = tokenizer(program.args[0], return_tensors="pt")["input_ids"]
        plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=program.kwargs["max_new_tokens"], pad_token_id=0)
        same(outcome.values["out"], plain)


def test_a_failing_job_fails_alone():
    programs = [prog("a = model.lm_head.output.save()\n", PROMPTS[0]),
                prog("h = model.transformer.h[0].output[0]\nraise ValueError('mine')\n", PROMPTS[1]),
                prog("b = model.lm_head.output.save()\n", PROMPTS[2])]
    outcomes, _ = run_batch(programs)
    assert isinstance(outcomes[1].error, ValueError) and str(outcomes[1].error) == "mine"
    same(outcomes[0].values["a"], solo(programs[0])["a"])
    same(outcomes[2].values["b"], solo(programs[2])["b"])


def test_out_of_order_access_fails_that_job_only():
    programs = [prog("a = model.transformer.h[1].output[0].save()\nb = model.transformer.h[0].output[0]\n",
                     PROMPTS[0]),
                prog("b = model.lm_head.output.save()\n", PROMPTS[1])]
    outcomes, _ = run_batch(programs)
    assert isinstance(outcomes[0].error, OutOfOrderError)
    same(outcomes[1].values["b"], solo(programs[1])["b"])


def test_a_cancelled_job_among_others():
    source = """
    with tracer.all():
        t = model.lm_head.output[0, -1].argmax(dim=-1).save()
    out = model.generator.output.save()
    """
    programs = [prog(source, p, kind="generate", max_new_tokens=5) for p in PROMPTS]
    calls = {"n": 0}

    def cancel_later() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    outcomes, _ = run_batch(programs, cancel=[None, cancel_later, None])
    assert isinstance(outcomes[1].error, RunStopped)
    for i in (0, 2):
        same(outcomes[i].values["out"], solo(programs[i])["out"])


def test_stop_ends_one_job_only():
    programs = [prog("h = model.transformer.h[0].output[0].save()\nmodel.transformer.h[0].output.stop()\n"
                     "late = model.lm_head.output.save()\n", PROMPTS[0]),
                prog("out = model.lm_head.output.save()\n", PROMPTS[1])]
    outcomes, _ = run_batch(programs)
    expected = solo(programs[0])
    same(outcomes[0].values["h"], expected["h"])
    with pytest.raises(tether.ValueNotReachedError):
        _ = outcomes[0].values["late"].shape
    same(outcomes[1].values["out"], solo(programs[1])["out"])


def test_local_blocks_and_logs_go_to_their_own_job():
    source = """
    with tracer.all():
        t = model.lm_head.output[0, -1].argmax(dim=-1)
        with tether.local():
            seen.append(int(t))
    print("done", len(seen))
    """
    programs = [prog(source, p, kind="generate", max_new_tokens=n) for p, n in zip(PROMPTS, (3, 5, 2))]
    seen = [[], [], []]
    logs = [[], [], []]
    handlers = []
    for i in range(3):
        def handler(block, ns, i=i):
            assert ns["seen"] is seen[i]
            exec(block.code(), ns)
            return {}
        handlers.append(handler)
    model = lm()
    jobs = [BatchJob(p, {**binds(model), "seen": seen[i]}, local=handlers[i],
                     log=collector(logs[i]))
            for i, p in enumerate(programs)]
    outcomes = execute_batch(model, jobs)
    for i, program in enumerate(programs):
        assert outcomes[i].error is None, outcomes[i].error
        alone = []
        solo_logs = []
        alone_model = lm()
        execute(alone_model, program, {**binds(alone_model), "seen": alone}, log=collector(solo_logs))
        assert seen[i] == alone and len(alone) == program.kwargs["max_new_tokens"]
        assert logs[i] == solo_logs


def test_done_callback_fires_for_a_job_whose_generation_ended_first():
    source = "with tracer.all():\n    t = model.lm_head.output[0, -1].save()\n"
    programs = [prog(source, PROMPTS[0], kind="generate", max_new_tokens=6),
                prog(source, PROMPTS[1], kind="generate", max_new_tokens=1)]
    model = lm()
    order = []
    execute_batch(model, [BatchJob(p, binds(model)) for p in programs], on_done=lambda i, o: order.append(i))
    assert order == [1, 0]


def test_plain_modules_batch_along_rows():
    net = NNsight(tiny.tiny_net())
    xs = [torch.rand(1, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    programs = [prog("model.layer1.output[:, 0] = 0\nout = model.output.save()\n", xs[0]),
                prog("h = model.layer1.output.save()\nout = model.output.save()\n", xs[1]),
                prog("out = model.layer2.input.save()\n", xs[2])]
    outcomes = execute_batch(net, [BatchJob(p, {"model": net}) for p in programs])
    for program, outcome in zip(programs, outcomes):
        alone_net = NNsight(tiny.tiny_net())
        alone = execute(alone_net, program, {"model": alone_net})
        for name in alone:
            same(outcome.values[name], alone[name], atol=1e-6)  # batched GEMMs round differently


def test_what_runs_alone():
    model = lm()
    assert batchable(prog("x = model.output.save()\n", "a")) == ""
    assert "session" in batchable(prog("x = 1\n", kind="session"))
    assert "grad" in batchable(prog("g = model.lm_head.output.grad\n", "a"))
    assert "weight" in batchable(prog("model.lm_head.weight[:] = 0\n", "a"))
    assert batch_key(model, prog("x = 1\n", "a", kind="generate")) is None  # no max_new_tokens
    a = batch_key(model, prog("x = 1\n", "a", kind="generate", max_new_tokens=3))
    b = batch_key(model, prog("y = 2\n", "bb", kind="generate", max_new_tokens=9))
    c = batch_key(model, prog("y = 2\n", "bb", kind="generate", max_new_tokens=9, do_sample=True))
    assert a == b and a != c


def test_open_step_loops_end_with_each_jobs_own_generation():
    source = """
    tokens = list().save()
    for step in tracer.iter[:]:
        tokens.append(model.lm_head.output[0, -1].argmax(dim=-1))
    after = len(tokens)
    """
    programs = [prog(source, p, kind="generate", max_new_tokens=n) for p, n in zip(PROMPTS, (5, 2, 3))]
    outcomes, _ = run_batch(programs)
    for program, outcome in zip(programs, outcomes):
        assert outcome.error is None, outcome.error
        expected = solo(program)
        assert outcome.values["after"] == expected["after"] == program.kwargs["max_new_tokens"]
        same(outcome.values["tokens"], expected["tokens"])


def test_a_job_that_reaches_eos_stops_receiving_steps():
    model, tokenizer = tiny.tiny_gpt2()
    ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                           pad_token_id=0)
    eos = int(plain[0, ids.shape[1] + 1])  # the token this prompt generates second: its end of sequence here
    source = """
    steps = list().save()
    with tracer.all():
        steps.append(model.lm_head.output[0, -1].argmax(dim=-1))
    out = model.generator.output.save()
    """
    programs = [prog(source, p, kind="generate", max_new_tokens=6, eos_token_id=eos) for p in PROMPTS]
    outcomes, _ = run_batch(programs)
    for program, outcome in zip(programs, outcomes):
        assert outcome.error is None, outcome.error
        expected = solo(program)
        same(outcome.values["out"], expected["out"])
        assert len(outcome.values["steps"]) == len(expected["steps"])
        same(outcome.values["steps"], expected["steps"])
    assert outcomes[1].values["out"].shape[1] <= ids.shape[1] + 2


def test_changing_the_shape_of_a_batched_value_fails_that_job_at_its_line():
    programs = [prog("model.transformer.h[0].output = torch.zeros(7)\nx = 1\n", PROMPTS[0]),
                prog("out = model.lm_head.output.save()\n", PROMPTS[1])]
    outcomes, _ = run_batch(programs)
    assert "cannot replace" in str(outcomes[0].error)
    assert outcomes[0].error.__traceback__.tb_frame.f_code.co_filename == "job.py"
    same(outcomes[1].values["out"], solo(programs[1])["out"])


def test_jobs_of_several_rows_keep_their_rows():
    rows = ["a b c", "c b a"]  # equal lengths: the job's own batch has no padding
    assert len({len(lm().tokenizer(r)["input_ids"]) for r in rows}) == 1
    programs = [prog("out = model.lm_head.output.save()\n", rows),
                prog("model.transformer.h[0].output[0][:] = 0\nout = model.lm_head.output.save()\n", PROMPTS[0])]
    outcomes, _ = run_batch(programs)
    for program, outcome in zip(programs, outcomes):
        same(outcome.values["out"], solo(program)["out"])


@pytest.mark.slow
def test_smollm2_batches_unequal_prompts_with_their_own_positions(smollm2):
    """Rotary positions follow each row's real tokens: a batched job gets its solo logits and tokens (the
    tolerance is float32 rounding of batched matrix products, not padding: a wrong position moves logits by ~1)."""
    module, tokenizer = smollm2
    model = LanguageModel(module, tokenizer=tokenizer)
    prompts = ["The Eiffel Tower is in the city of", "Hi", "One two three four"]
    source = """
    steps = list().save()
    with tracer.all():
        steps.append(model.lm_head.output[0, -1])
    out = model.generator.output.save()
    """
    for kind, extra in (("trace", {}), ("generate", {"max_new_tokens": 3})):
        text = source if kind == "generate" else "logits = model.lm_head.output.save()\n"
        programs = [prog(text, p, kind=kind, **extra) for p in prompts]
        outcomes = execute_batch(model, [BatchJob(p, {"model": model}) for p in programs])
        for program, outcome in zip(programs, outcomes):
            expected = execute(model, program, {"model": model})
            for name in expected:
                same(outcome.values[name], expected[name], atol=2e-4)


def test_a_job_holds_no_view_of_other_jobs_rows():
    source = """
    h = model.transformer.h[0].output
    base = h._base
    nbytes = h.untyped_storage().nbytes()
    own = h.numel() * h.element_size()
    h[:, 0] = 1.0
    out = model.lm_head.output.save()
    """
    programs = [prog(source, p) for p in PROMPTS]
    outcomes, _ = run_batch(programs)
    for program, outcome in zip(programs, outcomes):
        assert outcome.values["base"] is None
        assert outcome.values["nbytes"] == outcome.values["own"]
        same(outcome.values["out"], solo(program)["out"])  # its in-place edit reached its own rows


def test_objects_the_batch_shares_are_withheld_from_a_job():
    source = """
    out = model.output
    shared = [k for k in out.keys() if not isinstance(out[k], torch.Tensor)]
    try:
        out[shared[0]].get_seq_length()
        message = ""
    except tether.TetherError as error:
        message = str(error)
    logits = out.logits.save()
    """
    programs = [prog(source, p) for p in PROMPTS[:2]]
    outcomes, _ = run_batch(programs)
    for program, outcome in zip(programs, outcomes):
        assert outcome.error is None, outcome.error
        assert "shared by every job" in outcome.values["message"]  # the key/value cache holds every job's rows
        same(outcome.values["logits"], solo(program)["logits"])


def test_a_generation_stopped_by_its_body_ends_alone():
    stopping = """
    tokens = list().save()
    with tracer.all():
        tokens.append(model.lm_head.output[0, -1].argmax(dim=-1))
        if len(tokens) == 2:
            tracer.stop()
    """
    plain = "with tracer.all():\n    t = model.lm_head.output[0, -1].save()\nout = model.generator.output.save()\n"
    programs = [prog(stopping, PROMPTS[0], kind="generate", max_new_tokens=5),
                prog(plain, PROMPTS[1], kind="generate", max_new_tokens=5)]
    outcomes, _ = run_batch(programs)
    expected = solo(programs[0])
    assert len(outcomes[0].values["tokens"]) == len(expected["tokens"]) == 2
    same(outcomes[0].values["tokens"], expected["tokens"])
    same(outcomes[1].values["out"], solo(programs[1])["out"])


@pytest.mark.slow
def test_smollm2_padding_is_exact_and_batched_values_are_plain_transformers_values(smollm2):
    """Where a batched job's values differ from its solo run, plain transformers on the same padded batch differs
    the same way, bit for bit: the difference is the matrix kernels' rounding for another number of rows, not
    tether's padding, mask or positions (a prompt padded alone gives its solo logits bit for bit)."""
    from tether.runtime.job_rows import pad_rows

    module, tokenizer = smollm2
    model = LanguageModel(module, tokenizer=tokenizer)
    prompts = ["Hi there, how are you", "The Eiffel Tower is in the city of Paris, which is in"]
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    ids, mask, positions = pad_rows(rows, model._pad_id(), torch.device("cpu"))
    with torch.no_grad():
        alone = module(input_ids=torch.tensor([rows[0]])).logits
        padded = module(input_ids=ids[:1], attention_mask=mask[:1], position_ids=positions[:1]).logits
        assert torch.equal(padded[0, -len(rows[0]):], alone[0])
        reference = module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True,
                                    pad_token_id=model._pad_id())
    source = """
    steps = list().save()
    with tracer.all():
        steps.append(model.lm_head.output[:, -1])
    out = model.generator.output.save()
    """
    programs = [prog(source, p, kind="generate", max_new_tokens=3) for p in prompts]
    outcomes = execute_batch(model, [BatchJob(p, {"model": model}) for p in programs])
    for row, (program, outcome) in enumerate(zip(programs, outcomes)):
        assert outcome.error is None, outcome.error
        for step, logits in zip(outcome.values["steps"], reference.logits):
            assert torch.equal(step[0], logits[row])  # tether's batched run is transformers' padded batch
        assert torch.equal(outcome.values["out"][0], reference.sequences[row, -outcome.values["out"].shape[1]:])
        expected = execute(model, program, {"model": model})
        same(outcome.values["steps"], expected["steps"], atol=2e-4)  # float32 rounding of other matrix shapes
