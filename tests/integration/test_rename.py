"""Issue 11 item 11: `rename=` aliases in traces, cache keys and print(model), compared with the native
names on the same model; a server's declared aliases reach the remote skeleton and its jobs."""

from __future__ import annotations

import pytest
import torch

import tether
from tether import LanguageModel, NNsight, tiny

PROMPT = "The quick brown fox"
RENAME = {"transformer.h": "layers", "attn": ["attention", "self_attn"], "mlp": "ff"}

pytestmark = pytest.mark.timeout(120, func_only=True)


def served() -> dict:
    model, tok = tiny.tiny_gpt2()
    return {"tiny": LanguageModel(model, tokenizer=tok, rename=RENAME)}


@pytest.fixture
def renamed() -> LanguageModel:
    model, tok = tiny.tiny_gpt2()
    return LanguageModel(model, tokenizer=tok, rename=RENAME)


def test_aliases_name_the_same_modules_in_a_trace(renamed, llm):
    with llm.trace(PROMPT):
        want = llm.transformer.h[0].attn.output[0].save()
        mlp = llm.transformer.h[1].mlp.output.save()
    with renamed.trace(PROMPT):
        got = renamed.layers[0].attention.output[0].save()
        also = renamed.transformer.h[0].self_attn.output[0].save()
        ff = renamed.layers[1].ff.output.save()
    assert torch.equal(got, want) and torch.equal(also, want) and torch.equal(ff, mlp)
    assert renamed.layers[0].attention is renamed.transformer.h[0].attn


def test_an_edit_through_an_alias_is_the_edit_through_the_native_name(renamed, llm):
    with llm.trace(PROMPT):
        llm.transformer.h[0].mlp.output[:] = 0
        want = llm.lm_head.output.save()
    with renamed.trace(PROMPT):
        renamed.layers[0].ff.output[:] = 0
        got = renamed.lm_head.output.save()
    assert torch.equal(got, want)


def test_print_shows_aliases_before_the_native_name(renamed, llm):
    printed = repr(renamed)
    assert "(attention/self_attn/attn): GPT2Attention(" in printed and "(ff/mlp): GPT2MLP(" in printed
    assert "(layers): ModuleList(" in printed
    plain = printed.replace("attention/self_attn/", "").replace("ff/", "")
    assert plain.split("\n  (layers)")[0] + "\n)" == repr(llm._module)


def test_cache_keys_are_native_paths_and_aliases_navigate(renamed):
    with renamed.trace(PROMPT) as tracer:
        cache = tracer.cache()
        want = renamed.transformer.h[1].mlp.output.save()
    assert "model.transformer.h.1.mlp" in cache.keys()
    assert torch.equal(cache.model.layers[1].ff.output, want)
    assert torch.equal(cache["model.layers.1.ff"].output, want)
    assert "model.layers.0.attention" in cache


def test_class_keys_and_clashes():
    net = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    model = NNsight(net, rename={torch.nn.ReLU: "act"})
    x = torch.rand(1, 2)
    with model.trace(x):
        out = model[0].act.output.save()
    assert torch.equal(out, torch.relu(net[0][0](x)))
    with pytest.raises(tether.TetherError, match="would hide"):
        NNsight(tiny.tiny_net(), rename={"layer1": "layer2"})
    with pytest.raises(tether.TetherError, match="would hide"):
        NNsight(tiny.tiny_net(), rename={"layer1": "output"})


# ---- remote ----------------------------------------------------------------------------------------------

def test_a_servers_aliases_reach_the_skeleton_and_its_jobs(client_config, renamed):
    remote = LanguageModel("tiny")
    assert repr(remote) == repr(renamed)
    with renamed.trace(PROMPT) as tracer:
        cache = tracer.cache(modules=[renamed.layers[1].ff])
        want = renamed.layers[0].attention.output[0].save()
    with remote.trace(PROMPT, remote=True) as tracer:
        r_cache = tracer.cache(modules=[remote.layers[1].ff])
        got = remote.layers[0].attention.output[0].save()
    assert torch.equal(got, want)
    assert torch.equal(r_cache.model.layers[1].ff.output, cache.model.layers[1].ff.output)


def test_a_clients_own_aliases_work_in_its_remote_jobs(client_config, llm):
    remote = LanguageModel("tiny", rename={"ln_f": "final_norm", "h": "blocks"})
    local = LanguageModel(llm._module, tokenizer=llm.tokenizer,
                          rename={**RENAME, "ln_f": "final_norm", "h": "blocks"})  # the server's and the client's
    assert repr(remote) == repr(local)
    with local.trace(PROMPT):
        block = local.transformer.blocks[1].ff.output.save()
        want = local.transformer.final_norm.output.save()
    with remote.trace(PROMPT, remote=True):
        r_block = remote.transformer.blocks[1].ff.output.save()
        got = remote.transformer.final_norm.output.save()
    assert torch.equal(got, want) and torch.equal(r_block, block)
    plain = LanguageModel("tiny")
    with pytest.raises(tether.RemoteError, match="final_norm"):
        with plain.trace(PROMPT, remote=True):
            plain.transformer.final_norm.output.save()


def test_wildcard_keys_and_dotted_aliases(llm):
    model = LanguageModel(llm._module, tokenizer=llm.tokenizer,
                          rename={"*.h": "layers", "attn.c_proj": "attn.o_proj"})
    with llm.trace(PROMPT):
        want = llm.transformer.h[1].attn.c_proj.output.save()
    with model.trace(PROMPT):
        got = model.layers[1].attn.o_proj.output.save()
    assert torch.equal(got, want)
    assert "(o_proj/c_proj): Conv1D(" in repr(model)
    with pytest.raises(tether.TetherError, match="prefix must start"):
        LanguageModel(llm._module, tokenizer=llm.tokenizer, rename={"attn.c_proj": "mlp.o_proj"})
