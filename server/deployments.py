"""The models a running server hosts as they come and go: deploy (load in the background), evict, and
each one's state (loading, ready, failed). The one place that adds or removes a model's registry entry
and its queue. Imports the server's registry and workers; nothing of grpc servicers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from tether.placement_options import Placement
from tether.v1 import models_pb2
from tether.values import to_value

from .errors import ModelExists, ModelLoading, NotFound, OutOfService, ServerError
from .policy import DEFAULT_POLICY, Policy
from .registry import HostedModel, Registry
from .supervisor import payload_of, preload_for
from .workers import Limits, ModelQueue

__all__ = ["Deployment", "ModelTable", "LOADING", "READY", "FAILED", "DEFAULT_LOADING_WAIT", "still_loading",
           "not_serving"]

_log = logging.getLogger("tether.server")
LOADING, READY, FAILED = models_pb2.MODEL_STATE_LOADING, models_pb2.MODEL_STATE_READY, models_pb2.MODEL_STATE_FAILED
DEFAULT_LOADING_WAIT = 10.0  # s: a job for a model that is still loading waits this long, then is refused


@dataclass(eq=False)
class Deployment:
    """One deployed model: what was asked for and where it stands. Mutable fields: guarded by the table."""

    name: str
    spec: str  # what was deployed (a SPEC, or a description of an object given in-process)
    replicas: int
    placement: Placement
    state: int = LOADING
    message: str = ""
    since: float = field(default_factory=time.monotonic)  # when the current state began
    hosted: HostedModel | None = None  # set once READY
    queue: ModelQueue | None = None  # set once READY
    claim: int = 0  # a cluster's front door: the core's record of this load (cluster.ClusterCore.announce)


def still_loading(name: str, seconds: float, wait: float) -> ModelLoading:
    """The refusal of a job for a model that did not become ready within `wait` s (loading for `seconds`)."""
    return ModelLoading(
        f"model {name!r} is still loading (for {seconds:.0f} s; it was deployed while the server ran) and did "
        f"not become ready within {wait:g} s; retry in a moment. `tether models` shows its state.")


def not_serving(name: str, message: str) -> OutOfService:
    """The refusal of a job for a model whose load failed (or that was taken out of service): `message` says why."""
    return OutOfService(f"model {name!r} is not serving: {message}. The server's operator can deploy it again "
                        "(`tether evict`, then `tether deploy`).")


class ModelTable:
    """The server's deployments by name. `deploy` loads in a named background thread; `resolve` is what a
    job asks for, waiting a bounded time for a model that is still loading."""

    def __init__(self, registry: Registry, queues: dict[str, ModelQueue], limits: Limits, *, replicas: int = 1,
                 loading_wait: float = DEFAULT_LOADING_WAIT, placement: Placement | None = None,
                 policy: Policy = DEFAULT_POLICY):
        self._registry, self._queues, self._limits, self._policy = registry, queues, limits, policy
        self.default_replicas, self.loading_wait = replicas, loading_wait
        self.default_placement = placement or Placement()  # what a deploy leaves unset (read-only)
        self._cond = threading.Condition()
        self._deployments: dict[str, Deployment] = {}  # guarded by _cond
        self._closed = False  # guarded by _cond

    # ---- adding -----------------------------------------------------------------------------
    def start_hosted(self, *, replicas: int | None = None) -> None:
        """Start the queues of the models the registry was built with (READY at once)."""
        preload_for([payload_of(hosted.model) for hosted in self._registry])  # before the first worker starts
        for hosted in self._registry:
            deployment = Deployment(hosted.name, type(hosted.module).__name__, replicas or self.default_replicas,
                                    Placement())
            with self._cond:
                self._deployments[hosted.name] = deployment
            self._ready(deployment, hosted)

    def deploy(self, name: str, load: Callable[[], Any], *, spec: str, placement: Placement,
               source: Callable[[], Any] | None = None, replicas: int | None = None) -> Deployment:
        """Start loading `load()` as model `name` in the background (LOADING now; READY or FAILED later).

        `source` loads the same weights again (restores weights a job wrote into); ModelExists if taken."""
        if not name or "/" in name:
            raise ServerError(f"invalid model name {name!r}: give a non-empty name without '/'",
                              code=grpc.StatusCode.INVALID_ARGUMENT)
        deployment = Deployment(name, spec, replicas or self.default_replicas, placement)
        with self._cond:
            if self._closed:
                raise ServerError("the server is shutting down", code=grpc.StatusCode.UNAVAILABLE)
            if name in self._deployments:
                raise ModelExists(f"a model named {name!r} is already deployed here; evict it first "
                                  f"(`tether evict {name}`) or choose another name")
            self._deployments[name] = deployment
        try:
            self._announce(deployment)
        except BaseException:
            with self._cond:
                self._deployments.pop(name, None)
            raise
        threading.Thread(target=self._load, args=(deployment, load, source), name=f"tether-load-{name}",
                         daemon=True).start()
        return deployment

    def _announce(self, deployment: Deployment) -> None:
        """Say that `deployment` starts loading where others must see it (a cluster's core; here: nowhere)."""

    def _load(self, deployment: Deployment, load: Callable[[], Any], source: Callable[[], Any] | None) -> None:
        _log.info("loading %s (%s, %s)", deployment.name, deployment.spec, deployment.placement.describe())
        try:
            hosted = self._registry.add(deployment.name, load(), source)
        except BaseException as error:  # a factory may raise anything: the model fails, the server stays
            _log.warning("cannot load %s (%s): %s", deployment.name, deployment.spec, error)
            self._set(deployment, FAILED, f"cannot load {deployment.spec}: {type(error).__name__}: {error}")
            return
        self._ready(deployment, hosted)
        _log.info("%s is ready", deployment.name)

    def _start_queue(self, deployment: Deployment, hosted: HostedModel) -> tuple[ModelQueue, HostedModel] | None:
        """The model's queue, its replicas started, and the model this server keeps to check its jobs (here
        `hosted` itself); None: they could not be started, and the deployment says why."""
        return ModelQueue(hosted, self._limits, replicas=deployment.replicas, policy=self._policy), hosted

    def _ready(self, deployment: Deployment, hosted: HostedModel) -> None:
        """Start the model's replicas and publish it (unless it was evicted or the server closed meanwhile)."""
        started = self._start_queue(deployment, hosted)
        if started is None:
            self._registry.remove(deployment.name, hosted)
            return
        queue, hosted = started
        with self._cond:
            current = self._deployments.get(deployment.name) is deployment and not self._closed
            if current:
                deployment.hosted, deployment.queue = hosted, queue
                self._queues[deployment.name] = queue
                deployment.state, deployment.message, deployment.since = READY, "", time.monotonic()
                self._cond.notify_all()
        if not current:
            queue.close()
            self._registry.remove(deployment.name, hosted)

    def _set(self, deployment: Deployment, state: int, message: str) -> None:
        with self._cond:
            deployment.state, deployment.message, deployment.since = state, message, time.monotonic()
            self._cond.notify_all()

    # ---- removing ---------------------------------------------------------------------------
    def evict(self, name: str, reason: str = "") -> int:
        """Stop hosting `name`: its queued jobs end CANCELLED, running ones are stopped; returns how many."""
        with self._cond:
            deployment = self._deployments.pop(name, None)
            queue = self._queues.pop(name, None)
            self._cond.notify_all()
        if deployment is None:
            raise NotFound(f"this server hosts no model named {name!r}; `tether models` lists those it hosts")
        self._registry.remove(name)
        if queue is None:
            return 0
        return queue.close(reason or f"the model {name!r} was evicted by the server's operator")

    def close(self) -> None:
        """Stop: loads that finish later are dropped; every queue is closed (its jobs cancelled)."""
        with self._cond:
            self._closed = True
            queues = list(self._queues.values())
        for queue in queues:
            queue.close()

    # ---- reading ----------------------------------------------------------------------------
    def resolve(self, name: str, wait: float | None = None) -> HostedModel:
        """The ready model `name`, waiting up to `wait` s (default: loading_wait) while it loads.

        NotFound for an unknown name; ModelLoading if still loading then; OutOfService if its load failed."""
        wait = self.loading_wait if wait is None else wait
        with self._cond:
            deployment = self._deployments.get(name)
            if deployment is not None and deployment.state == LOADING and wait > 0:
                self._cond.wait_for(lambda: deployment.state != LOADING or self._deployments.get(name) is not deployment,
                                    wait)
                deployment = self._deployments.get(name)
            if deployment is None:
                self._registry.get(name)  # raises NotFound naming the models there are
            state, message, since = deployment.state, deployment.message, deployment.since
        if state == LOADING:
            raise still_loading(name, time.monotonic() - since, wait)
        if state == FAILED:
            raise not_serving(name, message)
        return deployment.hosted

    def wait(self, name: str, timeout: float) -> Deployment:
        """The deployment `name` once it is no longer LOADING, or after `timeout` s (NotFound if unknown)."""
        with self._cond:
            deployment = self._deployments.get(name)
            if deployment is None:
                raise NotFound(f"this server hosts no model named {name!r}")
            self._cond.wait_for(lambda: deployment.state != LOADING, timeout)
            return deployment

    def deployments(self) -> list[Deployment]:
        """Every deployment, sorted by name."""
        with self._cond:
            return [self._deployments[name] for name in sorted(self._deployments)]

    def info(self, name: str) -> models_pb2.ModelInfo:
        """The ModelInfo of `name` (NotFound if it is not deployed)."""
        with self._cond:
            deployment = self._deployments.get(name)
        if deployment is None:
            raise NotFound(f"this server hosts no model named {name!r}; `tether models` lists those it hosts")
        return self.describe(deployment)

    def infos(self) -> list[models_pb2.ModelInfo]:
        return [self.describe(d) for d in self.deployments()]

    def describe(self, deployment: Deployment) -> models_pb2.ModelInfo:
        """Its ModelInfo as ListModels shows it (a READY model whose queue retired it shows FAILED)."""
        with self._cond:
            state, message, since = deployment.state, deployment.message, deployment.since
            hosted, queue = deployment.hosted, deployment.queue
        if hosted is not None and queue is not None:
            serving = queue.serving
            info = hosted.info(queue.depth, serving)  # (outside the lock: it walks the parameters)
            state, message = (READY, "") if serving else (FAILED, queue.status_message())
        else:
            placement = deployment.placement
            info = models_pb2.ModelInfo(name=deployment.name, device=placement.device or "cpu")
            if placement.dtype is not None:
                info.data_type = to_value(placement.dtype).data_type_value
            if state == LOADING:
                message = f"loading {deployment.spec} for {time.monotonic() - since:.0f} s"
        info.replicas, info.state, info.state_message = deployment.replicas, state, message
        return info
