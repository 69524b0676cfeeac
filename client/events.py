"""What a client does with a job's events and its result, whichever call (RunJob, WatchJob) carried them.

`JobEvents` folds events into state, log output, result bytes and local() calls; `apply_result` writes
a finished job's values into the caller's namespace exactly as a local run would. No grpc here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from tether.protocol import CLIENT_MODULE, TERMINAL, state_name
from tether.runtime.errors import RemoteError, TetherError
from tether.runtime.saving import NotReached, StandIn, UnsavedValue, current_scope
from tether.v1 import jobs_pb2, values_pb2
from tether.values import import_reference
from tether.wire import decode_values

from .display import StatusDisplay
from .encode import Job
from .errors import from_failure
from .outside import merge_into
from .wire import result_buffer, split_value_map

__all__ = ["AwaitedValue", "DecodedResult", "JobEvents", "PendingValue", "apply_result", "decode_result", "state_name", "resolvers",
           "PROGRESS_MIN_BYTES", "TERMINAL"]

PROGRESS_MIN_BYTES = 8 << 20  # results at least this large get a progress bar


class PendingValue(StandIn):
    """Stands for a name of a non-blocking job that has not finished (or was not fetched) yet."""

    __slots__ = ()

    def _error(self) -> Exception:
        return TetherError(
            f"`{self._name}` is not available yet: {self._why}. Run the same block again with "
            "`remote=True, backend=tracer.backend` to fetch it (add `blocking=True` to wait for the job), or "
            "call `tracer.backend.result()` to wait for it."
        )


class AwaitedValue(PendingValue):
    """Stands for a name of an AsyncBackend's block until the job is awaited."""

    __slots__ = ()

    def _error(self) -> Exception:
        return TetherError(
            f"`{self._name}` is not available yet: {self._why}. Run the job with `values = await backend` "
            f"(the backend= you passed): at module or notebook level that also fills `{self._name}`; inside "
            f"a function read it from the returned dict, `values[{self._name!r}]`."
        )


