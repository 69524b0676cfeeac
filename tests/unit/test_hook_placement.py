"""Hooks go only where a body asks, yet enclosing modules stay reachable after their children."""

import torch

from tether import LanguageModel


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
