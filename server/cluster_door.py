"""A front door of a cluster (`--ray`): the job store, job records, local() links, model table and queues that
service.py, admin.py and app.py use, each answered by the cluster's core (`cluster.ClusterCore`), where the
records live. Imports ray lazily and the server's modules; holds no job state of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import grpc

from tether.v1 import jobs_pb2, models_pb2

from .cluster import CORE_NAME, FIRST_EVENTS, LANE_CALLS, WAIT_SLICE, JobMeta, Refused, core_of
from .deployments import FAILED, READY, Deployment, ModelTable
from .errors import CallFailed, LaneBroken, LaneUnavailable, ModelExists, NotFound, ServerError
from .jobs import TERMINAL, new_job_id, unknown_job
from .lanes import Calls
from .ray_workers import PickledModel, gpus_of
from .registry import HostedModel
from .supervisor import payload_of
from .workers import JobLimits, Limits

__all__ = ["Core", "ClusterJobs", "ClusterModels", "ClusterQueue", "RemoteJob", "connect_core"]

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


class RemoteReplica:
    """One replica of a model the cluster hosts, as operators and tests read it (worker_pid, restarts)."""

    def __init__(self, core: Core, model: str, index: int):
        self._core, self._model, self.index = core, model, index

    def worker_pid(self, timeout: float | None = None) -> int | None:
        deadline = time.monotonic() + (CALL_TIMEOUT if timeout is None else timeout)
        while True:
            left = max(0.0, min(WAIT_SLICE, deadline - time.monotonic()))
            pid = self._core("worker_pid", self._model, self.index, left, wait=left)
            if pid is not None or time.monotonic() >= deadline:
                return pid

    @property
    def restarts(self) -> int:
        return self._core("restarts", self._model, self.index)


class ClusterQueue:
    """A model's queue as a front door sees it (ModelQueue's methods): the queue itself is the core's."""

    def __init__(self, core: Core, name: str, generation: int, replicas: int, gone):
        self._core, self.name, self.generation, self._replicas = core, name, generation, replicas
        self._gone = gone  # called when the core no longer hosts this generation of the model

    def gone(self) -> None:
        """The core no longer hosts this generation of the model: the door drops its copy."""
        self._gone(self.name, self.generation)

    def position(self, job: Any) -> int:
        return 0  # (RemoteJob.info has the core's)

    def withdraw(self, job: Any) -> bool:
        return False  # (the core's cancel takes a queued job out)

    @property
    def replicas(self) -> list[RemoteReplica]:
        return [RemoteReplica(self._core, self.name, i) for i in range(self._replicas)]

    def close(self, reason: str = "") -> int:
        """Stop hosting the model on the cluster (an evict through this door); how many jobs were cancelled."""
        try:
            return self._core("evict", self.name, reason)
        except NotFound:
            return 0

    def join(self, timeout: float | None = None) -> None:
        """(The model's replicas are the cluster's: nothing here to wait for.)"""


