"""Hooks go only where a body asks, yet enclosing modules stay reachable after their children."""

import pytest
import torch

from tether import LanguageModel
from tether.runtime.errors import OutOfOrderError


def _reference(hf, ids, modules):
    seen = {}
    handles = [m.register_forward_hook(lambda mod, a, o, name=name: seen.__setitem__(name, o))
               for name, m in modules.items()]
    try:
        with torch.no_grad():
            logits = hf(ids).logits
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def test_enclosing_module_after_its_child(gpt2):
    hf, tok = gpt2
    llm = LanguageModel(hf, tokenizer=tok)
    ids = torch.tensor([tok("The Eiffel Tower is in the city of")["input_ids"]])
    with torch.no_grad(), llm.trace(ids):
        mlp = llm.transformer.h[1].mlp.output.save()
        block = llm.transformer.h[1].output.save()
        body = llm.transformer.output.last_hidden_state.save()
        logits = llm.output.logits.save()
    block_module = hf.transformer.h[1]
    seen, ref_logits = _reference(hf, ids, {"mlp": block_module.mlp, "block": block_module,
                                            "body": hf.transformer})
    assert torch.equal(mlp, seen["mlp"])
    assert torch.equal(block, seen["block"] if isinstance(seen["block"], torch.Tensor) else seen["block"][0])
    assert torch.equal(body, seen["body"].last_hidden_state)
    assert torch.equal(logits, ref_logits)


def test_only_requested_modules_and_their_ancestors_are_hooked(gpt2):
    hf, tok = gpt2
    llm = LanguageModel(hf, tokenizer=tok)
    counts = {}

    def watch(module, args, output):
        hooked = [name for name, m in hf.named_modules() if m._forward_hooks]
        counts["hooked"] = hooked

    handle = hf.transformer.h[1].mlp.c_proj.register_forward_hook(watch)
    try:
        with llm.trace("hello"):
            llm.transformer.h[1].mlp.output.save()
    finally:
        handle.remove()
    # the root is not hooked in a single pass: its output is what the forward call returns
    assert set(counts["hooked"]) == {"transformer", "transformer.h.1", "transformer.h.1.mlp",
                                     "transformer.h.1.mlp.c_proj"}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in hf.modules())


def test_a_repeated_body_hooks_up_front_only_what_it_asked_for_last_time(gpt2):
    """The second run of the same body registers its hooks before the forward pass (the hook plan); a
    planned hook that this run does not need changes nothing, and the plan forgets it afterwards."""
    hf, tok = gpt2
    llm = LanguageModel(hf, tokenizer=tok)
    ids = torch.tensor([tok("The Eiffel Tower is in the city of")["input_ids"]])
    blocks = hf.transformer.h

    def run(read_first: bool):
        with torch.no_grad(), llm.trace(ids):
            first = llm.transformer.h[0].output.save() if read_first else None
            second = llm.transformer.h[1].output.save()
        return first, second

    seen, _ = _reference(hf, ids, {"first": blocks[0], "second": blocks[1]})
    as_tensor = {k: v if isinstance(v, torch.Tensor) else v[0] for k, v in seen.items()}
    for read_first in (True, True, False, False, True):
        first, second = run(read_first)
        assert torch.equal(second, as_tensor["second"])
        assert first is None or torch.equal(first, as_tensor["first"])
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in hf.modules())
    plans = list(llm._caches.plans.values())
    assert [{id(m) for m, _ in plan.hooks} for plan in plans] == [{id(blocks[0]), id(hf.transformer), id(blocks[1])}]


def test_a_planned_hook_does_not_change_out_of_order_errors(gpt2):
    hf, tok = gpt2
    llm = LanguageModel(hf, tokenizer=tok)
    for backwards in (False, True):  # the first run plans hooks on both blocks
        if backwards:
            with pytest.raises(OutOfOrderError), llm.trace("hello"):
                llm.transformer.h[1].output.save()
                llm.transformer.h[0].output.save()
        else:
            with llm.trace("hello"):
                llm.transformer.h[0].output.save()
                llm.transformer.h[1].output.save()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in hf.modules())



def test_the_copies_server_jobs_run_on_share_the_models_hook_plans(gpt2):
    """A server job runs on `_edited_copy()` of its replica: what one job's body asked for is planned for the next."""
    hf, tok = gpt2
    llm = LanguageModel(hf, tokenizer=tok)
    ids = torch.tensor([tok("The Eiffel Tower is in the city of")["input_ids"]])
    seen, _ = _reference(hf, ids, {"block": hf.transformer.h[1]})
    expected = seen["block"] if isinstance(seen["block"], torch.Tensor) else seen["block"][0]
    for _ in range(2):
        job_root = llm._edited_copy()
        with torch.no_grad(), job_root.trace(ids):
            out = job_root.transformer.h[1].output.save()
        assert torch.equal(out if isinstance(out, torch.Tensor) else out[0], expected)
    plans = list(llm._caches.plans.values())
    assert [[m for m, _ in plan.hooks] for plan in plans] == [[hf.transformer.h[1], hf.transformer]]


def test_each_server_replica_plans_hooks_on_its_own_modules(gpt2):
    """Replicas are deep copies run by separate workers: a plan made on one must never hook another's modules."""
    from tether.server.registry import HostedModel, wrap

    hf, tok = gpt2
    hosted = HostedModel("m", wrap((hf, tok)))
    ids = torch.tensor([tok("The Eiffel Tower is in the city of")["input_ids"]])
    replicas = [hosted.replica(0), hosted.replica(1)]
    outs = []
    for replica in replicas:
        job_root = replica._edited_copy()
        with torch.no_grad(), job_root.trace(ids):
            out = job_root.transformer.h[1].output.save()
        outs.append(out if isinstance(out, torch.Tensor) else out[0])
        hooked = {id(m) for plan in replica._caches.plans.values() for m, _ in plan.hooks}
        assert hooked == {id(replica._module.transformer.h[1]), id(replica._module.transformer)}
    assert torch.equal(outs[0], outs[1])


def test_a_hook_plan_never_changes_what_a_body_sees(gpt2):
    """A planned hook that this run's bodies did not ask for acts as if absent: the same body gives the
    same outcome whatever ran before it (here: an out-of-order read that a stop in another invoke ends
    quietly, with and without hooks planned by an earlier run that read the module first)."""
    hf, tok = gpt2
    llm = LanguageModel(hf, tokenizer=tok)
    seen, _ = _reference(hf, torch.tensor([tok("hello")["input_ids"]]), {"block": hf.transformer.h[1]})
    expected = seen["block"] if isinstance(seen["block"], torch.Tensor) else seen["block"][0]

    def run(read_first: bool) -> torch.Tensor:
        with torch.no_grad(), llm.trace() as tracer:
            with tracer.invoke("hello"):
                if read_first:
                    llm.transformer.h[0].output.save()
                b = llm.transformer.h[1].output.save()
                llm.transformer.h[0].output.save()  # a re-read after reading it first; out of order otherwise
            with tracer.invoke("hello"):
                llm.transformer.h[1].output.save()
                tracer.stop()
        return b if isinstance(b, torch.Tensor) else b[0]

    for read_first in (False, True, False, False):
        assert torch.equal(run(read_first), expected)
