"""A front door of a cluster (`--ray`): its calls on the cluster's core (`Core`), and the job store, job records
and local() links that service.py, admin.py and app.py use, each answered by the core (`cluster.ClusterCore`),
where the records live (its model table: cluster_models.py). Imports ray lazily and the server's modules;
holds no job state of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import grpc

from tether.v1 import jobs_pb2

from .cluster import CORE_NAME, FIRST_EVENTS, LANE_CALLS, WAIT_SLICE, JobMeta, Refused, core_of
from .errors import CallFailed, LaneBroken, LaneUnavailable, ServerError
from .jobs import TERMINAL, new_job_id, unknown_job
from .lanes import Calls
from .workers import JobLimits, Limits

if TYPE_CHECKING:
    from .cluster_models import ClusterQueue

__all__ = ["Core", "ClusterJobs", "RemoteJob", "connect_core", "CALL_TIMEOUT"]

_log = logging.getLogger("tether.server")
CALL_TIMEOUT = 60.0  # s: the longest a call on the core may take beyond what it waits for by design


class Core:
    """Calls on the cluster's core from this front door: each waits for its answer; a refusal is raised as the
    ServerError it was, a core that does not answer as UNAVAILABLE. The calls of a job's path (LANE_CALLS) go
    over this door's lanes to the core (lanes.py) once `open_lanes` found where; the others, and all of them
    where no lane can be opened, as Ray actor calls."""

    def __init__(self, handle: Any, namespace: str):
        self.handle, self.namespace = handle, namespace
        self._calls: Calls | None = None  # (None: every call through Ray)

    @property
    def lanes(self) -> bool:
        """Whether this door's calls on a job's path go over lanes."""
        return self._calls is not None

    def open_lanes(self) -> None:
        """Learn where the core takes lanes (one Ray call); without an answer every call goes through Ray."""
        import ray

        try:
            where = ray.get(self.handle.lane.remote(), timeout=CALL_TIMEOUT)
        except Exception as error:
            _log.warning("the cluster's core gave no lane (%s): this front door calls it through Ray", error)
            return
        if where is not None:
            self._calls = Calls((where[0], where[1]), where[2])

    def close(self) -> None:
        """This front door stops: its idle lanes are closed (a call still made opens one for itself)."""
        if self._calls is not None:
            self._calls.close()

    def __call__(self, method: str, *args: Any, wait: float = 0.0) -> Any:
        calls = self._calls if method in LANE_CALLS else None
        if calls is None:
            answer = self._by_ray(method, args, wait)
        else:
            try:
                answer = calls(method, args, wait + CALL_TIMEOUT)
            except LaneUnavailable as error:  # nothing reached the core: Ray carries it
                if calls.unusable and self._calls is calls:
                    _log.warning("%s: this front door calls the cluster's core through Ray from now on", error)
                    self._calls = None
                answer = self._by_ray(method, args, wait)
            except LaneBroken as error:
                raise self._unanswered(str(error)) from None
            except CallFailed as error:  # a bug: the core answers refusals as data
                raise ServerError(f"the cluster's job store failed in {method}: {error}") from None
        if isinstance(answer, Refused):
            raise answer.error()
        return answer

    def post(self, method: str, *args: Any) -> None:
        """A call (of LANE_CALLS) whose answer this door need not wait for: over a lane, one write, run after the
        door's earlier posts (a local() answer, then the stream's end, keep their order); without lanes, a
        call as any other."""
        calls = self._calls if method in LANE_CALLS else None
        if calls is not None:
            try:
                return calls.post(method, args)
            except LaneBroken as error:
                raise self._unanswered(str(error)) from None
            except LaneUnavailable:  # nothing reached the core: Ray carries it
                pass
        self(method, *args)

    def _by_ray(self, method: str, args: tuple, wait: float) -> Any:
        import ray
        from ray.exceptions import RayTaskError

        try:
            return ray.get(getattr(self.handle, method).remote(*args), timeout=wait + CALL_TIMEOUT)
        except RayTaskError as error:  # a bug: the core answers refusals as data
            raise ServerError(f"the cluster's job store failed in {method}: {error.cause!r}") from None
        except Exception as error:  # the actor died, the cluster went away, or it did not answer in time
            raise self._unanswered(f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}") \
                from None

    def _unanswered(self, why: str) -> ServerError:
        return ServerError(
            f"the cluster's job store (the Ray actor {CORE_NAME!r} in namespace {self.namespace!r}) did not "
            f"answer: {why}. Check the cluster (`ray status`); once it runs again, restart the front doors.",
            code=grpc.StatusCode.UNAVAILABLE)


def connect_core(limits: Limits, policy: Any) -> Core:
    """This front door's connection to the core of its namespace (started if none runs)."""
    core = Core(core_of(limits, policy), limits.ray_namespace)
    if limits.ray_lanes:
        core.open_lanes()
    return core


class RemoteLink:
    """A job's RunJob streams as LocalLink's attach/detach/deliver, kept by the core's LocalLink."""

    def __init__(self, core: Core, job_id: str, ended):
        self._core, self._job_id, self._ended = core, job_id, ended  # ended(): this door saw the job end

    def attach(self) -> None:
        self._core("attach", self._job_id)

    def detach(self, reason: str) -> None:
        if self._ended():  # no local() call can come any more: the core need not hear of it (a call saved)
            return
        try:
            self._core.post("detach", self._job_id, reason)  # (after this stream's answers: posted too)
        except ServerError as error:
            _log.warning("job %s: could not tell the cluster its stream ended: %s", self._job_id, error)

    def deliver(self, answer: jobs_pb2.LocalResult) -> None:
        """Posted: the stream's reader goes on to the client's next message at once (the core's deliver answers
        nothing, and fails nothing a client should hear of)."""
        self._core.post("deliver", self._job_id, answer.SerializeToString())


