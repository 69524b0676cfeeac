"""Issue 11 item 12: `.source` on a Hugging Face eager attention module (tiny Llama): the operations of its
forward by name; the attention probabilities read and edited through them, compared with plain Hugging
Face runs (output_attentions=True, forward hooks); the remote twin equals the local run bit for bit."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tether
from tether import LanguageModel

pytestmark = pytest.mark.timeout(120, func_only=True)

IDS = [[3, 17, 42, 7, 99, 12]]
HEAD_DIM = 8


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def served() -> dict:
    return {"llama": tiny_llama()}


@pytest.fixture
def hf() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def model(hf) -> LanguageModel:
    return LanguageModel(hf)


def test_print_lists_the_operations_of_forward_by_name(model, hf):
    attn = hf.model.layers[0].self_attn
    printed = repr(model.model.layers[0].self_attn.source)
    for label in ("self_q_proj_0", "view_0", "transpose_0", "query_states_0", "apply_rotary_pos_emb_0",
                  "attention_interface_0", "attention_interface_1", "self_o_proj_0"):
        assert f" {label} " in printed
    body = inspect.getsource(inspect.unwrap(type(attn).forward))
    assert all(line.strip() in printed for line in body.splitlines())
    with pytest.raises(AttributeError, match="no operation 'nope'"):
        model.model.layers[0].self_attn.source.nope  # noqa: B018 (the access is what is tested)


_COMPARE = """
import sys, torch, nnsight, tether
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
hf = LlamaForCausalLM(config).eval()
for path in sys.argv[1:]:
    theirs, ours = nnsight.NNsight(hf), tether.NNsight(hf)
    for part in path.split("."):
        theirs, ours = getattr(theirs, part), getattr(ours, part)
    if repr(ours.source) != repr(theirs.source):
        print("differs:", path)
