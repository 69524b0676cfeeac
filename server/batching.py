"""Cross-job batching in the front door: what a job may share a batched run with (`batch_info`, from its decoded
program's metadata) and which waiting jobs share one (`gather`: bounded wait, size and token budget). The batch
itself runs in the worker (worker_batch.py). Imports the runtime's compatibility rules, never grpc nor torch
code that runs a model."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tether.runtime.job_compat import batch_key, batch_tokens

__all__ = ["BatchPolicy", "Tokens", "batch_info", "gather"]


@dataclass(frozen=True)
class BatchPolicy:
    """How many waiting jobs one batched run may take (`--max-batch 1`: none, each job runs alone)."""

    max_batch: int = 16  # jobs per batched run
    wait: float = 0.005  # seconds a supervisor waits for more compatible jobs once it took one
    max_tokens: int = 8192  # rows x positions (prompt + new tokens) per batched run

    @property
    def enabled(self) -> bool:
        return self.max_batch > 1


class Tokens:
    """The rows x positions a job adds to a batched run (batch_tokens), counted the first time a batch needs them:
    tokenizing a prompt costs ~0.15 ms, which a job that runs alone (one client's sequential jobs) need not pay.
    Pickles as the count (what a cluster's core receives is an int). Read under the queue's lock only."""

    def __init__(self, model: Any, program: Any):
        self._model, self._program = model, program
        self._count: int | None = None

    def __int__(self) -> int:
        if self._count is None:
            try:
                self._count = batch_tokens(self._model, self._program)
            except Exception:  # inputs the runtime cannot batch: never fits a batch (it runs alone, saying why)
                self._count = sys.maxsize
            self._model = self._program = None
        return self._count

    def __reduce__(self):
        return int, (int(self),)


def batch_info(model: Any, program: Any) -> tuple[tuple | None, int | Tokens]:
    """(key, tokens) of a decoded program on `model` (an NNsight): jobs with equal keys may share a run, and
    each adds `tokens` rows x positions to it (counted when a batch forms, see Tokens); (None, 0) when it runs
    alone. Runs nothing."""
    try:
        key = batch_key(model, program)
    except Exception:  # inputs the runtime cannot batch (it says why when the job runs alone)
        return None, 0
    return (key, Tokens(model, program)) if key is not None else (None, 0)


def gather(first: Any, pending: Any, cond: threading.Condition, policy: BatchPolicy,
           taken: Callable[[Any], None]) -> list[Any]:
    """`first` and the waiting entries (with `batch_key` and `tokens`) that may share its run, taken out of
    `pending` (call with `cond` held).

    Waits up to `policy.wait` for more to arrive, unless the batch is full or `first` found no company: a
    lone job (one client's sequential jobs) never waits, while under load the jobs that queued during the
    previous run are there already; `taken(entry)` is called for each entry taken, at once (so a shutdown
    sees it running).
    """
    key = first.batch_key
    if not policy.enabled or key is None:
        return [first]
    batch, tokens = [first], None  # (counted once a compatible job is there)
    deadline = time.monotonic() + policy.wait
    while True:
        for entry in list(pending):
            if len(batch) >= policy.max_batch:
                break
            if entry.batch_key != key:
                continue
            tokens = int(first.tokens) if tokens is None else tokens
            if tokens + int(entry.tokens) > policy.max_tokens:
                continue
            pending.remove(entry)
            taken(entry)
            batch.append(entry)
            tokens += int(entry.tokens)
        left = deadline - time.monotonic()
        if left <= 0 or len(batch) >= policy.max_batch or len(batch) == 1:
            break
        cond.wait(left)
    if pending:
        cond.notify()  # what this batch left is for another replica
    return batch
