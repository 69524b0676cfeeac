"""A cluster's front door (`--ray`): its model table (`ClusterModels`: the models the cluster hosts and those
any door is deploying, each answered by the core, with their structure here and no weights) and each
model's queue and replicas as the door sees them. Imports ray lazily and the server's modules; holds no
job state of its own.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import grpc

from tether.runtime.rename import declared as declared_aliases
from tether.v1 import models_pb2

from .cluster import WAIT_SLICE
from .cluster_door import CALL_TIMEOUT, Core
from .deployments import FAILED, LOADING, READY, Deployment, ModelTable, not_serving, still_loading
from .errors import ModelExists, NotFound, ServerError
from .ray_workers import PickledModel, gpus_of
from .registry import HostedModel, structure_of, wrap
from .supervisor import payload_of

__all__ = ["ClusterModels", "ClusterQueue", "RemoteReplica"]

_log = logging.getLogger("tether.server")


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
    copy of its structure here, no weights, to check programs and describe it), those any door is deploying
    (the core's records: every door lists them and waits for them) and those this door is loading to host there."""

    def __init__(self, core: Core, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._core = core
        self._found = threading.Lock()  # one lookup of a model in the cluster at a time
        self._door = f"{socket.gethostname()} (pid {os.getpid()})"  # this door, as the operator reads it

    # ---- deploying through this door --------------------------------------------------------------
    def _announce(self, deployment: Deployment) -> None:
        """Record the load in the core: from now on every door lists it as loading, and waits for it."""
        info = ModelTable.describe(self, deployment).SerializeToString()
        deployment.claim = self._core("announce", deployment.name, deployment.spec, self._door, info)

    def _set(self, deployment: Deployment, state: int, message: str) -> None:
        super()._set(deployment, state, message)
        if state == FAILED and deployment.claim:
            self._tell(deployment, "failed", message)

    def _tell(self, deployment: Deployment, method: str, *args: Any) -> None:
        try:
            self._core(method, deployment.name, deployment.claim, *args)
        except ServerError as error:
            _log.warning("could not tell the cluster about %s (%s): %s", deployment.name, method, error)

    def _start_queue(self, deployment: Deployment, hosted: HostedModel) -> tuple[ClusterQueue, HostedModel] | None:
        """Host the model this door loaded on the cluster (or serve the cluster's, if it hosts one by that name:
        a front door restarted with its --model). From then on this door keeps its structure only (the
        weights are the replicas'); the caller's own object is never changed."""
        with self._cond:
            if self._closed:  # (this door stopped while it loaded: the core lists the load failed)
                deployment.state, deployment.message = FAILED, "this front door stopped while it loaded"
                self._cond.notify_all()
                return None
        name, payload, aliases = deployment.name, payload_of(hosted.model), declared_aliases(hosted.model)
        kept = self._structure(hosted, payload, aliases)
        try:
            try:  # (as bytes: the core puts them in the object store, owned by it, never loading the model)
                generation = self._core("host", name, PickledModel.of(payload), PickledModel.of(payload_of(kept.model)),
                                        hosted.source, deployment.replicas, hosted.info().SerializeToString(),
                                        gpus_of(payload), deployment.claim, aliases)
            except ModelExists as error:
                found, info = self._core("model", name), self._core_info(name)
                if found is None or info is None:
                    raise ServerError(str(error)) from None
                generation, deployment.replicas = found[2], info.replicas
                kept = self._structure(hosted, payload, _aliases_of(found))  # (the cluster's)
                _log.warning("the cluster already hosts a model named %s: this front door serves the cluster's",
                             name)
        except NotFound:  # (evicted, through another door, while it loaded here)
            with self._cond:
                deployment.state, deployment.message = FAILED, "evicted from the cluster while it loaded"
                if self._deployments.get(name) is deployment:
                    del self._deployments[name]
                self._cond.notify_all()
            _log.info("%s was evicted from the cluster while it loaded here: dropped", name)
            return None
        except ServerError as error:
            self._set(deployment, FAILED, f"the cluster cannot host it: {error}")
            return None
        if not self._registry.replace(name, hosted, kept):
            kept = hosted
        return ClusterQueue(self._core, name, generation, deployment.replicas, self._forget), kept

    def _structure(self, hosted: HostedModel, payload: Any, aliases: dict[str, str]) -> HostedModel:
        """`hosted` over its structure without weights, in a fresh wrapper with its `aliases` (as the doors that
        fetch it wrap it: it holds nothing of the loaded one; `payload`: hosted's payload_of); `hosted` itself if
        its module cannot be copied so (the door then keeps the weights, as do the doors that fetch it)."""
        try:
            structure = structure_of(hosted.module)
            wrapped = wrap((structure, payload[1]) if isinstance(payload, tuple) else structure)
            return HostedModel(hosted.name, _with_aliases(wrapped, aliases), hosted.source)
        except Exception as error:  # (a module deepcopy refuses: the door keeps it whole)
            _log.warning("%s: cannot copy its structure without its weights (%s: %s); front doors hold its weights",
                         hosted.name, type(error).__name__, error)
            return hosted

    def _core_info(self, name: str) -> models_pb2.ModelInfo | None:
        info = self._core("model_info", name)
        return None if info is None else models_pb2.ModelInfo.FromString(info)

    # ---- models other doors deployed ------------------------------------------------------------------
    def _await(self, name: str, wait: float) -> None:
        """Return once the cluster hosts `name`; while a door is loading it, wait up to `wait` s for it. NotFound,
        ModelLoading or OutOfService (its load failed) as on the door loading it."""
        deadline = time.monotonic() + wait
        while True:
            left = max(0.0, deadline - time.monotonic())
            found = self._core("deployment", name, left, wait=left)
            if found is None:
                names = [info.name for info in self.infos()]
                raise NotFound(f"the cluster hosts no model named {name!r}; it hosts {', '.join(names) or 'none'}. "
                               "Check the model name (ListModels, or `tether models`, shows them).")
            state, message, seconds, _ = found
            if state == READY:
                return
            if state == FAILED:
                raise not_serving(name, message)
            if time.monotonic() >= deadline:
                raise still_loading(name, seconds, wait)

    def _find(self, name: str) -> None:
        """Serve `name` here if the cluster hosts it and this door does not know it yet: its structure comes
        from the object store (no weights: a door needs neither the memory nor the GPUs of the models)."""
        import ray

        with self._found:
            with self._cond:
                if name in self._deployments or self._closed:
                    return
            found, info = self._core("model", name), self._core_info(name)
            if found is None or info is None:
                return
            refs, source, generation = found[:3]
            try:
                copy = _with_aliases(wrap(ray.get(refs[0]).load()), _aliases_of(found))
            except Exception as error:
                raise ServerError(
                    f"this front door cannot load its copy of model {name!r} (it checks programs with it): "
                    f"{type(error).__name__}: {error}. Send the job through the front door that deployed it.",
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

    def _drop_stale(self, name: str) -> None:
        """Forget this door's failed load of `name` once the cluster forgot it (evicted through another door)."""
        with self._cond:
            deployment = self._deployments.get(name)
        if deployment is None or not deployment.claim or deployment.state != FAILED:
            return
        found = self._core("deployment", name, 0.0)
        if found is None or found[3] != deployment.claim:
            with self._cond:
                if self._deployments.get(name) is deployment:
                    del self._deployments[name]

    # ---- ModelTable's methods, answered by the cluster ------------------------------------------
    def deploy(self, name: str, load: Any, **kwargs: Any) -> Deployment:
        self._drop_stale(name)
        return super().deploy(name, load, **kwargs)

    def evict(self, name: str, reason: str = "") -> int:
        self._drop_stale(name)
        with self._cond:
            deployment = self._deployments.get(name)
        if deployment is None:
            return self._core("evict", name, reason)
        cancelled = super().evict(name, reason)
        if deployment.claim and deployment.queue is None:  # (loading or failed here: the core's record goes)
            self._tell(deployment, "withdraw")
        return cancelled

    def close(self) -> None:
        """This front door stops: the cluster keeps its models (and their jobs); a load still running here
        is listed failed, saying so."""
        with self._cond:
            self._closed = True
            loading = [d for d in self._deployments.values() if d.state == LOADING and d.claim]
        for deployment in loading:
            self._tell(deployment, "failed", f"the front door {self._door} that was loading it stopped")
        self._core.close()

    def resolve(self, name: str, wait: float | None = None) -> HostedModel:
        """The model `name`, as the cluster has it: a load in any door (this one too) is waited for, or
        refused, from the core's record of it, so every door answers alike."""
        wait = self.loading_wait if wait is None else wait
        deadline = time.monotonic() + wait
        with self._cond:
            deployment = self._deployments.get(name)
        if deployment is None or (deployment.state != READY and deployment.claim):
            self._await(name, wait)
            self._find(name)
            with self._cond:
                evicted = name not in self._deployments  # (meanwhile)
            if evicted:
                self._await(name, 0.0)
        return super().resolve(name, max(0.0, deadline - time.monotonic()))

    def wait(self, name: str, timeout: float) -> Deployment:
        self._find(name)
        return super().wait(name, timeout)

    def infos(self) -> list[models_pb2.ModelInfo]:
        """The cluster's models, hosted or being deployed (and a load of this door the core has no record of)."""
        listed = [models_pb2.ModelInfo.FromString(info) for info in self._core("infos")]
        names = {info.name for info in listed}
        loading = [self.describe(d) for d in self.deployments()
                   if d.name not in names and d.state != READY and not d.claim]
        return sorted(listed + loading, key=lambda info: info.name)

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


def _aliases_of(found: tuple) -> dict[str, str]:
    """The aliases in the core's answer to `model` (none from a core that an older door started)."""
    return found[3] if len(found) > 3 else {}


def _with_aliases(model: Any, aliases: dict[str, str]) -> Any:
    """`model` (a fresh wrapper of a hosted model's structure) with the `rename=` aliases its deploying door
    declared, so every door's spec names the modules as the object given to that door does."""
    if aliases:
        model._rename(None, aliases)
    return model
