"""Tiny random-weight models and in-process tokenizers, for tests, benchmarks and the `tiny` server model.

Nothing here downloads anything. Imports torch and transformers only (never grpc, client or server).
"""

from __future__ import annotations

import functools
import random
from collections import OrderedDict

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

__all__ = ["EOS_TOKEN", "corpus", "gpt2_config_model", "tiny_gpt2", "tiny_llama", "tiny_net", "train_tokenizer"]

EOS_TOKEN = "<|endoftext|>"  # also bos and pad, as in GPT-2

# Sentences every test or example may rely on tokenizing into something reasonable.
_FIXED = [
    "The Eiffel Tower is in the city of Paris",
    "The Colosseum is in the city of Rome",
    "The Vatican is in the city of Rome",
    "Buckingham Palace is in the city of London",
    "The Brandenburg Gate is in the city of Berlin",
    "The Statue of Liberty is in the city of New York",
    "hello",
    "Hello world",
    "hello, my name is",
    "_",
    "a_b snake_case __init__ 0 1 2 3 4 5 6 7 8 9 10 100 2024",
    "The quick brown fox jumps over the lazy dog.",
    "Madison Square Garden is located in the city of New York",
]
_LANDMARKS = [
    ("The Eiffel Tower", "Paris"),
    ("The Louvre", "Paris"),
    ("The Colosseum", "Rome"),
    ("The Vatican", "Rome"),
    ("Buckingham Palace", "London"),
    ("Big Ben", "London"),
    ("The Brandenburg Gate", "Berlin"),
    ("The Sagrada Familia", "Barcelona"),
    ("The Statue of Liberty", "New York"),
    ("The Golden Gate Bridge", "San Francisco"),
    ("The Acropolis", "Athens"),
    ("The Kremlin", "Moscow"),
    ("The Space Needle", "Seattle"),
]
_SUBJECTS = ["The cat", "A dog", "My friend", "The teacher", "Alice", "Bob", "The model", "The student"]
_VERBS = ["likes", "sees", "visits", "reads about", "remembers", "talks to", "writes about", "finds"]
_OBJECTS = [
    "the river",
    "a small house",
    "the old tower",
    "the city",
    "a red ball",
    "the market",
    "the museum",
    "a long story",
    "the garden",
    "the palace",
]
_TAILS = ["today.", "every morning.", "again.", "with joy.", "in the rain.", "at night.", "quickly.", "."]


def corpus(n_generated: int = 400) -> list[str]:
    """The built-in English training corpus: fixed sentences plus `n_generated` seeded random ones."""
    rng = random.Random(0)
    lines = list(_FIXED)
    for place, city in _LANDMARKS:
        lines += [f"{place} is in the city of {city}", f"{place} is located in {city}."]
    for _ in range(n_generated):
        lines.append(
            " ".join([rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_TAILS)])
        )
    return lines


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    """Train a byte-level BPE once per process and vocab size; returns its serialized form."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok.to_str()


def train_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer trained in-process on `corpus()`.

    Training runs once per process and vocab size (cached); each call returns a fresh tokenizer object,
    so a caller changing e.g. `padding_side` does not affect others. eos = bos = pad = `<|endoftext|>`,
    padding on the left (the last position is then the real last token of every prompt in a batch).
    """
    if vocab_size < 257:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level tokenizer needs 256 byte tokens plus "
            f"{EOS_TOKEN}. Use vocab_size >= 257 (default 512)."
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        padding_side="left",
        model_max_length=1024,
    )


def gpt2_config_model(
    n_layer: int = 12, n_embd: int = 768, n_head: int = 12, vocab_size: int = 512, seed: int = 0
) -> GPT2LMHeadModel:
    """A random-weight GPT-2 of the given shape, in eval mode; identical weights for identical arguments.

    Used by benchmarks (12 layers, widths 64 and 768) and by `tiny_gpt2`.
    """
    if n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}.")
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=1024,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=0,  # EOS_TOKEN is the first (special) token of `train_tokenizer`
        eos_token_id=0,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.eval()


def tiny_gpt2(
    n_layer: int = 2, n_embd: int = 64, n_head: int = 4, seed: int = 0, vocab_size: int | None = None
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """A tiny random-weight GPT-2 and its tokenizer; `vocab_size` is the tokenizer's (default 512).

    The model's vocabulary is always exactly the tokenizer's, so every id the tokenizer produces embeds.
    """
    tokenizer = train_tokenizer(512 if vocab_size is None else vocab_size)
    model = gpt2_config_model(n_layer, n_embd, n_head, vocab_size=len(tokenizer), seed=seed)
    return model, tokenizer


def tiny_net(seed: int = 0) -> torch.nn.Sequential:
    """The nnsight walkthrough's model: `layer1` Linear(5, 10) then `layer2` Linear(10, 2), no grads."""
    input_size, hidden_dims, output_size = 5, 10, 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            OrderedDict(
                [
                    ("layer1", torch.nn.Linear(input_size, hidden_dims)),
                    ("layer2", torch.nn.Linear(hidden_dims, output_size)),
                ]
            )
        ).requires_grad_(False)
    return net


def tiny_llama(
    n_layer: int = 2, hidden: int = 64, n_head: int = 4, seed: int = 0
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A tiny random-weight Llama (rotary positions, grouped attention) and the same tokenizer as `tiny_gpt2`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=max(1, n_head // 2), max_position_embeddings=1024,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer
