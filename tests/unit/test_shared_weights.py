"""A replica's weights packed into one sealed memfd: the front door keeps its values (re-pointed, not copied),
and what a receiver rebuilds has the same tying, strides, dtypes and flags, on copy-on-write pages."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

from tether.server.shared_weights import Packed, pack


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(6, 4)
        self.head = torch.nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.mixer = torch.nn.Parameter(torch.randn(4, 4).t())  # non-contiguous
        self.frozen = torch.nn.Parameter(torch.randn(4).to(torch.bfloat16), requires_grad=False)
        self.register_buffer("shift", torch.randn(4), persistent=False)
        self.empty = torch.nn.Parameter(torch.empty(0))


def _values(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in [*module.named_parameters(), *module.named_buffers()]}


def _received(packed: Packed) -> Small:
    """What a worker would rebuild (the pickle of a process argument, read back here)."""
    ours, theirs = multiprocessing.Pipe()
    ours.send(packed)
    return theirs.recv()


def test_packing_keeps_the_front_doors_values_and_tying_in_place():
    module = Small()
    before, storage = _values(module), module.mixer.untyped_storage()
    packed = pack(module, "small")
    assert isinstance(packed, Packed) and packed.payload is module
    assert all(torch.equal(before[name], value) for name, value in _values(module).items())
    assert module.head.weight is module.embed.weight and module.mixer.stride() == (1, 4)
    assert packed.offset_of(storage) is not None  # the same storage, now on the memfd's pages


def test_a_receiver_rebuilds_the_model_as_served_on_private_pages():
    module = Small()
    before = _values(module)
    received = _received(pack(module, "small"))
    assert all(torch.equal(before[name], value) for name, value in _values(received).items())
    assert received.head.weight is received.embed.weight and received.mixer.stride() == (1, 4)
    assert received.frozen.dtype == torch.bfloat16 and not received.frozen.requires_grad
    assert received.embed.weight.requires_grad and "shift" in received._non_persistent_buffers_set
    with torch.no_grad():
        received.embed.weight.fill_(7.0)  # copy-on-write: the packed pages, and the front door, keep theirs
    assert torch.equal(module.embed.weight, before["embed.weight"])
    assert torch.equal(_received(pack(module, "again")).embed.weight, before["embed.weight"])


def test_a_model_without_cpu_tensors_is_not_packed_and_one_that_cannot_be_pickled_raises():
    assert pack(torch.nn.Linear(2, 2, device="meta"), "meta") is None
    module = Small()
    module.lock = threading.Lock()
    with pytest.raises(TypeError):
        pack(module, "locked")