class JobEvents:
    """The client's view of one job, built from its events in sequence order (duplicates ignored)."""

    def __init__(self, display: StatusDisplay, *, job_id: str = "", log: Callable[[str], None] | None = None,
                 debug: bool = False):
        self.display = display
        self.job_id = job_id
        self.last_sequence = 0  # events up to here were handled; a re-attach asks for the ones after
        self.state = jobs_pb2.JOB_STATE_UNSPECIFIED
        self.status: jobs_pb2.JobStatus | None = None  # the latest status event
        self.result: bytearray | memoryview = bytearray()  # the serialized JobResult (its first `received` bytes so far)
        self.received = 0  # bytes of it received so far
        self.result_total = -1  # its size once the first chunk said so
        self._log = log
        self._debug = debug
        self.state_times: dict[int, float] = {}  # state -> when the server entered it (epoch seconds)
        self.waited = False  # the job was queued behind others

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    @property
    def result_complete(self) -> bool:
        return self.result_total >= 0 and self.received == self.result_total

    def feed_response(self, response: jobs_pb2.RunJobResponse | jobs_pb2.WatchJobResponse
                      ) -> list[jobs_pb2.LocalCall]:
        """Handle a RunJob / WatchJob response's events (`event`, then `more_events` in order); returns the
        local() calls among them, for the caller to answer."""
        calls = []
        local_call = self.feed(response.event)
        if local_call is not None:
            calls.append(local_call)
        for event in response.more_events:
            local_call = self.feed(event)
            if local_call is not None:
                calls.append(local_call)
        return calls

    def feed(self, event: jobs_pb2.JobEvent) -> jobs_pb2.LocalCall | None:
        """Handle one event; returns it when it is a local() call for the caller to answer."""
        if event.sequence and event.sequence <= self.last_sequence:
            return None  # seen before this re-attach
        self.last_sequence = max(self.last_sequence, event.sequence)
        if event.job_id:
            self.job_id = event.job_id
        kind = event.WhichOneof("event")
        if self._debug:
            print(f"tether: job {self.job_id} #{event.sequence} {kind}", file=sys.stderr)
        if kind == "status":
            self.state, self.status = event.status.state, event.status
            self.state_times.setdefault(event.status.state, event.time.ToNanoseconds() / 1e9)
            self.waited = self.waited or event.status.queue_position > 0
            message = event.status.message
            if event.status.state == jobs_pb2.JOB_STATE_QUEUED and event.status.queue_position:
                message = message or f"position {event.status.queue_position} in the queue"
            if event.status.batch_size > 1 and self.display.verbose:  # shared a batched run with other jobs
                message = " ".join(filter(None, (message, f"batched with {event.status.batch_size - 1} other jobs")))
            if self.done:
                message = " ".join(filter(None, (self._timing(), message)))
            self.display.update(self.job_id, state_name(event.status.state), message, elapsed=self._elapsed())
        elif kind == "progress":
            total = f"/{event.progress.total_steps}" if event.progress.total_steps else ""
            self.display.update(self.job_id, message=f"step {event.progress.step}{total}")
        elif kind == "log":
            if self._log is not None:
                self.display.pause()
                try:
                    self._log(event.log.text)
                finally:
                    self.display.resume()
        elif kind == "result":
            self.add_result_chunk(event.result)
        elif kind == "local_call":
            return event.local_call
        return None

    def _elapsed(self) -> float | None:
        """Seconds from the server's first event to its last, once the job ended (a fetched job's real time)."""
        times = self.state_times
        if not self.done or not times:
            return None
        return times[self.state] - min(times.values())

    def _timing(self) -> str:
        """"(queued 3.1s, ran 5.2s)" for a job that waited behind others (or long); else ""."""
        times = self.state_times
        start, running = min(times.values(), default=None), times.get(jobs_pb2.JOB_STATE_RUNNING)
        if start is None or running is None:
            return ""
        queued, ran = running - start, times[self.state] - running
        return f"(queued {queued:.1f}s, ran {ran:.1f}s)" if self.waited or queued >= 0.05 else ""

    def add_result_chunk(self, chunk: jobs_pb2.Chunk) -> None:
        """Write one chunk into the result buffer (allocated once, at its full size, by the first chunk)."""
        offset, received = chunk.offset, self.received
        if offset != received:
            if offset < received:
                return  # a chunk we already have (replayed)
            raise RemoteError(
                f"job {self.job_id}: result chunk at byte {offset} but {received} bytes were "
                "received; the result is incomplete. Fetch it again with tether.client.RemoteBackend(job_id=...)."
            )
        data = chunk.data
        if self.result_total < 0:
            self.result_total = chunk.total_size
            self.result = result_buffer(chunk.total_size, data)
        end = received + len(data)
        if chunk.total_size != self.result_total or end > self.result_total:
            raise RemoteError(
                f"job {self.job_id}: result chunk at byte {offset} ({len(data)} bytes of {chunk.total_size}) does "
                f"not fit the {self.result_total}-byte result. Fetch it again with tether.client.RemoteBackend(job_id=...)."
            )
        self.result[received:end] = data
        self.received = end
        if self.result_total >= PROGRESS_MIN_BYTES:
            self.display.progress(end, self.result_total)

    def raise_if_failed(self) -> None:
        if self.state == jobs_pb2.JOB_STATE_ERROR:
            raise from_failure(self.status.failure, job_id=self.job_id, debug=self._debug)
        if self.state == jobs_pb2.JOB_STATE_CANCELLED:
            why = self.status.message if self.status is not None else ""
            raise RemoteError(f"Job {self.job_id} was cancelled{': ' + why if why else ''}.", code="CANCELLED")


