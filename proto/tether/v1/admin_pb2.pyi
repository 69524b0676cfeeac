import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from tether.v1 import jobs_pb2 as _jobs_pb2
from tether.v1 import models_pb2 as _models_pb2
from tether.v1 import values_pb2 as _values_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Placement(_message.Message):
    __slots__ = ("device", "data_type", "device_map")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DATA_TYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MAP_FIELD_NUMBER: _ClassVar[int]
    device: str
    data_type: _values_pb2.DataType
    device_map: str
    def __init__(self, device: _Optional[str] = ..., data_type: _Optional[_Union[_values_pb2.DataType, str]] = ..., device_map: _Optional[str] = ...) -> None: ...

class DeployModelRequest(_message.Message):
    __slots__ = ("name", "spec", "replicas", "placement", "wait")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: str
    replicas: int
    placement: Placement
    wait: _duration_pb2.Duration
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[str] = ..., replicas: _Optional[int] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ..., wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class DeployModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _models_pb2.ModelInfo
    def __init__(self, model: _Optional[_Union[_models_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class EvictModelRequest(_message.Message):
    __slots__ = ("name", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class EvictModelResponse(_message.Message):
    __slots__ = ("cancelled_jobs",)
    CANCELLED_JOBS_FIELD_NUMBER: _ClassVar[int]
    cancelled_jobs: int
    def __init__(self, cancelled_jobs: _Optional[int] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("include_finished", "model")
    INCLUDE_FINISHED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    include_finished: bool
    model: str
    def __init__(self, include_finished: _Optional[bool] = ..., model: _Optional[str] = ...) -> None: ...

class ListedJob(_message.Message):
    __slots__ = ("job", "owner")
    JOB_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    job: _jobs_pb2.JobInfo
    owner: str
    def __init__(self, job: _Optional[_Union[_jobs_pb2.JobInfo, _Mapping]] = ..., owner: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[ListedJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[ListedJob, _Mapping]]] = ...) -> None: ...

class StopJobRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class StopJobResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: _jobs_pb2.JobState
    def __init__(self, state: _Optional[_Union[_jobs_pb2.JobState, str]] = ...) -> None: ...
