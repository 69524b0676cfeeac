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
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2_grpc

from tether.framing import read_result_frame, submit_job_response
from tether.protocol import JOB_ID_METADATA
from tether.v1 import jobs_pb2, jobs_pb2_grpc, models_pb2, models_pb2_grpc

from .auth import Authenticator
from .batching import batch_info
from .check_process import SourceChecker
from .errors import InvalidProgram, ServerError
from .jobs import STATUS_LINGER, TERMINAL, Job, JobStore, state_name
from .limits import Undecodable, check_program, decoded, deserializer
from .local_calls import NO_STREAM
from .policy import Policy
from .program_codec import decode_program
from .registry import Registry
from .result_bytes import Frame
from .workers import JobLimits, Limits, ModelQueue, seconds, stop_job

if TYPE_CHECKING:
    from .deployments import ModelTable

__all__ = ["Hub", "JobService", "ModelService", "CheckedHealth", "add_service", "cancel_job", "unary",
           "CANCEL_WAIT"]

_log = logging.getLogger("tether.server")
CANCEL_WAIT = 10.0  # seconds CancelJob waits for a running job to stop before answering with its state
MAX_SUBMIT_WAIT = 10.0  # seconds SubmitJob may hold its answer for the job to end (SubmitJobRequest.wait)
INLINE_EVENTS_BYTES = 1 << 20  # a waited-for job's events ride in the SubmitJob answer up to this size
# s: a waiting SubmitJob names its job in initial metadata once it has run this long (a job that ends sooner is
# named by its answer, and pays nothing for it)
QUIET_WAIT = 0.05


@dataclass
class Hub:
    """What the servicers share: models, their queues, jobs, and the server's policy, limits and keys."""

    registry: Registry
    queues: dict[str, ModelQueue]
    store: JobStore  # (a cluster's front door: cluster_door.ClusterJobs, the same methods)
    policy: Policy
    limits: Limits
    auth: Authenticator
    models: ModelTable | None = None  # deployments: what add / remove models and resolve names (set by app)


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


