"""Cross-job batching on a worker: which waiting jobs share one batched run (`gather`: bounded wait, size and
token budget) and running them (`run_batch`, on runtime.job_batch), each job ending on its own.
Imports the runtime and the server's job plumbing, never grpc."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tether.runtime.job_batch import BatchJob, BatchOutcome, batch_key, batch_tokens, execute_batch
from tether.v1 import jobs_pb2

from .errors import JobCancelledError
from .local_calls import LocalCaller
from .results import encode_result_pieces
from .weights import WeightsChanged

__all__ = ["BatchPolicy", "gather", "run_batch"]

_log = logging.getLogger("tether.server")


@dataclass(frozen=True)
class BatchPolicy:
    """How many waiting jobs one batched run may take (`--max-batch 1`: none, each job runs alone)."""

    max_batch: int = 16  # jobs per batched run
    wait: float = 0.005  # seconds a worker waits for more compatible jobs once it took one
    max_tokens: int = 8192  # rows x positions (prompt + new tokens) per batched run

    @property
    def enabled(self) -> bool:
        return self.max_batch > 1


def _key(model: Any, entry: Any) -> tuple | None:
    try:
        return batch_key(model, entry.decoded.program)
    except Exception:  # inputs the runtime cannot batch (it says why when the job runs alone)
        return None


def gather(first: Any, pending: Any, cond: threading.Condition, model: Any, policy: BatchPolicy,
           taken: Callable[[Any], None]) -> list[Any]:
    """`first` and the waiting entries that may share its run, taken out of `pending` (call with `cond` held).

    Waits up to `policy.wait` for more to arrive, unless the batch is full; `taken(entry)` is called for each
    entry taken, at once (so a shutdown sees it running).
    """
    if not policy.enabled:
        return [first]
    key = _key(model, first)
    if key is None:
        return [first]
    batch, costs = [first], {}

    def cost(entry: Any) -> int:
        if id(entry) not in costs:
            try:
                costs[id(entry)] = batch_tokens(model, entry.decoded.program)
            except Exception:
                costs[id(entry)] = policy.max_tokens + 1
        return costs[id(entry)]

    tokens = cost(first)
    deadline = time.monotonic() + policy.wait
    while True:
        for entry in list(pending):
            if len(batch) >= policy.max_batch:
                break
            if _key(model, entry) != key or tokens + cost(entry) > policy.max_tokens:
                continue
            pending.remove(entry)
            taken(entry)
            batch.append(entry)
            tokens += cost(entry)
        left = deadline - time.monotonic()
        if left <= 0 or len(batch) >= policy.max_batch:
            break
        cond.wait(left)
    if pending:
        cond.notify()  # what this batch left is for another worker
    return batch


def run_batch(entries: list[Any], replica: Any, make_run: Callable[[Any], Any], make_log: Callable[[Any], Any],
              watch: Any, watchdog: Any) -> None:
    """Run `entries` as one batched run on `replica`; each job ends (COMPLETED, ERROR, CANCELLED) on its own.

    `make_run(entry)` gives the worker's per-job run (its deadline, stop check, time-out and end states),
    `make_log(job)` the job's log: the same ones a job running alone gets.
    """
    size = len(entries)
    runs, logs, jobs = [], [], []
    for entry in entries:
        job = entry.job
        if not job.set_state(jobs_pb2.JOB_STATE_DISPATCHED, f"on worker {threading.current_thread().name}",
                             notify=False):
            continue
        run = make_run(entry)
        if job.cancel_requested:
            run._end(JobCancelledError(job.cancel_reason or ""))
            continue
        run.deadline = time.monotonic() + run.limits.timeout
        if not job.set_state(jobs_pb2.JOB_STATE_RUNNING, batch_size=size):
            continue
        log = make_log(job)
        decoded = entry.decoded
        try:
            root = decoded.bind(replica)
            decoded.define_functions(log)
        except BaseException as error:  # the job's own shipped code: it fails alone
            log.flush()
            run._end(error)
            continue
        local = LocalCaller(job, entry.link, decoded, deadline=run.deadline,
                            local_timeout=run.limits.local_call_timeout, timed_out=run.timed_out)
        runs.append(run)
        logs.append(log)
        jobs.append(BatchJob(decoded.program, decoded.bindings, model=root, filename=decoded.body_filename,
                             local=local, log=log, cancel=run._stop_requested))
    if not jobs:
        return
    versions = watch.snapshot()
    done = [False] * len(jobs)
    deferred: list[tuple[int, BatchOutcome]] = []

    def finish(i: int, outcome: BatchOutcome) -> None:
        done[i] = True
        if watch.snapshot() != versions:  # some job wrote into the weights: decided after the run
            deferred.append((i, outcome))
            return
        _conclude(runs[i], logs[i], jobs[i], outcome)

    running: list[Callable[[], int | None]] = []  # which job's body runs now (see execute_batch)

    def stop_requested() -> bool:  # the watchdog interrupts a body stuck in pure Python: only a job's own
        i = running[0]() if running else None
        return i is not None and not done[i] and runs[i]._stop_requested()

    try:
        watchdog.call(stop_requested, lambda: execute_batch(replica, jobs, on_done=finish, on_start=running.append))
    except BaseException as error:  # the batch's run itself failed (not one job's body)
        _log.debug("batched run failed", exc_info=error)
        for i, run in enumerate(runs):
            if not done[i]:
                logs[i].flush()
                run._end(error)
    try:
        watch.check(versions)
    except WeightsChanged as changed:
        for i, _ in deferred:
            logs[i].flush()
            runs[i]._end(changed)
        return
    for i, outcome in deferred:
        _conclude(runs[i], logs[i], jobs[i], outcome)


def _conclude(run: Any, log: Any, job: BatchJob, outcome: BatchOutcome) -> None:
    """One job's end state from its outcome: its result encoded within its limits, or its error."""
    log.flush()
    if outcome.error is not None:
        run._end(outcome.error)
        return
    try:
        result = encode_result_pieces(outcome.values, run.decoded.codec.encode, run.limits.max_result_bytes, log)
        log.flush()
    except BaseException as error:
        log.flush()
        run._end(error)
        return
    run.job.complete(result, run.chunk_size, run.ttl)
