"""Unit tests of tether.tiny: in-process tokenizer and seeded random-weight models (no downloads)."""

from __future__ import annotations

import pytest
import torch

from tether import tiny

SENTENCES = [
    "The Eiffel Tower is in the city of Paris",
    "The Vatican is in the city of Rome",
    "Buckingham Palace is in the city of London",
    "hello",
    "_",
    "Unseen wörds: naïve café 😀 \t\n tabs",  # byte-level: anything round-trips
]


def test_tokenizer_round_trips_and_has_special_tokens(tokenizer):
    for text in SENTENCES:
        assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == tiny.EOS_TOKEN
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 0
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) == 512
    assert len(tokenizer(" Paris").input_ids) == 1  # corpus words are whole tokens


def test_tokenizer_pads_on_the_left(tokenizer):
    batch = tokenizer(["hello", "The Eiffel Tower is in the city of"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]  # (batch, seq)
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and ids[0, 0] == tokenizer.pad_token_id
    assert bool(mask[1].all())


def test_tokenizer_is_deterministic_cached_and_fresh():
    first, second = tiny.train_tokenizer(), tiny.train_tokenizer()
    assert first is not second
    assert first.get_vocab() == second.get_vocab()
    first.padding_side = "right"
    assert second.padding_side == "left" and tiny.train_tokenizer().padding_side == "left"
    trained = tiny._trained_tokenizer_json.cache_info().misses
    tiny.train_tokenizer()
    assert tiny._trained_tokenizer_json.cache_info().misses == trained  # cached: not trained again


def test_tokenizer_vocab_size():
    assert len(tiny.train_tokenizer(300)) == 300
    with pytest.raises(ValueError, match="vocab_size"):
        tiny.train_tokenizer(100)


def test_tiny_gpt2_matches_tokenizer_and_runs(gpt2):
    model, tokenizer = gpt2
    assert not model.training
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (2, 64, 4)
    assert len(model.transformer.h) == 2
    batch = tokenizer(["hello", "The Eiffel Tower is in the city of"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits  # (batch, seq, vocab)
    assert logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    assert torch.isfinite(logits).all()


def test_tiny_gpt2_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, _ = tiny.tiny_gpt2(seed=0)
    b, _ = tiny.tiny_gpt2(seed=0)
    c, _ = tiny.tiny_gpt2(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.transformer.h[0].mlp.c_fc.weight, c.transformer.h[0].mlp.c_fc.weight)


def test_tiny_llama_is_seeded_rotary_and_matches_the_tokenizer():
    state = torch.random.get_rng_state()
    a, tokenizer = tiny.tiny_llama(seed=0)
    b, _ = tiny.tiny_llama(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not a.training and a.config.vocab_size == len(tokenizer) and len(a.model.layers) == 2
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    with torch.no_grad():
        logits = a(**tokenizer("hello", return_tensors="pt")).logits  # (batch, seq, vocab)
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()


def test_tiny_gpt2_vocab_size_is_the_tokenizers():
    model, tokenizer = tiny.tiny_gpt2(vocab_size=300)
    assert len(tokenizer) == model.config.vocab_size == 300


def test_gpt2_config_model_shape():
    model = tiny.gpt2_config_model(n_layer=12, n_embd=64, n_head=4, vocab_size=512, seed=3)
    assert len(model.transformer.h) == 12 and model.config.n_embd == 64 and not model.training
    with pytest.raises(ValueError, match="divisible"):
        tiny.gpt2_config_model(n_layer=1, n_embd=10, n_head=4)


def test_tiny_net_is_the_walkthrough_model(tiny_net):
    assert list(dict(tiny_net.named_children())) == ["layer1", "layer2"]
    assert (tiny_net.layer1.in_features, tiny_net.layer1.out_features) == (5, 10)
    assert (tiny_net.layer2.in_features, tiny_net.layer2.out_features) == (10, 2)
    assert not any(p.requires_grad for p in tiny_net.parameters())
    assert tiny_net(torch.rand(1, 5)).shape == (1, 2)
    assert torch.equal(tiny.tiny_net(seed=0).layer1.weight, tiny_net.layer1.weight)
    assert not torch.equal(tiny.tiny_net(seed=1).layer1.weight, tiny_net.layer1.weight)
