from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Frame(_message.Message):
    __slots__ = ("filename", "line", "function", "source_line", "user_code")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LINE_FIELD_NUMBER: _ClassVar[int]
    USER_CODE_FIELD_NUMBER: _ClassVar[int]
    filename: str
    line: int
    function: str
    source_line: str
    user_code: bool
    def __init__(self, filename: _Optional[str] = ..., line: _Optional[int] = ..., function: _Optional[str] = ..., source_line: _Optional[str] = ..., user_code: _Optional[bool] = ...) -> None: ...

class Failure(_message.Message):
    __slots__ = ("type", "message", "traceback", "frames", "cause")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    type: str
    message: str
    traceback: str
    frames: _containers.RepeatedCompositeFieldContainer[Frame]
    cause: Failure
    def __init__(self, type: _Optional[str] = ..., message: _Optional[str] = ..., traceback: _Optional[str] = ..., frames: _Optional[_Iterable[_Union[Frame, _Mapping]]] = ..., cause: _Optional[_Union[Failure, _Mapping]] = ...) -> None: ...
