"""What the front doors of one cluster share under `--ray`: `ClusterCore`, a detached named Ray actor (one per
namespace) holding every job record (jobs.JobStore) and every model's queue and replicas (workers.ModelQueue
with ray_workers.RayReplica). Imports ray lazily and the server's job and queue modules; nothing of grpc servicers.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import threading
import time
from typing import Any

import grpc

from tether.v1 import jobs_pb2, models_pb2

from . import errors
from .errors import ModelExists, NotFound, ServerError
from .jobs import STATUS_LINGER, Job, JobStore, unknown_job
from .workers import JobLimits, Limits, ModelQueue, stop_job

__all__ = ["ClusterCore", "JobMeta", "Refused", "core_of", "shut_down", "CORE_NAME", "FIRST_EVENTS", "WAIT_SLICE",
           "LANE_CALLS"]

_log = logging.getLogger("tether.server")
CORE_NAME = "core"  # the core's actor name, in its namespace (`ray list actors` shows it)
MAX_CALLS = 256  # calls the core serves at once (front doors' watchers each hold one for up to WAIT_SLICE)
WAIT_SLICE = 1.0  # s: the longest one call waits for a job's events (a watcher that left is seen within this)
FIRST_EVENTS = 16  # events a RunJob's start brings at most (the servicer's wait_frames limit)
EVICT_WAIT = 10.0  # s: an evict waits this long for the model's replicas to stop (their actors killed)
# the core's methods a front door calls over its lanes (lanes.py): a job's path and reads; not those whose
# arguments or answers hold Ray's object references or code to unpickle (host, model), nor lifecycle
LANE_CALLS = frozenset({
    "start", "find", "jobs", "state", "info", "outcome", "read", "wait_frames", "frames_when_done", "cancel",
    "wait_done", "attach", "detach", "deliver", "worker_pid", "restarts", "infos", "model_info", "deployment"})
LOADING, READY, FAILED = models_pb2.MODEL_STATE_LOADING, models_pb2.MODEL_STATE_READY, models_pb2.MODEL_STATE_FAILED


@dataclasses.dataclass(frozen=True)
class Refused:
    """A ServerError as the core answers it (never raised across Ray): its class name, message and code."""

    kind: str
    message: str
    code: str

    def error(self) -> ServerError:
        cls = getattr(errors, self.kind, None)
        cls = cls if isinstance(cls, type) and issubclass(cls, ServerError) else ServerError
        return cls(self.message, code=grpc.StatusCode[self.code])


@dataclasses.dataclass(frozen=True)
class JobMeta:
    """What a front door keeps of a job it serves: the record itself stays in the core."""

    job_id: str
    owner: str
    model: str
    kind: int
    request_id: str
    stream: bool  # whether it has a RunJob stream (local() calls go up it)


def _meta(job: Job) -> JobMeta:
    return JobMeta(job.id, job.owner, job.model, job.kind, job.request_id, job.link is not None)


def _refusals(method):
    """Answer a ServerError as a Refused (Ray would wrap the exception; the front door raises it again)."""

    @functools.wraps(method)  # (Ray reads the method's signature)
    def answer(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except ServerError as error:
            return Refused(type(error).__name__, str(error), error.code.name)

    return answer


class _Shipped:
    """A model's root as the core holds it: its payload stays in the object store, never loaded here (so the
    core needs neither the memory nor the GPUs of the models; `supervisor.payload_of` gives the reference)."""

    tokenizer = None

    def __init__(self, ref: Any):
        self._module = ref


@dataclasses.dataclass
class Deploying:
    """A model a front door is loading to host on the cluster (`ClusterCore.announce`), or whose load failed
    there: every door lists it and answers a job for it from this record, as the door loading it does."""

    claim: int  # names this load: `host` and `failed` from the door loading it give it back
    spec: str  # what is loading
    door: str  # where: the front door's machine and process, for the operator
    info: bytes  # its ModelInfo as the door describes it before it is loaded (name, device, dtype)
    since: float = dataclasses.field(default_factory=time.monotonic)  # when its current state began
    message: str = ""  # why its load failed ("": loading)

    @property
    def state(self) -> int:
        return FAILED if self.message else LOADING

    def describe(self) -> models_pb2.ModelInfo:
        info = models_pb2.ModelInfo.FromString(self.info)
        info.state, info.ready = self.state, False
        info.state_message = self.message or (
            f"loading {self.spec} in the front door {self.door} for {time.monotonic() - self.since:.0f} s")
        return info


class StoredModel:
    """A model the cluster hosts, as its queue and replicas see it (HostedModel's name, source and replica)."""

    def __init__(self, name: str, ref: Any, structure: Any, source: Any, info: bytes, gpus: int, generation: int,
                 aliases: dict[str, str] | None = None):
        self.name, self.source, self.gpus, self.generation = name, source, gpus, generation
        self.aliases = aliases or {}  # the `rename=` aliases its deploying door declared (registry.spec's form)
        self.ref, self.structure = ref, structure  # (the weights, for the replicas; the structure, for the doors)
        self.model = _Shipped(ref)
        self._info = models_pb2.ModelInfo.FromString(info)

    def replica(self, index: int) -> _Shipped:
        return self.model  # (each actor gets its own copy from the object store)

    def info(self, queue: ModelQueue) -> models_pb2.ModelInfo:
        info = models_pb2.ModelInfo()
        info.CopyFrom(self._info)
        serving = queue.serving
        info.queue_depth, info.ready, info.replicas = queue.depth, serving, len(queue.replicas)
        info.state = models_pb2.MODEL_STATE_READY if serving else models_pb2.MODEL_STATE_FAILED
        info.state_message = "" if serving else queue.status_message()
        return info


class ClusterCore:
    """The cluster's jobs and models. Every method is a Ray actor call from a front door (several run at once,
    on the actor's threads); answers are plain data, and ServerErrors come back as `Refused`."""

    def __init__(self, limits: Limits, policy: Any):
        self._limits, self._policy = limits, policy
        self._store = JobStore()
        self._lock = threading.Lock()
        self._models: dict[str, tuple[StoredModel, ModelQueue]] = {}  # guarded by _lock
        self._deploying: dict[str, Deploying] = {}  # guarded by _lock: loading in a door, or failed there
        self._changed = threading.Condition(self._lock)  # notified when a model is hosted, fails or goes
        self._generations = itertools.count(1)  # guarded by _lock
        self._lane: tuple[Any, bytes] | None = None  # guarded by _lock: (the Listener, its token), once opened
        logging.basicConfig(level=logging.INFO, format="tether core: %(message)s")

    def lane(self) -> tuple[str, int, bytes] | None:
        """Where a front door opens lanes to this core for LANE_CALLS, with the token they prove they hold
        (None: the core cannot listen; the doors then make every call through Ray)."""
        from .lanes import Listener, new_token, serve_calls

        with self._lock:
            if self._lane is None:
                token = new_token()
                try:
                    listener = Listener(token, lambda conn: serve_calls(conn, self, LANE_CALLS), "tether-core-lane")
                except OSError as error:
                    _log.warning("the core cannot listen for its front doors (%s): they call it through Ray", error)
                    return None
                self._lane = (listener, token)
            listener, token = self._lane
        return (*listener.address, token)

    # ---- models -------------------------------------------------------------------------------
    @_refusals
    def announce(self, name: str, spec: str, door: str, info: bytes) -> int:
        """A front door starts loading `name` to host it here: every door lists it as loading from now on, and
        waits for it, until the loading door hosts it (`host` with this claim) or says it failed; its claim."""
        with self._lock:
            self._check_free(name)
            claim = next(self._generations)
            self._deploying[name] = Deploying(claim, spec, door, info)
        _log.info("%s is loading in the front door %s", name, door)
        return claim

    def failed(self, name: str, claim: int, message: str) -> None:
        """The load `claim` of `name` failed (`message`: why): listed failed, its jobs refused, until evicted."""
        with self._lock:
            record = self._deploying.get(name)
            if record is not None and record.claim == claim:
                record.message, record.since = message or "its load failed", time.monotonic()
                self._changed.notify_all()

    def withdraw(self, name: str, claim: int) -> None:
        """Forget the load `claim` of `name` (evicted through the door loading it)."""
        with self._lock:
            record = self._deploying.get(name)
            if record is not None and record.claim == claim:
                del self._deploying[name]
                self._changed.notify_all()

    def deployment(self, name: str, timeout: float) -> tuple[int, str, float, int] | None:
        """(state, message, seconds in it, claim) of `name` once it is no longer loading, or after `timeout` s
        (WAIT_SLICE at most); None if the cluster neither hosts it nor has a door loading it."""
        with self._lock:
            self._changed.wait_for(lambda: name not in self._deploying or self._deploying[name].message != "",
                                   min(timeout, WAIT_SLICE))
            if name in self._models:
                return READY, "", 0.0, 0
            record = self._deploying.get(name)
        return None if record is None else (record.state, record.message, time.monotonic() - record.since,
                                             record.claim)

    def _check_free(self, name: str) -> None:
        """ModelExists unless `name` is neither hosted nor being deployed (under _lock)."""
        record = self._deploying.get(name)
        if name in self._models or record is not None:
            where = "already hosts" if record is None else f"has (through the front door {record.door})"
            raise ModelExists(f"the cluster {where} a model named {name!r}; evict it first "
                              f"(`tether evict {name}`) or choose another name")

    @_refusals
    def host(self, name: str, payload: Any, structure: Any, source: Any, replicas: int, info: bytes, gpus: int,
             claim: int = 0, aliases: dict[str, str] | None = None) -> int:
        """Host a model (`payload`: a ray_workers.PickledModel, put in the object store by this actor, so it
        outlives the front door that sent it; `structure`: the same without its weights, for the doors); its
        generation. `claim`: the load `announce` answered (NotFound if it was evicted meanwhile). `aliases`:
        the `rename=` aliases the deploying door declares for it, which every door declares too."""
        import ray

        with self._lock:
            if claim:
                record = self._deploying.get(name)
                if record is None or record.claim != claim:
                    raise NotFound(f"the model {name!r} was evicted from the cluster while it loaded")
                if record.message:  # (marked failed: its door stopped)
                    raise ServerError(f"its load was given up: {record.message}",
                                      code=grpc.StatusCode.FAILED_PRECONDITION)
                del self._deploying[name]
            self._check_free(name)
            stored = StoredModel(name, ray.put(payload), ray.put(structure), source, info, gpus,
                                 next(self._generations), aliases)
            self._models[name] = (stored, ModelQueue(stored, self._limits, replicas=replicas, policy=self._policy))
            self._changed.notify_all()
        _log.info("hosting %s (%d replica%s)", name, replicas, "" if replicas == 1 else "s")
        return stored.generation

    def model(self, name: str) -> tuple[list, Any, int, dict[str, str]] | None:
        """([its structure's reference], its source, its generation, its aliases), or None if the cluster does
        not host it."""
        with self._lock:
            entry = self._models.get(name)
        if entry is None:
            return None
        stored = entry[0]
        return [stored.structure], stored.source, stored.generation, stored.aliases

    def infos(self) -> list[bytes]:
        """The ModelInfo of every model hosted or being deployed, by name."""
        with self._lock:
            entries = [self._models[name] for name in sorted(self._models)]
            deploying = list(self._deploying.values())
        infos = [stored.info(queue) for stored, queue in entries] + [record.describe() for record in deploying]
        return [info.SerializeToString() for info in sorted(infos, key=lambda info: info.name)]

    def model_info(self, name: str) -> bytes | None:
        with self._lock:
            entry, record = self._models.get(name), self._deploying.get(name)
        if entry is not None:
            return entry[0].info(entry[1]).SerializeToString()
        return None if record is None else record.describe().SerializeToString()

    @_refusals
    def evict(self, name: str, reason: str) -> int:
        """Stop hosting `name`: its queued jobs end CANCELLED, running ones stop, its actors are killed."""
        with self._lock:
            entry = self._models.pop(name, None)
            record = self._deploying.pop(name, None) if entry is None else None
            self._changed.notify_all()
        if record is not None:  # (its door's load, when it ends, is refused: `host` finds no claim)
            _log.info("evicted %s, which the front door %s was deploying", name, record.door)
            return 0
        if entry is None:
            raise NotFound(f"the cluster hosts no model named {name!r}; `tether models` lists those it hosts")
        cancelled = entry[1].close(reason or f"the model {name!r} was evicted by the server's operator")
        entry[1].join(EVICT_WAIT)  # its actors are killed before the operator's command returns
        _log.info("evicted %s", name)
        return cancelled

    def worker_pid(self, name: str, index: int, timeout: float) -> int | None:
        """The pid of replica `index`'s actor once it is ready (None: none by then, or no such replica)."""
        queue = self._queue(name)
        replicas = queue.replicas if queue is not None else []
        return replicas[index].worker_pid(min(timeout, WAIT_SLICE)) if index < len(replicas) else None

    def restarts(self, name: str, index: int) -> int:
        queue = self._queue(name)
        return queue.replicas[index].restarts if queue is not None else 0

    def shut_down(self, timeout: float = 5.0) -> int:
        """Stop every model (their jobs are cancelled, their actors killed); how many jobs were cancelled."""
        with self._lock:
            entries, self._models, self._deploying = list(self._models.values()), {}, {}
            self._changed.notify_all()
        cancelled = sum(queue.close("the cluster's models were shut down") for _, queue in entries)
        for _, queue in entries:
            queue.join(timeout)
        return cancelled

    def _queue(self, name: str, generation: int = 0) -> ModelQueue | None:
        with self._lock:
            entry = self._models.get(name)
        if entry is None:
            return None
        if generation and entry[0].generation != generation:  # (UNAVAILABLE: the client submits it once more,
            # and the door, having dropped its copy, reads the model anew)
            raise ServerError(f"the model {name!r} was deployed again since this front door read it; retry the job",
                              code=grpc.StatusCode.UNAVAILABLE)
        return entry[1]

    # ---- jobs ---------------------------------------------------------------------------------
    @_refusals
    def start(self, meta: JobMeta, program: bytes, limits: JobLimits, batch: tuple, generation: int,
              wait: tuple[float, int]) -> tuple[JobMeta, tuple | None]:
        """Create, publish and queue the job `meta` describes, in one call from its door; an earlier job with its
        request id wins (its meta is returned, nothing is queued). Refused: no record is kept. With `wait`
        (seconds, max_bytes) the call then waits, as frames_when_done, for the job's end: (meta, (frames, state))
        so a SubmitJob that waits costs its door one call; (meta, None) without. A RunJob's answer brings its first
        events (as wait_frames from 0), read by its door next."""
        job = self._store.create(meta.owner, meta.model, meta.kind, meta.request_id, meta.stream, meta.job_id)
        queue = self._queue(job.model, generation)
        if queue is None:
            raise NotFound(f"the cluster hosts no model named {job.model!r} (it was evicted); "
                           "`tether models` lists those it hosts")
        started = self._store.start(job, queue, program, limits, batch)
        seconds, max_bytes = wait
        if started is not job:
            return _meta(started), None
        if job.link is not None:  # a RunJob: its door reads its first events next (RemoteJob.wait_frames)
            return _meta(job), job.wait_frames(0, _never, WAIT_SLICE, FIRST_EVENTS, STATUS_LINGER)
        if seconds <= 0:
            return _meta(job), None
        return _meta(job), (job.frames_when_done(_never, min(seconds, WAIT_SLICE * 10), max_bytes), job.state)

    def find(self, job_id: str) -> JobMeta | None:
        job = self._store.find(job_id)
        return None if job is None else _meta(job)

    def jobs(self) -> list[JobMeta]:
        return [_meta(job) for job in self._store.jobs()]

    def state(self, job_id: str) -> int:
        job = self._store.find(job_id)
        return job.state if job is not None else jobs_pb2.JOB_STATE_UNSPECIFIED

    @_refusals
    def info(self, job_id: str) -> bytes:
        job = self._job(job_id)
        queue = self._queue(job.model)
        return job.info(queue.position(job) if queue is not None else 0).SerializeToString()

    @_refusals
    def outcome(self, job_id: str) -> tuple[int, str, str, int]:
        """(state, message, status code name or "", result size or -1)."""
        state, message, code, result = self._job(job_id).outcome()
        return state, message, code.name if code is not None else "", len(result) if result is not None else -1

    @_refusals
    def read(self, job_id: str, offset: int, size: int) -> bytes:
        """Bytes [offset, offset + size) of the job's result."""
        result = self._job(job_id).outcome()[3]
        return b"".join(result.views(offset, size)) if result is not None else b""

    @_refusals
    def wait_frames(self, job_id: str, after: int, limit: int, linger: float, timeout: float) -> tuple:
        """Job.wait_frames, waiting at most `timeout` (WAIT_SLICE at most)."""
        return self._job(job_id).wait_frames(after, _never, min(timeout, WAIT_SLICE), limit, linger)

    @_refusals
    def frames_when_done(self, job_id: str, timeout: float, max_bytes: int) -> tuple[list[bytes] | None, int]:
        """Job.frames_when_done, and the job's state after it."""
        job = self._job(job_id)
        return job.frames_when_done(_never, timeout, max_bytes), job.state

    def cancel(self, job_id: str, reason: str) -> bool:
        job = self._store.find(job_id)
        return job is not None and stop_job(job, self._queue(job.model), reason)

    @_refusals
    def wait_done(self, job_id: str, timeout: float) -> int:
        return self._job(job_id).wait_done(min(timeout, WAIT_SLICE * 10))

    def attach(self, job_id: str) -> None:
        job = self._store.find(job_id)
        if job is not None and job.link is not None:
            job.link.attach()

    def detach(self, job_id: str, reason: str) -> None:
        job = self._store.find(job_id)
        if job is not None and job.link is not None:
            job.link.detach(reason)

    def deliver(self, job_id: str, answer: bytes) -> None:
        job = self._store.find(job_id)
        if job is not None and job.link is not None:
            job.link.deliver(jobs_pb2.LocalResult.FromString(answer))

    def _job(self, job_id: str) -> Job:
        job = self._store.find(job_id)
        if job is None:
            raise unknown_job(job_id)
        return job


def _never() -> bool:
    return False


_core_cls: Any = None


def _core_class():
    global _core_cls
    if _core_cls is None:
        import ray

        _core_cls = ray.remote(max_concurrency=MAX_CALLS, max_restarts=0)(ClusterCore)
    return _core_cls


def core_of(limits: Limits, policy: Any) -> Any:
    """The handle of the core of `limits.ray_namespace` on the cluster at `limits.ray`, started (detached: it
    outlives the front door that started it) with these limits and policy if it does not run yet."""
    from .ray_workers import connect

    connect(limits.ray)
    return _core_class().options(name=CORE_NAME, namespace=limits.ray_namespace, lifetime="detached",
                                 get_if_exists=True, num_cpus=0).remote(limits, policy)


def shut_down(namespace: str = "tether", timeout: float = 30.0) -> bool:
    """Stop the core of `namespace` on the cluster this process is connected to (`ray.init`): its models'
    jobs are cancelled, its actors killed, its job records lost. False if none runs."""
    import ray

    try:
        core = ray.get_actor(CORE_NAME, namespace=namespace)
    except ValueError:
        return False
    try:
        ray.get(core.shut_down.remote(), timeout=timeout)
    finally:
        ray.kill(core, no_restart=True)
    return True