def unary(identify: str = "identify"):
    """A unary RPC method `(self, request, context, owner)`: authenticated by `self._hub.auth.<identify>`,
    refused when its request could not be decoded (limits.deserializer), its ServerErrors reported as their
    status codes."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, request, context):
            with _status(context):
                owner = getattr(self._hub.auth, identify)(context)
                return method(self, decoded(request), context, owner)

        return wrapper

    return decorate


_unary = unary()


def _streaming(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        with _status(context):
            owner = self._hub.auth.identify(context)
            yield from method(self, decoded(request), context, owner)

    return wrapper


class JobService(jobs_pb2_grpc.JobServiceServicer):
    """Runs programs on hosted models (see jobs.proto for each RPC's contract)."""

    def __init__(self, hub: Hub, max_streams: int):
        self._hub = hub
        # One reader per open RunJob stream (each also holds an RPC thread, so max_streams = RPC threads);
        # pooled, so a stream does not pay for starting a thread.
        self._readers = futures.ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="tether-runjob-reader")
        self._checker = SourceChecker()  # large programs are parsed and checked in a process of their own

    def close(self) -> None:
        self._readers.shutdown(wait=False)
        self._checker.close()

    # ---- submitting ---------------------------------------------------------------------------
    def _start(self, spec: jobs_pb2.JobSpec, owner: str, *, stream: bool, wait: float = 0.0) -> tuple[Job, bool]:
        """Check, decode and queue a job; (job, existing) where existing means its request_id was seen. `wait`:
        the caller then waits that long for the job's end (JobStore.start)."""
        hub = self._hub
        earlier = hub.store.find_request(owner, spec.request_id)
        if earlier is not None:
            return earlier, True
        if not spec.HasField("program"):
            raise InvalidProgram("the JobSpec has no program: set JobSpec.program.")
        check_program(spec.program, hub.limits)  # sizes, positions, nesting: before any parsing or decoding
        hosted = hub.models.resolve(spec.program.model)
        self._checker.check(spec.program, hub.policy)  # (a large program: in the checking process)
        decoded = decode_program(spec.program, hosted, hub.policy, checking=True)  # refused before it is queued
        batch = batch_info(hosted.model, decoded.program) if hub.limits.max_batch > 1 else (None, 0)
        decoded.release()  # the worker decodes it again, in its own process
        if not stream and decoded.has_local_blocks:
            raise InvalidProgram(NO_STREAM)
        queue = hub.queues.get(hosted.name)
        if queue is None:  # evicted since it was resolved
            hub.registry.get(hosted.name)  # raises NotFound
        job = hub.store.create(owner, hosted.name, spec.program.kind, spec.request_id, stream)
        started = hub.store.start(job, queue, spec.program.SerializeToString(), JobLimits.of(spec, hub.limits), batch,
                                  wait=(wait, INLINE_EVENTS_BYTES))
        return started, started is not job  # (another: the same request_id won a race)

    def _cancel(self, job: Job, reason: str) -> None:
        cancel_job(self._hub, job, reason)

    def _events(self, job: Job, after: int, context: grpc.ServicerContext) -> Iterator[bytes | Frame]:
        """The job's events after `after`, then live ones until the job ends or the caller goes away, each as
        its serialized RunJobResponse / WatchJobResponse (the same bytes; add_service sends bytes as
        they are, and joins a Frame as it sends it). Every event that is ready is sent in one pass, without
        waiting between them; events ready together share a message (RunJobResponse.more_events)."""
        gone = _rpc_end(job, context)
        if gone is None:
            return
        while True:
            frames, count, finished = job.wait_frames(after, gone.is_set, linger=STATUS_LINGER, lazy=True)
            yield from frames
            after += count
            if finished or gone.is_set():
                return

    # ---- RPCs ---------------------------------------------------------------------------------
    def RunJob(self, request_iterator, context):
        with _status(context):
            # the job message first: refused while the client still writes it, a call ends for that client
            # with grpc.aio's "Internal error from Core" instead of the refusal's own status
            first = next(request_iterator, None)
            owner = self._hub.auth.identify(context)
            first = decoded(first)
            if first is None or first.WhichOneof("message") != "job":
                raise InvalidProgram("the first RunJob message must set `job` (the JobSpec to run).")
            job, existing = self._start(first.job, owner, stream=True)
            if job.link is not None:
                if existing:
                    job.link.attach()
                self._readers.submit(self._read_client, request_iterator, job)
            yield from self._events(job, 0, context)

    def _read_client(self, requests, job: Job) -> None:
        """The client's later messages on a RunJob stream: local() answers and cancel requests."""
        try:
            for message in requests:
                if isinstance(message, Undecodable):  # nothing the job can use: the stream stays open
                    _log.warning("job %s: %s", job.id, message.refusal())
                    continue
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
        wait = min(seconds(request.wait), MAX_SUBMIT_WAIT) if request.HasField("wait") else 0.0
        job, existing = self._start(request.job, owner, stream=False, wait=wait)
        frames = None
        if wait > 0 and (gone := _rpc_end(job, context)) is not None:
            frames = job.frames_when_done(gone.is_set, min(wait, QUIET_WAIT), INLINE_EVENTS_BYTES)
            if frames is None and not job.done and not gone.is_set() and wait > QUIET_WAIT:
                context.send_initial_metadata(((JOB_ID_METADATA, job.id),))  # (a short job's answer names it)
                frames = job.frames_when_done(gone.is_set, wait - QUIET_WAIT, INLINE_EVENTS_BYTES)
        response = jobs_pb2.SubmitJobResponse(job_id=job.id, state=job.state, existing=existing).SerializeToString()
        return submit_job_response(response, frames)  # the events are WatchJobResponse frames already

    @_unary
    def GetJob(self, request, context, owner):
        job = self._hub.store.get(request.job_id, owner)
        queue = self._hub.queues.get(job.model)
        return jobs_pb2.GetJobResponse(job=job.info(queue.position(job) if queue is not None else 0))

    @_streaming
    def WatchJob(self, request, context, owner):
        job = self._hub.store.get(request.job_id, owner)
        yield from self._events(job, max(0, request.after_sequence), context)

    @_streaming
    def ReadResult(self, request, context, owner):
        job = self._hub.store.get(request.job_id, owner)
        state, message, code, result = job.outcome()
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
        for offset in range(request.offset, max(total, request.offset + 1), size):
            yield read_result_frame(offset, result.views(offset, size), total)  # the data's one copy

    @_unary
    def CancelJob(self, request, context, owner):
        job = self._hub.store.get(request.job_id, owner)
        self._cancel(job, request.reason or "cancelled by the client")
        return jobs_pb2.CancelJobResponse(state=job.wait_done(CANCEL_WAIT))