def print_log(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------- results


def resolvers(job: Job | None, client_ns: dict | None = None) -> dict[str, Any]:
    """from_value options for values coming from the server: model references, imported names only."""

    def resolve_reference(ref: values_pb2.Reference) -> Any:
        if ref.module == CLIENT_MODULE:
            if client_ns is not None and ref.qualname in client_ns:
                return client_ns[ref.qualname]
            raise TetherError(f"the server referred to the client function {ref.qualname!r}, which is not bound here")
        if ref.module.split(".")[0] not in sys.modules:
            raise TetherError(
                f"the server sent a reference to {ref.module}, which this program has not imported; "
                "tether does not import modules on a server's behalf"
            )
        return import_reference(ref)

    def resolve_model(ref: values_pb2.ModelReference) -> Any:
        if job is None or ref.name != job.model_name:
            raise TetherError(f"the server sent a reference to model {ref.name!r}, which this job does not use")
        target = job.model
        for part in filter(None, getattr(ref, "path", "").split(".")):
            target = target[int(part)] if part.isdigit() else getattr(target, part)
        return target

    return {"resolve_reference": resolve_reference, "resolve_model": resolve_model}


class DecodedResult(NamedTuple):
    """A decoded JobResult: values by name, the other names, and each saved value's serialized Value."""

    saved: dict[str, Any]
    unsaved: list[str]
    unreached: list[str]
    unreached_reason: str
    raw: dict[str, memoryview]  # name -> its Value's bytes (views of the result buffer)


def decode_result(data: bytes | bytearray | memoryview, job: Job | None) -> DecodedResult:
    """Decode a serialized JobResult; top-level tensors share `data` when it is writable (no copy)."""
    raw, rest = split_value_map(data)
    result = jobs_pb2.JobResult.FromString(rest)  # everything but the saved values: small
    saved = decode_values(raw, **resolvers(job))
    return DecodedResult(saved, list(getattr(result, "unsaved", ())), list(getattr(result, "unreached", ())),
                         getattr(result, "unreached_reason", ""), raw)


def _same_value(sent: bytes, raw: memoryview) -> bool:
    """Whether a Value the server sent back is the one the client sent (`sent`: deterministic bytes)."""
    if abs(len(raw) - len(sent)) > 16:
        return False  # the same message serializes to (nearly: explicit defaults) the same size in any order
    if raw == sent:
        return True
    return values_pb2.Value.FromString(raw).SerializeToString(deterministic=True) == sent


def apply_result(job: Job, data: bytes | bytearray | memoryview, ns: dict, *,
                 kept: dict[str, Any] | None = None) -> None:
    """Write a finished job's values into `ns` (the caller's names) as a local run leaves them.

    Saved values join the current SaveScope, so the outermost context's hand-back keeps them (tensors get
    `.value`); unsaved ones become UnsavedValue, unreached ones NotReached. `kept`: values local() blocks
    assigned that stayed on the client, used where the server has none.
    """
    saved, unsaved, unreached, reason, raw = decode_result(data, job)
    kept = kept or {}
    scope = current_scope()
    for name, value in saved.items():
        sent = job.sent.get(name)
        if sent is not None and name in ns and _same_value(sent, raw[name]):
            continue  # the caller's own value, unchanged: keep the very object, as a local run does
        if sent is not None and name in ns and name not in job.assigned:
            ns[name] = merge_into(ns[name], value)  # an outside object the body changed in place
            continue
        ns[name] = value
        if scope is not None:
            scope.add(value)
    for name in unsaved:
        ns[name] = kept[name] if name in kept else UnsavedValue(name)
    for name in unreached:
        ns[name] = kept[name] if name in kept else NotReached(name, reason)
    mentioned = set(saved) | set(unsaved) | set(unreached)
    for name in job.assigned:
        if name in mentioned:
            continue
        if name in kept:
            ns[name] = kept[name]
        else:
            ns.pop(name, None)  # the server kept nothing under this name: the hand-back says NotReached


def mark_pending(job: Job, ns: dict, why: str, kind: type[PendingValue] = PendingValue) -> None:
    """Every name the body assigns stands for a value a non-blocking job has not delivered yet."""
    for name in job.assigned:
        ns[name] = kind(name, why)
