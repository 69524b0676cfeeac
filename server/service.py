"""The gRPC servicers: JobService (RunJob, SubmitJob, GetJob, WatchJob, ReadResult, CancelJob) and ModelService.

Each RPC authenticates, maps ServerErrors to their status codes, and leaves the work to jobs/workers/codec.
A RunJob stream has a (pooled, named) reader thread for the client's later messages: local() answers, cancel.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc

from tether.v1 import jobs_pb2, jobs_pb2_grpc, models_pb2, models_pb2_grpc

from .auth import Authenticator
from .errors import InvalidProgram, QueueFull, ServerError
from .jobs import TERMINAL, Job, JobStore, state_name
from .local_calls import NO_STREAM, LocalLink
from .policy import Policy
from .program_codec import decode_program
from .registry import Registry
from .workers import JobLimits, Limits, ModelQueue

__all__ = ["Hub", "JobService", "ModelService"]

_log = logging.getLogger("tether.server")
CANCEL_WAIT = 10.0  # seconds CancelJob waits for a running job to stop before answering with its state


@dataclass
class Hub:
    """What the servicers share: models, their queues, jobs, and the server's policy, limits and keys."""

    registry: Registry
    queues: dict[str, ModelQueue]
    store: JobStore
    policy: Policy
    limits: Limits
    auth: Authenticator


@contextlib.contextmanager
def _status(context: grpc.ServicerContext):
    """Report a ServerError as its status code; anything else as INTERNAL (and in the server's log)."""
    try:
        yield
    except ServerError as error:
        context.abort(error.code, str(error))
    except Exception as error:
        if type(error) is Exception and not error.args:  # raised by context.abort(): already reported
            raise
        _log.exception("internal error in %s", getattr(context, "_rpc_event", "an RPC"))
        context.abort(grpc.StatusCode.INTERNAL, f"internal server error: {type(error).__name__}: {error}")