"""


@pytest.mark.skipif(importlib.util.find_spec("nnsight") is None, reason="nnsight 0.8.1 (the reference) is not installed")
def test_the_listing_is_nnsights():
    """Run apart: importing nnsight patches `object` for the whole process."""
    paths = ["model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.0", "model", "lm_head"]
    done = subprocess.run([sys.executable, "-c", _COMPARE, *paths], timeout=120, capture_output=True, text=True)
    assert done.returncode == 0 and "differs" not in done.stdout, done.stdout + done.stderr


def test_attention_probabilities_read_equal_output_attentions(model, hf):
    with torch.no_grad():
        want = hf(torch.tensor(IDS), output_attentions=True).attentions
    probs = []
    with model.trace(IDS):
        for layer in model.model.layers:
            inner = layer.self_attn.source.attention_interface_1.source
            probs.append(inner.nn_functional_softmax_0.output.save())
        weights = model.model.layers[1].self_attn.source.attention_interface_1.output[1].save()
    assert all(torch.equal(p, w) for p, w in zip(probs, want))
    assert torch.equal(weights, want[1])
    assert all("forward" not in layer.self_attn.__dict__ for layer in hf.model.layers)  # restored


def _zero_head_reference(hf, layer: int, head: int) -> torch.Tensor:
    """Plain torch: a head whose probabilities are zero contributes zero to o_proj's input."""
    def pre_hook(module, args):
        x = args[0].clone()
        x[..., head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0
        return (x,)

    handle = hf.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(pre_hook)
    try:
        with torch.no_grad():
            return hf(torch.tensor(IDS)).logits
    finally:
        handle.remove()


def _edit(model: LanguageModel, **options):
    with model.trace(IDS, **options):
        softmax = model.model.layers[0].self_attn.source.attention_interface_1.source.nn_functional_softmax_0
        probs = softmax.output.clone()
        probs[:, 1] = 0
        softmax.output = probs
        logits = model.output.logits.save()
    return logits


def test_an_edit_of_the_probabilities_reaches_the_output(model, hf):
    assert torch.equal(_edit(model), _zero_head_reference(hf, 0, 1))
    with torch.no_grad():
        plain = hf(torch.tensor(IDS)).logits
    with model.trace(IDS):
        after = model.output.logits.save()
    assert torch.equal(after, plain)  # the edit and the instrumented forward are gone


def test_input_of_an_operation_reads_and_writes(model, hf):
    seen = []
    handle = hf.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        hf(torch.tensor(IDS))
    handle.remove()
    with model.trace(IDS):
        op = model.model.layers[1].self_attn.source.self_o_proj_0
        x = op.input.save()
        op.input = torch.zeros_like(x)
        out = op.output.save()
    assert torch.equal(x, seen[0])
    assert torch.equal(out, torch.zeros_like(out))  # o_proj has no bias


def test_an_operation_asked_for_after_it_ran_says_so(model):
    with pytest.raises(tether.OutOfOrderError, match="source.query_states_0"):
        with model.trace(IDS):
            model.model.layers[0].self_attn.output  # noqa: B018 (the access is what is tested)
            model.model.layers[0].self_attn.source.query_states_0.output  # noqa: B018 (the access is what is tested)


def test_source_of_an_operation_outside_a_trace_says_where_it_works(model):
    with pytest.raises(tether.NotInTraceError, match="only available inside a trace"):
        model.model.layers[0].self_attn.source.attention_interface_1.source  # noqa: B018 (the access is what is tested)


def test_generation_steps_each_serve_the_operation(model, hf):
    with torch.no_grad():
        ref = hf.generate(torch.tensor(IDS), max_new_tokens=3, min_new_tokens=3, do_sample=False,
                          output_attentions=True, return_dict_in_generate=True, pad_token_id=0)
    probs = []
    with model.generate(IDS, max_new_tokens=3) as tracer:
        for _ in tracer.iter[0:3]:
            inner = model.model.layers[0].self_attn.source.attention_interface_1.source
            probs.append(inner.nn_functional_softmax_0.output.save())
    assert len(probs) == 3
    assert all(torch.equal(p, step[0]) for p, step in zip(probs, ref.attentions))


# ---- remote twin -----------------------------------------------------------------------------------------

def test_remote_source_equals_the_local_run(client_config, model):
    remote = LanguageModel("llama")
    local = _edit(model)
    got = _edit(remote, remote=True)
    assert got.dtype == local.dtype and torch.equal(got, local)
    with model.trace(IDS):
        probs = model.model.layers[1].self_attn.source.attention_interface_1.source.nn_functional_softmax_0.output.save()
    with remote.trace(IDS, remote=True):
        r_probs = remote.model.layers[1].self_attn.source.attention_interface_1.source.nn_functional_softmax_0.output.save()
    assert torch.equal(r_probs, probs)


def test_source_of_a_module_call_or_a_builtin_says_what_to_use(model):
    with pytest.raises(tether.TetherError, match="its own `.source`"):
        with model.trace(IDS):
            model.model.layers[0].self_attn.source.self_q_proj_0.source  # noqa: B018 (the access is what is tested)
    with pytest.raises(tether.TetherError, match="works on Python functions"):
        with model.trace(IDS):
            model.model.layers[0].self_attn.source.attention_interface_1.source.torch_matmul_0.source  # noqa: B018


def test_each_invoke_edits_only_its_own_rows(model, hf):
    other = [[5, 6, 7, 8, 9, 10]]
    with model.trace() as tracer:
        with tracer.invoke(IDS):
            softmax = model.model.layers[0].self_attn.source.attention_interface_1.source.nn_functional_softmax_0
            probs = softmax.output.clone()
            probs[:, 1] = 0
            softmax.output = probs
            edited = model.output.logits.save()
        with tracer.invoke(other):
            untouched = model.output.logits.save()
    assert torch.equal(edited, _zero_head_reference(hf, 0, 1))
    with torch.no_grad():
        assert torch.equal(untouched, hf(torch.tensor(other)).logits)


def test_remote_generation_steps_equal_the_local_run(client_config, model):
    remote = LanguageModel("llama")
    with model.generate(IDS, max_new_tokens=3) as tracer:
        local_probs = list().save()
        for _ in tracer.iter[0:3]:
            inner = model.model.layers[1].self_attn.source.attention_interface_1.source
            local_probs.append(inner.nn_functional_softmax_0.output)
    with remote.generate(IDS, max_new_tokens=3, remote=True) as tracer:
        remote_probs = list().save()
        for _ in tracer.iter[0:3]:
            inner = remote.model.layers[1].self_attn.source.attention_interface_1.source
            remote_probs.append(inner.nn_functional_softmax_0.output)
    assert len(local_probs) == len(remote_probs) == 3
    assert all(torch.equal(r, p) for r, p in zip(remote_probs, local_probs))
