"""Devices and dtypes: a model served in bfloat16 (and, on a CUDA machine, on a GPU) gives the same values,
bit for bit, as the same model run locally; LanguageModel(path, dtype=, device_map=) matches plain Hugging
Face. Saved values come back as CPU tensors in the dtype they had on the server."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tether import LanguageModel, tiny
from tether.placement_options import Placement
from tether.server.registry import load_model

PROMPT = "The quick brown fox"
BF16 = Placement(dtype=torch.bfloat16)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")


def served() -> dict:
    models = {"tiny": load_model("tiny", BF16)}
    if torch.cuda.is_available():
        models["tiny_cuda"] = load_model("tiny", Placement(device="cuda:0"))
        models["tiny_cuda_bf16"] = load_model("tiny", Placement(device="cuda:0", dtype=torch.bfloat16))
    return models


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    model, tokenizer = tiny.tiny_gpt2()
    directory = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _local(placement: Placement) -> LanguageModel:
    model, tokenizer = load_model("tiny", placement)
    return LanguageModel(model, tokenizer=tokenizer)


def _run(model: LanguageModel, **options):
    with model.trace(PROMPT, **options):
        hidden = model.transformer.h[0].output[0].save()
        logits = model.lm_head.output.save()
    return hidden, logits


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
    assert torch.equal(a, b)


def test_remote_bfloat16_equals_local_bfloat16_bit_for_bit(rllm):
    local = _run(_local(BF16))
    remote = _run(rllm, remote=True)
    for r, loc in zip(remote, local):
        assert r.dtype == torch.bfloat16 and r.device.type == "cpu"
        _same(r, loc)
    assert not torch.equal(local[1].float(), _run(_local(Placement()))[1])  # bf16 really ran: values differ


def test_remote_bfloat16_setting_a_value_and_generating(rllm):
    def generate(model: LanguageModel, **options) -> torch.Tensor:
        with model.generate(PROMPT, max_new_tokens=3, **options):
            model.transformer.h[0].output[0][:, -1] = 0
            tokens = model.generator.output.save()
        return tokens

    _same(generate(rllm, remote=True), generate(_local(BF16)))


def test_model_info_shows_the_served_dtype(client_config):
    from tether.client.admin import Admin

    with Admin(client_config.address) as admin:
        info = {m.name: m for m in admin.models()}["tiny"]
    assert (info.device, info.replicas) == ("cpu", 1)
    from tether.v1 import values_pb2

    assert info.data_type == values_pb2.DATA_TYPE_BFLOAT16


@pytest.mark.parametrize("option, device_map", [("dtype", "cpu"), ("torch_dtype", "auto")])
def test_language_model_from_a_directory_in_bfloat16_equals_plain_hugging_face(saved_dir, option, device_map):
    model = LanguageModel(str(saved_dir), **{option: "bfloat16"}, device_map=device_map)
    assert next(model._module.parameters()).dtype == torch.bfloat16  # the skeleton too: scans report it
    hidden, logits = _run(model)
    reference = AutoModelForCausalLM.from_pretrained(saved_dir, dtype=torch.bfloat16).eval()
    ids = model.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = reference(**ids, output_hidden_states=True)
    _same(logits, out.logits)
    _same(hidden, out.hidden_states[1][0])  # (a GPT2Block returns its hidden states: [0] is the first row)


def test_a_device_map_spreads_a_served_model_and_it_runs_as_before():
    model, tokenizer = load_model("tiny", Placement(device_map="auto", dtype=torch.bfloat16))
    if not torch.cuda.is_available():  # (on GPUs a model this small may sit on fewer than all of them)
        assert set(model.hf_device_map.values()) == {"cpu"}
    _same(_run(LanguageModel(model, tokenizer=tokenizer))[1].cpu(), _run(_local(BF16))[1])


def test_a_directory_spec_loads_straight_into_its_dtype(saved_dir):
    model, tokenizer = load_model(str(saved_dir), Placement(device="cpu", dtype=torch.bfloat16))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = AutoModelForCausalLM.from_pretrained(saved_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        _same(_run(LanguageModel(model, tokenizer=tokenizer))[1], reference(**tokenizer(PROMPT, return_tensors="pt")).logits)


def test_language_model_refuses_two_different_dtypes(saved_dir):
    from tether import TetherError

    with pytest.raises(TetherError, match="give one of them"):
        LanguageModel(str(saved_dir), dtype=torch.float16, torch_dtype=torch.bfloat16)


def test_a_cuda_device_on_a_machine_without_one_is_refused_clearly():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ValueError, match="no CUDA GPU.*--device auto"):
        load_model("tiny", Placement(device="cuda:0"))
    model, _ = load_model("tiny", Placement(device="auto"))  # auto: the CPU here
    assert next(model.parameters()).device.type == "cpu"


# ---- on a CUDA machine --------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("name, placement", [
    ("tiny_cuda", Placement(device="cuda:0")),
    ("tiny_cuda_bf16", Placement(device="cuda:0", dtype=torch.bfloat16)),
])
def test_remote_on_cuda_equals_local_on_cuda(client_config, name, placement):
    local = _run(_local(placement))
    assert local[1].device.type == "cuda"
    remote = _run(LanguageModel(name), remote=True)
    for r, loc in zip(remote, local):
        assert r.device.type == "cpu" and r.dtype == loc.dtype
        _same(r, loc.cpu())


@cuda
def test_language_model_with_a_cuda_device_map_equals_plain_hugging_face(saved_dir):
    model = LanguageModel(str(saved_dir), device_map="cuda:0", dtype=torch.bfloat16)
    hidden, logits = _run(model)
    reference = AutoModelForCausalLM.from_pretrained(saved_dir, dtype=torch.bfloat16, device_map="cuda:0").eval()
    ids = model.tokenizer(PROMPT, return_tensors="pt").to("cuda:0")
    with torch.no_grad():
        _same(logits, reference(**ids).logits)


@cuda
def test_a_local_block_on_values_from_a_gpu_hands_its_result_back_on_that_gpu(client_config):
    import tether

    def run(model: LanguageModel, **options) -> torch.Tensor:
        with model.trace(PROMPT, **options):
            hidden = model.transformer.h[0].output
            with tether.local():
                doubled = hidden * 2  # on the client: a CPU tensor when remote
            model.transformer.h[0].output = doubled
            logits = model.lm_head.output.save()
        return logits

    local = run(_local(Placement(device="cuda:0")))
    _same(run(LanguageModel("tiny_cuda"), remote=True), local.cpu())