class RemoteResult:
    """A completed job's result as ResultBytes reads (its length, views of a range), read from the core."""

    def __init__(self, core: Core, job_id: str, size: int):
        self._core, self._job_id, self.size = core, job_id, size

    def __len__(self) -> int:
        return self.size

    def views(self, offset: int, size: int) -> list[memoryview]:
        return [memoryview(self._core("read", self._job_id, offset, size))]


class RemoteJob:
    """A job whose record the core keeps, with the Job methods the servicers use."""

    def __init__(self, core: Core, meta: JobMeta):
        self._core, self.meta = core, meta
        self.id, self.owner, self.model, self.kind = meta.job_id, meta.owner, meta.model, meta.kind
        self.request_id = meta.request_id
        self.cond = threading.Condition()  # (notified by the servicers; waits on the core are WAIT_SLICE at most)
        self.link = RemoteLink(core, self.id, lambda: self._finished) if meta.stream else None
        self._ended = 0  # the terminal state once a call saw it (it never changes again)
        self._finished = False  # a call saw it end and every event was read
        self.when_done: tuple | None = None  # (frames, state) the core's start answered after waiting for its end
        self.first_frames: tuple | None = None  # a RunJob's wait_frames from 0, answered by the core's start

    @property
    def state(self) -> int:
        return self._ended or self._seen(self._core("state", self.id))

    def _seen(self, state: int) -> int:
        if state in TERMINAL:
            self._ended = state
        return state

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def info(self, queue_position: int = 0) -> jobs_pb2.JobInfo:
        return jobs_pb2.JobInfo.FromString(self._core("info", self.id))  # (the core knows its position)

    def outcome(self) -> tuple[int, str, grpc.StatusCode | None, RemoteResult | None]:
        state, message, code, size = self._core("outcome", self.id)
        return (state, message, grpc.StatusCode[code] if code else None,
                RemoteResult(self._core, self.id, size) if size >= 0 else None)

    def wait_done(self, timeout: float) -> int:
        return self._core("wait_done", self.id, timeout, wait=timeout)

    def request_cancel(self, reason: str) -> bool:
        """Ask the job to stop (the core also takes it out of its queue); True if it had not ended."""
        return self._core("cancel", self.id, reason)

    def wait_frames(self, after: int, stop, timeout: float | None = None, limit: int = 16,
                    linger: float = 0.0, lazy: bool = False) -> tuple[list[bytes], int, bool]:
        """Job.wait_frames through the core, in waits of WAIT_SLICE at most (so `stop()` is seen); its frames
        come joined (`lazy` or not: they crossed from the core as bytes)."""
        answered, self.first_frames = self.first_frames, None
        if answered is not None and after == 0 and limit == FIRST_EVENTS:
            self._finished = self._finished or answered[2]
            return answered
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = WAIT_SLICE if deadline is None else max(0.0, min(WAIT_SLICE, deadline - time.monotonic()))
            frames, count, finished = self._core("wait_frames", self.id, after, limit, linger, left, wait=left)
            self._finished = self._finished or finished
            if frames or finished or stop() or (deadline is not None and time.monotonic() >= deadline):
                return frames, count, finished

    def frames_when_done(self, stop, timeout: float, max_bytes: int) -> list[bytes] | None:
        """Job.frames_when_done through the core (answered already, once, when its start waited for the end)."""
        answered, self.when_done = self.when_done, None
        frames, state = answered or self._core("frames_when_done", self.id, timeout, max_bytes, wait=timeout)
        self._seen(state)
        return frames


class ClusterJobs:
    """The servicers' job store (JobStore's methods) for a front door of a cluster: records live in the core."""

    def __init__(self, core: Core):
        self._core = core

    def create(self, owner: str, model: str, kind: int, request_id: str, stream: bool) -> RemoteJob:
        return RemoteJob(self._core, JobMeta(new_job_id(), owner, model, kind, request_id, stream))

    def find_request(self, owner: str, request_id: str) -> RemoteJob | None:
        """None: `start` finds the job an earlier request made (the core publishes the first one only), so a new
        job costs no call for this."""
        return None

    def start(self, job: RemoteJob, queue: ClusterQueue, program: bytes, limits: JobLimits,
              batch: tuple, wait: tuple[float, int] = (0.0, 0)) -> RemoteJob:
        """JobStore.start in one call on the core (it publishes and queues the job, and with `wait` also waits
        for its end: the job's frames_when_done then answers without a call); the earlier job with its
        request id if there is one."""
        try:
            meta, done = self._core("start", job.meta, program, limits, batch, queue.generation, wait, wait=wait[0])
        except ServerError as error:
            if error.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                queue.gone()
            raise
        if meta.job_id != job.id:
            return RemoteJob(self._core, meta)
        if job.link is not None:
            job.first_frames = done
        else:
            job.when_done = done
        return job

    def get(self, job_id: str, owner: str) -> RemoteJob:
        meta = self._core("find", job_id)
        if meta is None or meta.owner != owner:
            raise unknown_job(job_id)
        return RemoteJob(self._core, meta)

    def find(self, job_id: str) -> RemoteJob | None:
        meta = self._core("find", job_id)
        return None if meta is None else RemoteJob(self._core, meta)

    def jobs(self) -> list[RemoteJob]:
        return [RemoteJob(self._core, meta) for meta in self._core("jobs")]

    def __len__(self) -> int:
        return len(self._core("jobs"))
