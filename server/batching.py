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

__all__ = ["BatchPolicy", "Company", "Tokens", "batch_info", "gather"]

MAX_WAITS = 4  # a batch forming waits at most this many --batch-wait-ms in all


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


class Company:
    """Which jobs an idle replica should wait for: those of the batch it just ran. Their clients receive their
    results one after another (each result crosses the front door and is decoded in turn) and send their next
    jobs as they do; without waiting, the first to come back runs alone and the others form the next batch
    behind it, which halves what batching gains. The wait is bounded by a share of the run that ended
    (`RETURN_SHARE`, at least --batch-wait-ms, at most `MAX_RETURN_S`), and only a run of two jobs or more
    is waited for: a lone client's next job never waits. Guarded by the queue's lock."""

    RETURN_SHARE = 0.05  # of the previous run's time, waited at most for its jobs' clients to come back
    MAX_RETURN_S = 0.25
    EXPECT_S = 1.0  # how long after a batched run its clients are expected back

    def __init__(self):
        self._size, self._budget, self._ended = 0, 0.0, 0.0

    def ran(self, size: int, seconds: float, waiting: int, wait: float) -> None:
        """A run of `size` jobs that took `seconds` ended now, with `waiting` jobs queued (`wait`: the policy's
        --batch-wait-ms): its jobs' clients and those are expected."""
        self._size = size + waiting if size > 1 and wait > 0 else 0
        self._budget = min(max(wait, self.RETURN_SHARE * seconds), self.MAX_RETURN_S)
        self._ended = time.monotonic()

    def expected(self) -> tuple[int, float]:
        """(jobs, seconds): how many jobs to wait for, how long at most; (0, 0.0) when none is expected. Handed
        out once: with several replicas, one gathers the returning jobs, the others never wait for them."""
        size, self._size = self._size, 0
        if not size or time.monotonic() - self._ended > self.EXPECT_S:
            return 0, 0.0
        return size, self._budget


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
           taken: Callable[[Any], None], company: tuple[int, float] = (0, 0.0)) -> list[Any]:
    """`first` and the waiting entries (with `batch_key` and `tokens`) that may share its run, taken out of
    `pending` (call with `cond` held).

    Waits while compatible jobs keep arriving, up to `policy.wait` after the last one (never more than
    `MAX_WAITS` waits in all), until the batch is full; a `first` that found no company does not wait, so a
    lone job (one client's sequential jobs) never waits. `company` (Company.expected: the jobs of the batch
    that just ended, whose clients are sending their next ones) replaces that: wait until that many jobs are
    back (in the batch or, incompatible, still queued), up to its seconds. `taken(entry)` is called for each entry taken, at once (so a shutdown sees it running).
    """
    key = first.batch_key
    if not policy.enabled or key is None:
        return [first]
    batch, tokens = [first], None  # (counted once a compatible job is there)
    started = time.monotonic()
    deadline, last_call = started + policy.wait, started + MAX_WAITS * policy.wait
    expected, patience = company
    if expected:
        deadline = last_call = started + patience
    while True:
        size = len(batch)
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
        now = time.monotonic()
        if len(batch) > size and not expected:  # one more came: wait for the next a while longer
            deadline = min(last_call, now + policy.wait)
        left = deadline - now
        # (every expected job is back, compatible or not: waiting longer gains nothing)
        full = len(batch) >= policy.max_batch or (expected and len(batch) + len(pending) >= expected)
        if left <= 0 or full or (len(batch) == 1 and not expected):
            break
        cond.wait(left)
    if pending:
        cond.notify()  # what this batch left is for another replica
    return batch
