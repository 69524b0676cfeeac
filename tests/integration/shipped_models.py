"""Test-only models for how weights reach a worker process: one of 600+ tensors (more than a process's
arguments can carry as a file descriptor each) with tied weights, a non-contiguous parameter, a frozen one,
bfloat16, persistent and non-persistent buffers; and one that cannot be pickled at all."""

from __future__ import annotations

import threading

import torch

WIDTH, VOCAB, DEPTH = 8, 32, 300


class ManyTensors(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH))  # 600 tensors
        self.mixer = torch.nn.Parameter(torch.randn(WIDTH, WIDTH).t())  # non-contiguous
        self.frozen = torch.nn.Parameter(torch.randn(WIDTH), requires_grad=False)
        self.gate = torch.nn.Parameter(torch.randn(WIDTH).to(torch.bfloat16))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, WIDTH))
        self.register_buffer("shift", torch.randn(WIDTH), persistent=False)
        self.head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied, as an LLM's lm_head to its embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) * self.scale + self.shift  # (batch, seq, WIDTH)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        h = (h @ self.mixer + self.frozen) * self.gate.float()
        return self.head(h)  # (batch, seq, VOCAB)


def many_tensors() -> ManyTensors:
    """The `module:factory` of the model (seeded: it loads the same weights every time)."""
    torch.manual_seed(0)
    return ManyTensors()


class Unpicklable(torch.nn.Module):
    """A model holding a lock: it cannot be sent to a process, so it is served from a worker thread."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)