def cancel_job(hub: Hub, job: Job, reason: str) -> None:
    """Ask `job` to stop: one still queued ends CANCELLED at once, a running one at its next module boundary."""
    stop_job(job, hub.queues.get(job.model), reason)


def _rpc_end(job: Job, context: grpc.ServicerContext) -> threading.Event | None:
    """An Event set when the RPC ends (waking the job's waiters), or None if it has ended already."""
    gone = threading.Event()

    def on_rpc_end() -> None:
        gone.set()
        with job.cond:
            job.cond.notify_all()

    return gone if context.add_callback(on_rpc_end) else None


class ModelService(models_pb2_grpc.ModelServiceServicer):
    """Describes the hosted models."""

    def __init__(self, hub: Hub):
        self._hub = hub

    @_unary
    def ListModels(self, request, context, owner):
        return models_pb2.ListModelsResponse(models=self._hub.models.infos())

    @_unary
    def GetModel(self, request, context, owner):
        hosted = self._hub.models.resolve(request.name)
        spec = hosted.spec()
        spec.info.CopyFrom(self._hub.models.info(hosted.name))
        return models_pb2.GetModelResponse(spec=spec)


def _serialize(message) -> bytes:
    """A response as bytes: messages are serialized, bytes (already serialized responses) sent as they are,
    Frames (serialized responses still in pieces) joined now, just before they are sent."""
    if type(message) is bytes:
        return message
    return b"".join(message) if type(message) is Frame else message.SerializeToString()


_HANDLERS = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


def add_service(servicer: Any, server: grpc.Server, service: Any) -> None:
    """Register `servicer`'s methods of `service` (a protobuf ServiceDescriptor), the generated
    add_*Servicer_to_server except that a request that fails to decode reaches the servicer as an Undecodable
    (refused as INVALID_ARGUMENT naming its message type, not grpc's INTERNAL), and that responses may come
    already serialized (bytes, Frames: result chunks are framed straight from the result's pieces)."""
    handlers = {
        method.name: _HANDLERS[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name), request_deserializer=deserializer(GetMessageClass(method.input_type)),
            response_serializer=_serialize)
        for method in service.methods if hasattr(servicer, method.name)
    }
    _add_handlers(server, service.full_name, handlers)


class CheckedHealth(health_pb2_grpc.HealthServicer):
    """grpc's health servicer, refusing a request that fails to decode as INVALID_ARGUMENT (see add_service)."""

    def __init__(self, inner: health_pb2_grpc.HealthServicer):
        self._inner = inner

    def Check(self, request, context):
        with _status(context):
            decoded(request)
        return self._inner.Check(request, context)

    def List(self, request, context):
        with _status(context):
            decoded(request)
        return self._inner.List(request, context)

    def Watch(self, request, context, send_response_callback=None):
        with _status(context):
            decoded(request)
        return self._inner.Watch(request, context, send_response_callback)

    Watch.experimental_non_blocking = True  # as grpc's own: a watch holds no RPC thread (its callback sends)


def _add_handlers(server: grpc.Server, service: str, handlers: dict) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(service, handlers)