def _unary(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        with _status(context):
            return method(self, request, context, self._hub.auth.identify(context))

    return wrapper


def _streaming(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        with _status(context):
            yield from method(self, request, context, self._hub.auth.identify(context))

    return wrapper


class JobService(jobs_pb2_grpc.JobServiceServicer):
    """Runs programs on hosted models (see jobs.proto for each RPC's contract)."""

    def __init__(self, hub: Hub, max_streams: int):
        self._hub = hub
        # One reader per open RunJob stream (each also holds an RPC thread, so max_streams = RPC threads);
        # pooled, so a stream does not pay for starting a thread.
        self._readers = futures.ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="tether-runjob-reader")

    def close(self) -> None:
        self._readers.shutdown(wait=False)

    # ---- submitting ---------------------------------------------------------------------------
    def _start(self, spec: jobs_pb2.JobSpec, owner: str, *, stream: bool) -> tuple[Job, bool]:
        """Check, decode and queue a job; (job, existing) where existing means its request_id was seen."""
        hub = self._hub
        earlier = hub.store.find_request(owner, spec.request_id)
        if earlier is not None:
            return earlier, True
        if not spec.HasField("program"):
            raise InvalidProgram("the JobSpec has no program: set JobSpec.program.")
        hosted = hub.registry.get(spec.program.model)
        job = Job(owner, hosted.name, spec.program.kind, spec.request_id)
        decoded = decode_program(spec.program, hosted, hub.policy)
        try:
            if not stream and decoded.has_local_blocks:
                raise InvalidProgram(NO_STREAM)
            if stream:
                job.link = LocalLink(job)
                job.link.attach()
            published = hub.store.add(job)
            if published is not job:  # the same request_id won a race
                decoded.release()
                return published, True
            try:
                hub.queues[hosted.name].submit(job, decoded, JobLimits.of(spec, hub.limits), job.link)
            except QueueFull:
                hub.store.remove(job)
                raise
        except BaseException:
            decoded.release()
            raise
        return job, False

    def _cancel(self, job: Job, reason: str) -> None:
        if job.request_cancel(reason) and self._hub.queues[job.model].withdraw(job):
            job.finish(jobs_pb2.JOB_STATE_CANCELLED, job.cancel_reason or reason, code=grpc.StatusCode.CANCELLED,
                       ttl=self._hub.limits.result_ttl)

    def _events(self, job: Job, after: int, context: grpc.ServicerContext, wrap) -> Iterator:
        """The job's events after `after`, then live ones until the job ends or the caller goes away."""
        gone = threading.Event()

        def on_rpc_end() -> None:
            gone.set()
            with job.cond:
                job.cond.notify_all()

        if not context.add_callback(on_rpc_end):
            return
        while True:
            events, finished = job.wait_events(after, gone.is_set)
            for event in events:
                yield wrap(event=event)
                after = event.sequence
            if finished or gone.is_set():
                return

    # ---- RPCs ---------------------------------------------------------------------------------
    def RunJob(self, request_iterator, context):
        with _status(context):
            owner = self._hub.auth.identify(context)
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("message") != "job":
                raise InvalidProgram("the first RunJob message must set `job` (the JobSpec to run).")
            job, existing = self._start(first.job, owner, stream=True)
            if job.link is not None:
                if existing:
                    job.link.attach()
                self._readers.submit(self._read_client, request_iterator, job)
            yield from self._events(job, 0, context, jobs_pb2.RunJobResponse)

    def _read_client(self, requests, job: Job) -> None:
        """The client's later messages on a RunJob stream: local() answers and cancel requests."""
        try:
            for message in requests:
                which = message.WhichOneof("message")
                if which == "local_result":
                    job.link.deliver(message.local_result)
                elif which == "cancel":
                    self._cancel(job, message.cancel.reason or "cancelled by the client")
        except Exception:  # the RPC ended under us
            pass
        # A cancelled call and a half-closed one can end the loop in either order: one message for both.
        job.link.detach("the client disconnected from its RunJob stream (or stopped sending on it), so it can "
                        "no longer answer local() calls")

    @_unary
    def SubmitJob(self, request, context, owner):
        job, existing = self._start(request.job, owner, stream=False)
        return jobs_pb2.SubmitJobResponse(job_id=job.id, state=job.state, existing=existing)

    @_unary
    def GetJob(self, request, context, owner):
        job = self._hub.store.get(request.job_id, owner)
        return jobs_pb2.GetJobResponse(job=job.info(self._hub.queues[job.model].position(job)))

    @_streaming
    def WatchJob(self, request, context, owner):
        job = self._hub.store.get(request.job_id, owner)
        yield from self._events(job, max(0, request.after_sequence), context, jobs_pb2.WatchJobResponse)

    @_streaming
    def ReadResult(self, request, context, owner):
        job = self._hub.store.get(request.job_id, owner)
        with job.cond:
            state, message, code, result = job.state, job.status.message, job.failure_code, job.result
        if state in TERMINAL and state != jobs_pb2.JOB_STATE_COMPLETED:
            raise ServerError(f"job {job.id} ended in {state_name(state)} and has no result: {message}",
                              code=code or grpc.StatusCode.FAILED_PRECONDITION)
        if state != jobs_pb2.JOB_STATE_COMPLETED:
            raise ServerError(f"job {job.id} is {state_name(state)}; its result can be read once it is "
                              "COMPLETED (WatchJob tells when).", code=grpc.StatusCode.FAILED_PRECONDITION)
        total = len(result)
        if not 0 <= request.offset <= total:
            raise ServerError(f"offset {request.offset} is outside the result of job {job.id} ({total} bytes)",
                              code=grpc.StatusCode.OUT_OF_RANGE)
        size = self._hub.limits.chunk_size
        view = memoryview(result)
        for offset in range(request.offset, max(total, request.offset + 1), size):
            chunk = jobs_pb2.Chunk(offset=offset, data=bytes(view[offset:offset + size]), total_size=total)
            yield jobs_pb2.ReadResultResponse(chunk=chunk)

    @_unary
    def CancelJob(self, request, context, owner):
        job = self._hub.store.get(request.job_id, owner)
        self._cancel(job, request.reason or "cancelled by the client")
        with job.cond:
            job.cond.wait_for(lambda: job.done, CANCEL_WAIT)
            return jobs_pb2.CancelJobResponse(state=job.state)


class ModelService(models_pb2_grpc.ModelServiceServicer):
    """Describes the hosted models."""

    def __init__(self, hub: Hub):
        self._hub = hub

    @_unary
    def ListModels(self, request, context, owner):
        hub = self._hub
        return models_pb2.ListModelsResponse(
            models=[hosted.info(hub.queues[hosted.name].depth) for hosted in hub.registry]
        )

    @_unary
    def GetModel(self, request, context, owner):
        hosted = self._hub.registry.get(request.name)
        return models_pb2.GetModelResponse(spec=hosted.spec(self._hub.queues[hosted.name].depth))
