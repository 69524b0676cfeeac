"""The worker's `BatchRun`: compatible jobs (one RunBatch) as one batched forward pass or generation
(`runtime.job_batch.execute_batch`), each job with its own deadline, cancel, log, local() link, result-size
limit and end (Done / Failed under its job id), as `JobRun` gives a job running alone. Imports the runtime and
worker_main's per-job pieces; never grpc, the job store or the front door."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tether.runtime.envoy import module_of
from tether.runtime.job_batch import BatchJob, BatchOutcome, execute_batch

from . import worker_protocol as wp
from .interrupts import Watchdog
from .program_codec import DecodedProgram
from .registry import HostedModel
from .weights import WeightsChanged, WeightWatch
from .worker_main import JobLog, JobRun

__all__ = ["BatchRun"]

_log = logging.getLogger("tether.server")


@dataclass
class _Member:
    """A job of the batch once it started: its run (limits, end), decoded program, log and BatchJob."""

    run: JobRun
    decoded: DecodedProgram
    log: JobLog
    spec: BatchJob
    done: bool = False


class BatchRun:
    """One RunBatch on this worker: decode each job, run those that decoded as one batch, end each on its own."""

    def __init__(self, batch: wp.RunBatch, hosted: HostedModel, policy, conn, inbox, watch: WeightWatch,
                 watchdog: Watchdog):
        self.hosted, self.watch, self.watchdog = hosted, watch, watchdog
        self.runs = [JobRun(job, hosted, policy, conn, inbox, watch, watchdog) for job in batch.jobs]

    def run(self) -> None:
        decoded: list[DecodedProgram | None] = [None] * len(self.runs)
        try:
            for i, run in enumerate(self.runs):
                try:
                    decoded[i] = run.decode()
                except BaseException as error:  # this job alone fails (or was cancelled while it waited)
                    run._end(error)
            started = [(run, d) for run, d in zip(self.runs, decoded) if d is not None]
            members = [m for run, d in started if (m := self._start(run, d, len(started))) is not None]
            if members:
                self._execute(members)
        finally:
            for run, d in zip(self.runs, decoded):
                run.release(d)

    def _start(self, run: JobRun, decoded: DecodedProgram, size: int) -> _Member | None:
        log, handler = run.start(decoded, batch_size=size)
        try:
            root = decoded.bind(self.hosted.model)
            decoded.define_functions(log)
        except BaseException as error:  # the job's own shipped code: it fails alone
            log.flush()
            run._end(error)
            return None
        spec = BatchJob(decoded.program, decoded.bindings, model=root, filename=decoded.body_filename,
                        local=handler, log=log, cancel=run._stop_requested)
        return _Member(run, decoded, log, spec)

    def _execute(self, members: list[_Member]) -> None:
        watch, model = self.watch, self.hosted.model
        versions = watch.snapshot()
        deferred: list[tuple[_Member, BatchOutcome]] = []

        def finish(i: int, outcome: BatchOutcome) -> None:
            member = members[i]
            member.done = True
            if watch.snapshot() != versions:  # some job wrote into the weights: decided after the run
                deferred.append((member, outcome))
                return
            self._conclude(member, outcome)

        running: list[Callable[[], int | None]] = []  # which job's body runs now (see execute_batch)

        def stop_requested() -> bool:  # the watchdog interrupts a body stuck in pure Python: only a job's own
            i = running[0]() if running else None
            return i is not None and not members[i].done and members[i].run._stop_requested()

        def progress(module: Any, args: Any) -> None:  # each forward pass is a step of every job still running
            for member in members:
                if not member.done:
                    member.run.tick()

        hook = module_of(model).register_forward_pre_hook(progress)
        try:
            self.watchdog.call(stop_requested, lambda: execute_batch(
                model, [m.spec for m in members], on_done=finish, on_start=running.append))
        except BaseException as error:  # the batch's run itself failed (not one job's body)
            _log.debug("batched run failed", exc_info=error)
            for member in members:
                if not member.done:
                    member.done = True
                    member.log.flush()
                    member.run._end(error)
        finally:
            hook.remove()
        try:
            watch.check(versions)
        except WeightsChanged as changed:
            _log.warning("%s", changed)
            for member, _ in deferred:
                member.log.flush()
                member.run._end(changed)
            return
        for member, outcome in deferred:
            self._conclude(member, outcome)

    @staticmethod
    def _conclude(member: _Member, outcome: BatchOutcome) -> None:
        """One job's end from its outcome: its result encoded within its own size limit, or its error."""
        run, log = member.run, member.log
        log.flush()
        if outcome.error is not None:
            run._end(outcome.error)
            return
        try:
            run.done(run.encode(member.decoded, outcome.values, log))  # (done fails before it sends: no room)
        except BaseException as error:
            log.flush()
            run._end(error)
