"""Assembles a running server: gRPC server, servicers, health checking, reflection, message sizes, workers.

`start_server(models, host, port, **limits)` returns a handle with `.port` and `.stop()`; the CLI and tests
both use it. Imports grpc, grpcio-health-checking, grpcio-reflection and the server's own modules.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from tether.placement_options import Placement
from tether.protocol import MAX_MESSAGE_BYTES
from tether.v1 import admin_pb2, jobs_pb2, models_pb2

from .admin import AdminService
from .auth import Authenticator, read_keys
from .deployments import DEFAULT_LOADING_WAIT, ModelTable
from .jobs import JobStore
from .policy import DEFAULT_POLICY, Policy
from .registry import Registry
from .service import CheckedHealth, Hub, JobService, ModelService, add_service
from .workers import Limits

__all__ = ["ServerHandle", "start_server", "MAX_MESSAGE_BYTES"]

SERVICES = (
    jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


class ServerHandle:
    """A running server: `.port`, `.address`, `.stop()`; a context manager that stops on exit."""

    def __init__(self, server: grpc.Server, hub: Hub, health_servicer: health.HealthServicer,
                 job_service: JobService, host: str, port: int):
        self._server, self.hub, self._health, self._job_service = server, hub, health_servicer, job_service
        self.host, self.port = host, port
        self._stopped = False

    @property
    def address(self) -> str:
        """`host:port` as clients dial it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving: report NOT_SERVING, end RPCs after `grace` seconds, cancel queued and running jobs."""
        if self._stopped:
            return
        self._stopped = True
        self._health.enter_graceful_shutdown()
        self.hub.models.close()
        self._server.stop(grace).wait()
        self._job_service.close()
        for queue in list(self.hub.queues.values()):
            queue.join(timeout=grace)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every replica's worker process is ready (or `timeout`); True if they all are. Jobs need
        not wait for this (they queue), but the first worker of a process starts its forkserver (seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for queue in self.hub.queues.values():
            for replica in queue.replicas:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if replica.worker_pid(left) is None:
                    return False
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or `timeout`); True if it stopped."""
        return self._server.wait_for_termination(timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    models: Mapping[str, Any],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    api_keys: Iterable[str] | str | os.PathLike[str] | None = None,
    admin_keys: Iterable[str] | None = None,
    sources: Mapping[str, Callable[[], Any]] | None = None,
    policy: Policy = DEFAULT_POLICY,
    replicas: int = 1,
    loading_wait: float = DEFAULT_LOADING_WAIT,
    placement: Placement | None = None,
    rpc_threads: int = 128,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    **limits: Any,
) -> ServerHandle:
    """Serve `models` (name -> torch module, `(model, tokenizer)` or NNsight) on `host:port` (0: any free port).

    api_keys: keys (or a file of keys, one per line) clients must send; None accepts loopback clients only.
    admin_keys: those of the keys that may use AdminService (default: the file's lines marked `admin`; with
    no keys at all, loopback callers are admins).
    loading_wait: seconds a job for a model that is still loading (deployed while serving) waits for it.
    placement: the device and dtype a deployed model gets where its deploy does not say (`tether serve`'s
    --device/--dtype before any --model); the `models` given are placed already.
    sources: name -> a function that loads that model again; with one, weights a job wrote into are restored
    (see weights.py); without, such a job takes the model out of service until a restart.
    limits: fields of `Limits` (queue_size, job_timeout, max_result_bytes, result_ttl, local_call_timeout).
    With `ray=ADDRESS` the server is one of the front doors of that cluster (`ray_namespace`, default
    "tether"): `models` are hosted there, and it serves every model and job the cluster has (cluster.py).
    """
    if isinstance(api_keys, (str, os.PathLike)):
        admin_keys = read_keys(api_keys, role="admin") if admin_keys is None else admin_keys
        api_keys = read_keys(api_keys)
    server_limits = Limits(**limits)
    if not models and not server_limits.ray:
        raise ValueError("a server needs at least one model: --model NAME=SPEC")
    registry = Registry(models, sources)
    hub = Hub(
        registry=registry,
        queues={},
        store=JobStore(),
        policy=policy,
        limits=server_limits,
        auth=Authenticator(api_keys, admin_keys or ()),
    )
    table = dict(registry=registry, queues=hub.queues, limits=server_limits, replicas=replicas,
                 loading_wait=loading_wait, placement=placement, policy=policy)
    if server_limits.ray:  # one of the cluster's front doors: jobs and models are the cluster's (cluster.py)
        from .cluster_door import ClusterJobs, connect_core
        from .cluster_models import ClusterModels

        core = connect_core(server_limits, policy)
        hub.store, hub.models = ClusterJobs(core), ClusterModels(core, **table)
    else:
        hub.models = ModelTable(**table)
    return _listen(hub, host, port, rpc_threads, max_message_bytes)


def _listen(hub: Hub, host: str, port: int, rpc_threads: int, max_message_bytes: int) -> ServerHandle:
    """The gRPC server over `hub`: its services, health and reflection, bound to `host:port` and started."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=rpc_threads, thread_name_prefix="tether-rpc"),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    job_service = JobService(hub, max_streams=rpc_threads)
    add_service(job_service, server, jobs_pb2.DESCRIPTOR.services_by_name["JobService"])
    add_service(ModelService(hub), server, models_pb2.DESCRIPTOR.services_by_name["ModelService"])
    add_service(AdminService(hub), server, admin_pb2.DESCRIPTOR.services_by_name["AdminService"])
    health_servicer = health.HealthServicer()
    add_service(CheckedHealth(health_servicer), server, health_pb2.DESCRIPTOR.services_by_name["Health"])
    reflection.enable_server_reflection(
        (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        bound = server.add_insecure_port(_join(host, port))
    except RuntimeError:
        bound = 0
    if not bound:
        raise OSError(f"cannot listen on {_join(host, port)}: the port is taken or the host is not this machine")
    hub.models.start_hosted()
    server.start()
    for service in ("", *SERVICES):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return ServerHandle(server, hub, health_servicer, job_service, host, bound)


def _join(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"
