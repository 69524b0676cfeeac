"""Issue 11 item 10: `tracer.cache(...)`, compared with plain Hugging Face runs with forward hooks; the remote
twins run the same body on a loopback server and compare with the local run bit for bit."""

from __future__ import annotations

import pytest
import torch

import tether
from tether import LanguageModel, tiny

PROMPT = "The quick brown fox"
OTHER = "Hello"

pytestmark = pytest.mark.timeout(120, func_only=True)


def served() -> dict:
    return {"tiny": tiny.tiny_gpt2()}


def _hooked(model: torch.nn.Module, modules: dict, run, *, inputs: bool = False) -> dict:
    """What plain forward hooks see: {name: [output (or (args, kwargs)) of every call]} while `run()` runs."""
    seen = {name: [] for name in modules}
    handles = []
    for name, module in modules.items():
        if inputs:
            handles.append(module.register_forward_pre_hook(
                lambda m, a, k, name=name: seen[name].append((a, k)), with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(lambda m, a, o, name=name: seen[name].append(o)))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_every_module_by_path_and_by_navigation(llm):
    hf = llm._module
    with llm.trace(PROMPT) as tracer:
        cache = tracer.cache()
    ids = torch.tensor([llm.tokenizer(PROMPT)["input_ids"]])
    modules = dict(hf.named_modules())
    seen = _hooked(hf, {"h0": modules["transformer.h.0"], "ln_f": modules["transformer.ln_f"],
                        "lm_head": modules["lm_head"]}, lambda: hf(ids))
    assert torch.equal(cache["model.transformer.h.0"].output[0], seen["h0"][0][0])
    assert torch.equal(cache.model.transformer.h[0].output[0], seen["h0"][0][0])
    assert torch.equal(cache.transformer.h[-1].output[0], cache["model.transformer.h.1"].output[0])
    assert torch.equal(cache.model.transformer.ln_f.output, seen["ln_f"][0])
    assert torch.equal(cache["model.lm_head"].output, seen["lm_head"][0])
    assert torch.equal(cache.model.output.logits, seen["lm_head"][0])
    assert "model.transformer.h.0.mlp" in cache and "model.nowhere" not in cache
    assert not cache.model.transformer.h[0].output[0].requires_grad


def test_selected_modules_cast_inputs_and_generation_steps(llm):
    hf, tok = llm._module, llm.tokenizer
    with llm.generate(PROMPT, max_new_tokens=3) as tracer:
        cache = tracer.cache(modules=[llm.lm_head, "model.transformer.h.1"], dtype=torch.float16,
                             include_inputs=True)
    batch = tok([PROMPT], return_tensors="pt")
    seen_out = _hooked(hf, {"lm_head": hf.lm_head}, lambda: hf.generate(
        **batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0))
    seen_in = _hooked(hf, {"lm_head": hf.lm_head}, lambda: hf.generate(
        **batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0), inputs=True)
    assert sorted(cache.keys()) == ["model.lm_head", "model.transformer.h.1"]
    outputs = cache.model.lm_head.output
    assert isinstance(outputs, list) and len(outputs) == len(cache["model.lm_head"]) == 3
    for got, want in zip(outputs, seen_out["lm_head"]):
        assert got.dtype == torch.float16 and torch.equal(got, want.to(torch.float16))
    for got, (args, _) in zip(cache.lm_head.input, seen_in["lm_head"]):
        assert torch.equal(got, args[0].to(torch.float16))
    with pytest.raises(AttributeError, match="not a cached module"):
        cache.model.transformer.h[0]


def test_values_are_recorded_after_the_bodys_edits(llm):
    with llm.trace(PROMPT) as tracer:
        cache = tracer.cache(modules=[llm.transformer.h[0].mlp, llm.transformer.h[1].mlp])
        llm.transformer.h[0].mlp.output[:] = 0
        llm.transformer.h[1].mlp.output = llm.transformer.h[1].mlp.output * 2
        doubled = llm.transformer.h[1].mlp.output.save()
    assert torch.count_nonzero(cache.model.transformer.h[0].mlp.output) == 0
    assert torch.equal(cache.model.transformer.h[1].mlp.output, doubled)


def test_each_invoke_caches_its_own_rows(llm):
    with llm.trace() as tracer:
        with tracer.invoke(PROMPT):
            first = tracer.cache(modules=["model.transformer.ln_f"])
        with tracer.invoke(OTHER):
            second = tracer.cache(modules=["model.transformer.ln_f"])
            both = llm.transformer.ln_f.output.save()
    assert first.model.transformer.ln_f.output.shape[0] == second.model.transformer.ln_f.output.shape[0] == 1
    assert torch.equal(second.model.transformer.ln_f.output, both)


def test_cache_after_a_module_value_says_to_declare_it_first(llm):
    with pytest.raises(tether.TetherError, match="before reading"):
        with llm.trace(PROMPT) as tracer:
            llm.transformer.h[0].output  # noqa: B018 (the access is what is tested)
            tracer.cache()


def test_detach_false_keeps_the_graph(llm):
    with llm.trace(PROMPT) as tracer:
        cache = tracer.cache(modules=[llm.transformer.ln_f], detach=False, device=None)
    assert cache.model.transformer.ln_f.output.grad_fn is not None


# ---- remote twins -------------------------------------------------------------------------------------

@pytest.fixture
def rllm(client_config):
    return LanguageModel("tiny")


def test_remote_cache_equals_the_local_one(llm, rllm):
    with llm.trace(PROMPT) as tracer:
        cache = tracer.cache(dtype=torch.float16)
    with rllm.trace(PROMPT, remote=True) as tracer:
        r_cache = tracer.cache(dtype=torch.float16)
    assert type(r_cache) is type(cache) and r_cache.keys() == cache.keys()
    for key in cache.keys():
        local, remote = cache[key].output, r_cache[key].output
        if isinstance(local, torch.Tensor):
            assert remote.dtype == torch.float16 and torch.equal(local, remote)
    assert torch.equal(r_cache.model.transformer.h[1].output[0], cache.model.transformer.h[1].output[0])
    assert torch.equal(r_cache.model.output.logits, cache.model.output.logits)


def test_remote_generation_cache_equals_the_local_one(llm, rllm):
    with llm.generate(PROMPT, max_new_tokens=3) as tracer:
        cache = tracer.cache(modules=[llm.lm_head])
    with rllm.generate(PROMPT, max_new_tokens=3, remote=True) as tracer:
        r_cache = tracer.cache(modules=[rllm.lm_head])
    assert len(r_cache.model.lm_head.output) == 3
    for local, remote in zip(cache.model.lm_head.output, r_cache.model.lm_head.output):
        assert torch.equal(local, remote)


def test_keys_are_the_modules_that_ran_in_the_order_they_finished(llm):
    hf = llm._module
    finished: list[str] = []
    handles = [module.register_forward_hook(lambda m, a, o, name=name: finished.append(name))
               for name, module in hf.named_modules()]
    try:
        with torch.no_grad():
            hf(torch.tensor([llm.tokenizer(PROMPT)["input_ids"]]))
    finally:
        for handle in handles:
            handle.remove()
    with llm.trace(PROMPT) as tracer:
        cache = tracer.cache()
    assert cache.keys() == [f"model.{name}" if name else "model" for name in finished]


def test_a_cache_leaves_no_hook_behind(llm):
    with llm.generate(PROMPT, max_new_tokens=2) as tracer:
        tracer.cache(include_inputs=True)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in llm._module.modules())
