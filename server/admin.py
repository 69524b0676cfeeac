"""AdminService: operating a running server. Deploy and evict models, list and stop anyone's jobs.

Every call needs an admin caller (auth.identify_admin). Models come and go through the deployments table;
SPECs load as `tether serve --model` loads them. Imports grpc and the server's own modules.
"""

from __future__ import annotations

import functools
import logging

import grpc
import torch

from tether.placement_options import Placement
from tether.tensor_codec import TORCH_DTYPES
from tether.v1 import admin_pb2, admin_pb2_grpc, values_pb2

from .errors import NotFound, ServerError
from .jobs import TERMINAL
from .placement import resolve_device
from .registry import load_model
from .service import CANCEL_WAIT, Hub, cancel_job, unary
from .workers import seconds

__all__ = ["AdminService", "MAX_DEPLOY_WAIT"]

_log = logging.getLogger("tether.server")
MAX_DEPLOY_WAIT = 600.0  # s: the longest DeployModel holds its answer for the load to end
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_admin = unary("identify_admin")


def placement_of(message: admin_pb2.Placement) -> Placement:
    """A Placement from its message; INVALID_ARGUMENT for one this server cannot give."""
    dtype = None
    if message.data_type != values_pb2.DATA_TYPE_UNSPECIFIED:
        dtype = TORCH_DTYPES.get(message.data_type)
        if dtype not in _DTYPES:
            raise _invalid(f"Placement.data_type {values_pb2.DataType.Name(message.data_type)} is not a "
                                 "parameter dtype: give BFLOAT16, FLOAT16 or FLOAT32")
    if message.device_map not in ("", "auto"):
        raise _invalid(f"Placement.device_map {message.device_map!r}: only 'auto' is supported")
    if message.device:
        try:
            resolve_device(message.device)
        except ValueError as error:
            raise _invalid(str(error)) from None
    return Placement(device=message.device or None, dtype=dtype, device_map=message.device_map or None)


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    """Operates the server (see admin.proto for each RPC's contract)."""

    def __init__(self, hub: Hub):
        self._hub = hub

    @_admin
    def DeployModel(self, request, context, owner):
        if not request.spec:
            raise _invalid("DeployModelRequest.spec is empty: give what to load, e.g. `tiny` or a directory")
        if request.replicas < 0:
            raise _invalid(f"DeployModelRequest.replicas must be >= 0, got {request.replicas}")
        table = self._hub.models
        placement = placement_of(request.placement).over(table.default_placement)
        load = functools.partial(load_model, request.spec, placement)
        _log.info("deploy %s=%s (%s) by %s", request.name, request.spec, placement.describe(), owner)
        deployment = table.deploy(request.name, load, spec=request.spec, placement=placement, source=load,
                                  replicas=request.replicas or None)
        wait = min(seconds(request.wait), MAX_DEPLOY_WAIT) if request.HasField("wait") else 0.0
        if wait > 0:
            table.wait(deployment.name, wait)
        return admin_pb2.DeployModelResponse(model=table.describe(deployment))

    @_admin
    def EvictModel(self, request, context, owner):
        _log.info("evict %s by %s", request.name, owner)
        cancelled = self._hub.models.evict(request.name, request.reason)
        return admin_pb2.EvictModelResponse(cancelled_jobs=cancelled)

    @_admin
    def ListJobs(self, request, context, owner):
        hub, listed = self._hub, []
        for job in hub.store.jobs():
            if request.model and job.model != request.model:
                continue
            if job.done and not request.include_finished:
                continue
            queue = hub.queues.get(job.model)
            info = job.info(queue.position(job) if queue is not None else 0)
            if info.status.state in TERMINAL and not request.include_finished:
                continue  # ended meanwhile
            listed.append(admin_pb2.ListedJob(job=info, owner=job.owner))
        return admin_pb2.ListJobsResponse(jobs=listed)

    @_admin
    def StopJob(self, request, context, owner):
        job = self._hub.store.find(request.job_id)
        if job is None:
            raise NotFound(f"no job {request.job_id!r} on this server (`tether jobs` lists them; a job that "
                           "ended is kept for the server's --result-ttl)")
        cancel_job(self._hub, job, request.reason or f"stopped by the server's operator ({owner})")
        return admin_pb2.StopJobResponse(state=job.wait_done(CANCEL_WAIT))



def _invalid(message: str) -> ServerError:
    return ServerError(message, code=grpc.StatusCode.INVALID_ARGUMENT)