class ClusterModels(ModelTable):
    """The models of a cluster's front door: those the cluster hosts (found in the core by name, each with a
    copy of its weights here to check programs and describe it) and those this door is loading to host there."""

    def __init__(self, core: Core, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._core = core
        self._found = threading.Lock()  # one lookup of a model in the cluster at a time

    def _start_queue(self, deployment: Deployment, hosted: HostedModel) -> ClusterQueue | None:
        """Host the model this door loaded on the cluster (or serve the cluster's, if it hosts one by that name:
        a front door restarted with its --model)."""
        name, payload = deployment.name, payload_of(hosted.model)
        try:
            try:  # (as bytes: the core puts them in the object store, owned by it, never loading the model)
                generation = self._core("host", name, PickledModel.of(payload), hosted.source, deployment.replicas,
                                        hosted.info().SerializeToString(), gpus_of(payload))
            except ModelExists:
                found, info = self._core("model", name), self._core_info(name)
                if found is None or info is None:
                    raise ServerError("it was evicted from the cluster while this front door hosted it") from None
                generation, deployment.replicas = found[2], info.replicas
                _log.warning("the cluster already hosts a model named %s: this front door serves the cluster's",
                             name)
        except ServerError as error:
            self._set(deployment, FAILED, f"the cluster cannot host it: {error}")
            return None
        return ClusterQueue(self._core, name, generation, deployment.replicas, self._forget)

    def _core_info(self, name: str) -> models_pb2.ModelInfo | None:
        info = self._core("model_info", name)
        return None if info is None else models_pb2.ModelInfo.FromString(info)

    def _find(self, name: str) -> None:
        """Serve `name` here if the cluster hosts it and this door does not know it yet."""
        import ray

        with self._found:
            with self._cond:
                if name in self._deployments or self._closed:
                    return
            found, info = self._core("model", name), self._core_info(name)
            if found is None or info is None:
                return
            refs, source, generation = found
            try:
                copy = ray.get(refs[0]).load()
            except Exception as error:
                raise ServerError(
                    f"this front door cannot load its copy of model {name!r} (it checks programs with it): "
                    f"{type(error).__name__}: {error}. A model on a GPU needs front doors on machines with that "
                    "GPU; or send the job through the front door that deployed it.",
                    code=grpc.StatusCode.FAILED_PRECONDITION) from None
            hosted = self._registry.add(name, copy, source)
            deployment = Deployment(name, "hosted by the cluster", info.replicas, self.default_placement,
                                    state=READY, hosted=hosted)
            deployment.queue = ClusterQueue(self._core, name, generation, info.replicas, self._forget)
            with self._cond:
                self._deployments[name] = deployment
                self._queues[name] = deployment.queue
                self._cond.notify_all()
        _log.info("serving %s, hosted by the cluster", name)

    def _forget(self, name: str, generation: int) -> None:
        """Drop this door's copy of a model the cluster no longer hosts (evicted, or deployed again elsewhere)."""
        with self._cond:
            deployment = self._deployments.get(name)
            if deployment is None or deployment.queue is None or deployment.queue.generation != generation:
                return
            del self._deployments[name]
            self._queues.pop(name, None)
        self._registry.remove(name, deployment.hosted)

    # ---- ModelTable's methods, answered by the cluster ------------------------------------------
    def deploy(self, name: str, load: Any, **kwargs: Any) -> Deployment:
        if self._core("model", name) is not None:
            raise ModelExists(f"the cluster already hosts a model named {name!r}; evict it first "
                              f"(`tether evict {name}`) or choose another name")
        return super().deploy(name, load, **kwargs)

    def evict(self, name: str, reason: str = "") -> int:
        with self._cond:
            here = name in self._deployments
        return super().evict(name, reason) if here else self._core("evict", name, reason)

    def close(self) -> None:
        """This front door stops: the cluster keeps its models (and their jobs)."""
        with self._cond:
            self._closed = True
        self._core.close()

    def resolve(self, name: str, wait: float | None = None) -> HostedModel:
        self._find(name)
        with self._cond:
            known = name in self._deployments
        if not known:
            names = [info.name for info in self.infos()]
            raise NotFound(f"the cluster hosts no model named {name!r}; it hosts {', '.join(names) or 'none'}. "
                           "Check the model name (ListModels, or `tether models`, shows them).")
        return super().resolve(name, wait)

    def wait(self, name: str, timeout: float) -> Deployment:
        self._find(name)
        return super().wait(name, timeout)

    def infos(self) -> list[models_pb2.ModelInfo]:
        hosted = [models_pb2.ModelInfo.FromString(info) for info in self._core("infos")]
        names = {info.name for info in hosted}
        loading = [self.describe(d) for d in self.deployments() if d.name not in names and d.state != READY]
        return sorted(hosted + loading, key=lambda info: info.name)

    def info(self, name: str) -> models_pb2.ModelInfo:
        info = self._core_info(name)
        return info if info is not None else super().info(name)

    def describe(self, deployment: Deployment) -> models_pb2.ModelInfo:
        if deployment.state != READY:
            return super().describe(deployment)
        info = self._core_info(deployment.name)
        if info is None:
            return models_pb2.ModelInfo(name=deployment.name, replicas=deployment.replicas, state=FAILED,
                                        state_message="no longer hosted by the cluster (evicted)")
        return info
