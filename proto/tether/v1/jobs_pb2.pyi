import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tether.v1 import failure_pb2 as _failure_pb2
from tether.v1 import program_pb2 as _program_pb2
from tether.v1 import values_pb2 as _values_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_RECEIVED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_DISPATCHED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_COMPLETED: _ClassVar[JobState]
    JOB_STATE_ERROR: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_RECEIVED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_DISPATCHED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_COMPLETED: JobState
JOB_STATE_ERROR: JobState
JOB_STATE_CANCELLED: JobState

class JobSpec(_message.Message):
    __slots__ = ("program", "request_id", "timeout", "local_call_timeout", "max_result_bytes")
    PROGRAM_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    LOCAL_CALL_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    MAX_RESULT_BYTES_FIELD_NUMBER: _ClassVar[int]
    program: _program_pb2.Program
    request_id: str
    timeout: _duration_pb2.Duration
    local_call_timeout: _duration_pb2.Duration
    max_result_bytes: int
    def __init__(self, program: _Optional[_Union[_program_pb2.Program, _Mapping]] = ..., request_id: _Optional[str] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., local_call_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_result_bytes: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data", "total_size")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("saved", "unsaved", "unreached", "unreached_reason")
    class SavedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _values_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_values_pb2.Value, _Mapping]] = ...) -> None: ...
    SAVED_FIELD_NUMBER: _ClassVar[int]
    UNSAVED_FIELD_NUMBER: _ClassVar[int]
    UNREACHED_FIELD_NUMBER: _ClassVar[int]
    UNREACHED_REASON_FIELD_NUMBER: _ClassVar[int]
    saved: _containers.MessageMap[str, _values_pb2.Value]
    unsaved: _containers.RepeatedScalarFieldContainer[str]
    unreached: _containers.RepeatedScalarFieldContainer[str]
    unreached_reason: str
    def __init__(self, saved: _Optional[_Mapping[str, _values_pb2.Value]] = ..., unsaved: _Optional[_Iterable[str]] = ..., unreached: _Optional[_Iterable[str]] = ..., unreached_reason: _Optional[str] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("state", "message", "failure", "queue_position", "batch_size")
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    message: str
    failure: _failure_pb2.Failure
    queue_position: int
    batch_size: int
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., message: _Optional[str] = ..., failure: _Optional[_Union[_failure_pb2.Failure, _Mapping]] = ..., queue_position: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class LocalCall(_message.Message):
    __slots__ = ("call_id", "block_id", "values")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    block_id: str
    values: Chunk
    def __init__(self, call_id: _Optional[str] = ..., block_id: _Optional[str] = ..., values: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class LocalResult(_message.Message):
    __slots__ = ("call_id", "values", "failure")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    values: Chunk
    failure: _failure_pb2.Failure
    def __init__(self, call_id: _Optional[str] = ..., values: _Optional[_Union[Chunk, _Mapping]] = ..., failure: _Optional[_Union[_failure_pb2.Failure, _Mapping]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "sequence", "time", "status", "log", "result", "local_call", "progress")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    LOCAL_CALL_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    sequence: int
    time: _timestamp_pb2.Timestamp
    status: JobStatus
    log: LogLine
    result: Chunk
    local_call: LocalCall
    progress: Progress
    def __init__(self, job_id: _Optional[str] = ..., sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status: _Optional[_Union[JobStatus, _Mapping]] = ..., log: _Optional[_Union[LogLine, _Mapping]] = ..., result: _Optional[_Union[Chunk, _Mapping]] = ..., local_call: _Optional[_Union[LocalCall, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total_steps")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ...) -> None: ...

class RunJobRequest(_message.Message):
    __slots__ = ("job", "local_result", "cancel")
    JOB_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RESULT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    job: JobSpec
    local_result: LocalResult
    cancel: CancelRequest
    def __init__(self, job: _Optional[_Union[JobSpec, _Mapping]] = ..., local_result: _Optional[_Union[LocalResult, _Mapping]] = ..., cancel: _Optional[_Union[CancelRequest, _Mapping]] = ...) -> None: ...

class RunJobResponse(_message.Message):
    __slots__ = ("event", "more_events")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    MORE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    event: JobEvent
    more_events: _containers.RepeatedCompositeFieldContainer[JobEvent]
    def __init__(self, event: _Optional[_Union[JobEvent, _Mapping]] = ..., more_events: _Optional[_Iterable[_Union[JobEvent, _Mapping]]] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("job", "wait")
    JOB_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    job: JobSpec
    wait: _duration_pb2.Duration
    def __init__(self, job: _Optional[_Union[JobSpec, _Mapping]] = ..., wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job_id", "state", "existing", "events")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXISTING_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    existing: bool
    events: _containers.RepeatedCompositeFieldContainer[WatchJobResponse]
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., existing: _Optional[bool] = ..., events: _Optional[_Iterable[_Union[WatchJobResponse, _Mapping]]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job_id", "model", "kind", "status", "create_time", "update_time", "last_sequence", "result_size", "result_expire_time")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    RESULT_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESULT_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model: str
    kind: _program_pb2.ProgramKind
    status: JobStatus
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    last_sequence: int
    result_size: int
    result_expire_time: _timestamp_pb2.Timestamp
    def __init__(self, job_id: _Optional[str] = ..., model: _Optional[str] = ..., kind: _Optional[_Union[_program_pb2.ProgramKind, str]] = ..., status: _Optional[_Union[JobStatus, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_sequence: _Optional[int] = ..., result_size: _Optional[int] = ..., result_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: JobInfo
    def __init__(self, job: _Optional[_Union[JobInfo, _Mapping]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after_sequence")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_sequence: int
    def __init__(self, job_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("event", "more_events")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    MORE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    event: JobEvent
    more_events: _containers.RepeatedCompositeFieldContainer[JobEvent]
    def __init__(self, event: _Optional[_Union[JobEvent, _Mapping]] = ..., more_events: _Optional[_Iterable[_Union[JobEvent, _Mapping]]] = ...) -> None: ...

class ReadResultRequest(_message.Message):
    __slots__ = ("job_id", "offset")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    offset: int
    def __init__(self, job_id: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ReadResultResponse(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: Chunk
    def __init__(self, chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    def __init__(self, state: _Optional[_Union[JobState, str]] = ...) -> None: ...
