"""Which Programs may share one batched run (`batch_key`), what each adds to it (`batch_tokens`), and which
must run alone (`batchable`). Imports nothing of networks, client or server."""

from __future__ import annotations

import ast
from functools import lru_cache
from typing import Any

import torch

from .capture import parse
from .program import Program

__all__ = ["batchable", "batch_key", "batch_tokens", "is_language_model"]

# Attributes whose use means a job touches weights, gradients or the run's structure: it runs alone.
_ALONE_ATTRS = frozenset({
    "backward", "grad", "invoke", "weight", "bias", "parameters", "named_parameters", "buffers", "named_buffers",
    "state_dict", "load_state_dict", "data", "requires_grad", "requires_grad_", "edit", "session", "scan",
    "register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook", "zero_grad",
})
# Generation options a batch cannot honour per job (it shares one generate() call), or that change its shape.
_ALONE_GENERATE = ("max_length", "stopping_criteria", "streamer", "return_dict_in_generate", "num_return_sequences",
                   "num_beams", "assistant_model", "prefix_allowed_tokens_fn", "logits_processor")


def batchable(program: Program) -> str:
    """Why `program` must run alone ("" when it may share a batch)."""
    if program.kind not in ("trace", "generate"):
        return f"a {program.kind} runs alone"
    if not program.args:
        return "a trace without inputs (explicit invokes) runs alone"
    used = _attributes(program.source)
    touched = sorted(used & _ALONE_ATTRS)
    if touched:
        return f"it uses `.{touched[0]}` (weights, gradients or invokes), so it runs alone"
    return ""


@lru_cache(maxsize=256)
def _attributes(source: str) -> frozenset[str]:
    return frozenset(n.attr for n in ast.walk(parse(source)) if isinstance(n, ast.Attribute))


def batch_key(model: Any, program: Program) -> tuple | None:
    """Programs with equal keys may share one batched run on `model`; None: this one runs alone."""
    if batchable(program):
        return None
    inputs, run = model._split_kwargs(program.kind, dict(program.kwargs))
    if inputs:
        return None  # keyword inputs of a plain module's forward: not batched along rows
    if program.kind == "generate":
        if "max_new_tokens" not in run or any(k in run for k in _ALONE_GENERATE):
            return None
    options = []
    for name, value in sorted(run.items()):
        if name == "max_new_tokens":
            continue
        try:
            hash(value)
        except TypeError:
            return None
        options.append((name, value))
    shapes: tuple = ()
    if not is_language_model(model):
        if not all(isinstance(a, torch.Tensor) and a.dim() > 0 for a in program.args):
            return None
        shapes = tuple((tuple(a.shape[1:]), a.dtype, a.device) for a in program.args)
    return program.kind, tuple(options), shapes


def batch_tokens(model: Any, program: Program) -> int:
    """What a job adds to a batch, in tokens (rows x positions; plain modules: rows)."""
    prepared = model._prepare(tuple(program.args), {})
    if not is_language_model(model):
        return prepared.rows
    width = max(len(r) for r in prepared.args[0])
    steps = int(dict(program.kwargs).get("max_new_tokens", 0)) if program.kind == "generate" else 0
    return prepared.rows * (width + steps)


def is_language_model(model: Any) -> bool:
    return model._generator_key() is not None
