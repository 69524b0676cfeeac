"""Operating a running server from Python: its models, deploy and evict, everyone's jobs, stop one.

`Admin(host, api_key)` wraps AdminService and ModelService (`tether models/deploy/evict/jobs/cancel` use
it); errors come back as tether.RemoteError with the server's message. Imports grpc and tether.v1.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import duration_pb2

from tether.loading import parse_dtype
from tether.runtime.errors import RemoteError
from tether.tensor_codec import DTYPES
from tether.v1 import admin_pb2, admin_pb2_grpc, models_pb2, models_pb2_grpc

from .channel import UNARY_TIMEOUT_S, auth_metadata, channel_options, resolve_api_key, resolve_host

__all__ = ["Admin"]


class Admin:
    """One server, operated: a context manager that closes its channel on exit."""

    def __init__(self, host: str | None = None, api_key: str | None = None, *, timeout: float = UNARY_TIMEOUT_S):
        self.host = resolve_host(host)
        self._metadata = auth_metadata(resolve_api_key(api_key))
        self._timeout = timeout
        self._channel = grpc.insecure_channel(self.host, options=channel_options())
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._models = models_pb2_grpc.ModelServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=timeout or self._timeout)
        except grpc.RpcError as error:
            code = error.code()
            details = error.details() or ""
            if code is grpc.StatusCode.UNAVAILABLE:
                details = f"no tether server answers at {self.host} ({details}); is `tether serve` running there?"
            raise RemoteError(f"{code.name}: {details}", code=code.name) from None

    # ---- models -------------------------------------------------------------------------------
    def models(self) -> list[models_pb2.ModelInfo]:
        """Every model the server hosts, with its state, replicas, device, dtype and queue depth."""
        return list(self._call(self._models.ListModels, models_pb2.ListModelsRequest()).models)

    def deploy(self, name: str, spec: str, *, replicas: int = 0, device: str | None = None, dtype: Any = None,
               device_map: str | None = None, wait: float = 0.0) -> models_pb2.ModelInfo:
        """Load `spec` on the server as model `name`; with `wait` (s), until it is ready or failed."""
        placement = admin_pb2.Placement(device=device or "", device_map=device_map or "")
        if dtype is not None:
            placement.data_type = DTYPES[parse_dtype(dtype)]
        request = admin_pb2.DeployModelRequest(name=name, spec=spec, replicas=replicas, placement=placement)
        if wait > 0:
            request.wait.CopyFrom(duration_pb2.Duration(seconds=int(wait), nanos=int(wait % 1 * 1e9)))
        return self._call(self._admin.DeployModel, request, timeout=wait + self._timeout).model

    def evict(self, name: str, reason: str = "") -> int:
        """Stop hosting `name`; how many of its queued and running jobs were cancelled."""
        return self._call(self._admin.EvictModel, admin_pb2.EvictModelRequest(name=name, reason=reason)).cancelled_jobs

    # ---- jobs ---------------------------------------------------------------------------------
    def jobs(self, *, include_finished: bool = False, model: str = "") -> list[admin_pb2.ListedJob]:
        """Everyone's queued and running jobs (and those that ended, with include_finished), oldest first."""
        request = admin_pb2.ListJobsRequest(include_finished=include_finished, model=model)
        return list(self._call(self._admin.ListJobs, request).jobs)

    def stop(self, job_id: str, reason: str = "") -> int:
        """Cancel any job; its JobState once it stopped (or after the server's 10 s wait)."""
        return self._call(self._admin.StopJob, admin_pb2.StopJobRequest(job_id=job_id, reason=reason)).state
