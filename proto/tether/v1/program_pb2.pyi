from tether.v1 import values_pb2 as _values_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProgramKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROGRAM_KIND_UNSPECIFIED: _ClassVar[ProgramKind]
    PROGRAM_KIND_TRACE: _ClassVar[ProgramKind]
    PROGRAM_KIND_GENERATE: _ClassVar[ProgramKind]
    PROGRAM_KIND_SESSION: _ClassVar[ProgramKind]
    PROGRAM_KIND_SCAN: _ClassVar[ProgramKind]
PROGRAM_KIND_UNSPECIFIED: ProgramKind
PROGRAM_KIND_TRACE: ProgramKind
PROGRAM_KIND_GENERATE: ProgramKind
PROGRAM_KIND_SESSION: ProgramKind
PROGRAM_KIND_SCAN: ProgramKind

class LocalBlock(_message.Message):
    __slots__ = ("block_id", "first_line", "last_line", "reads", "writes")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LINE_FIELD_NUMBER: _ClassVar[int]
    LAST_LINE_FIELD_NUMBER: _ClassVar[int]
    READS_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    first_line: int
    last_line: int
    reads: _containers.RepeatedScalarFieldContainer[str]
    writes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, block_id: _Optional[str] = ..., first_line: _Optional[int] = ..., last_line: _Optional[int] = ..., reads: _Optional[_Iterable[str]] = ..., writes: _Optional[_Iterable[str]] = ...) -> None: ...

class FunctionSource(_message.Message):
    __slots__ = ("name", "source", "filename", "first_line", "bindings", "local_blocks")
    class BindingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _values_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_values_pb2.Value, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    FIRST_LINE_FIELD_NUMBER: _ClassVar[int]
    BINDINGS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    filename: str
    first_line: int
    bindings: _containers.MessageMap[str, _values_pb2.Value]
    local_blocks: _containers.RepeatedCompositeFieldContainer[LocalBlock]
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ..., filename: _Optional[str] = ..., first_line: _Optional[int] = ..., bindings: _Optional[_Mapping[str, _values_pb2.Value]] = ..., local_blocks: _Optional[_Iterable[_Union[LocalBlock, _Mapping]]] = ...) -> None: ...

class Program(_message.Message):
    __slots__ = ("kind", "source", "filename", "first_line", "model", "args", "kwargs", "tracer_name", "bindings", "functions", "local_blocks", "edits", "bound_args", "enclosing_function")
    class KwargsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _values_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_values_pb2.Value, _Mapping]] = ...) -> None: ...
    class BindingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _values_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_values_pb2.Value, _Mapping]] = ...) -> None: ...
    class BoundArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    FIRST_LINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    TRACER_NAME_FIELD_NUMBER: _ClassVar[int]
    BINDINGS_FIELD_NUMBER: _ClassVar[int]
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EDITS_FIELD_NUMBER: _ClassVar[int]
    BOUND_ARGS_FIELD_NUMBER: _ClassVar[int]
    ENCLOSING_FUNCTION_FIELD_NUMBER: _ClassVar[int]
    kind: ProgramKind
    source: str
    filename: str
    first_line: int
    model: str
    args: _containers.RepeatedCompositeFieldContainer[_values_pb2.Value]
    kwargs: _containers.MessageMap[str, _values_pb2.Value]
    tracer_name: str
    bindings: _containers.MessageMap[str, _values_pb2.Value]
    functions: _containers.RepeatedCompositeFieldContainer[FunctionSource]
    local_blocks: _containers.RepeatedCompositeFieldContainer[LocalBlock]
    edits: _containers.RepeatedCompositeFieldContainer[Edit]
    bound_args: _containers.ScalarMap[str, int]
    enclosing_function: str
    def __init__(self, kind: _Optional[_Union[ProgramKind, str]] = ..., source: _Optional[str] = ..., filename: _Optional[str] = ..., first_line: _Optional[int] = ..., model: _Optional[str] = ..., args: _Optional[_Iterable[_Union[_values_pb2.Value, _Mapping]]] = ..., kwargs: _Optional[_Mapping[str, _values_pb2.Value]] = ..., tracer_name: _Optional[str] = ..., bindings: _Optional[_Mapping[str, _values_pb2.Value]] = ..., functions: _Optional[_Iterable[_Union[FunctionSource, _Mapping]]] = ..., local_blocks: _Optional[_Iterable[_Union[LocalBlock, _Mapping]]] = ..., edits: _Optional[_Iterable[_Union[Edit, _Mapping]]] = ..., bound_args: _Optional[_Mapping[str, int]] = ..., enclosing_function: _Optional[str] = ...) -> None: ...

class Edit(_message.Message):
    __slots__ = ("source", "filename", "first_line", "bindings")
    class BindingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _values_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_values_pb2.Value, _Mapping]] = ...) -> None: ...
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    FIRST_LINE_FIELD_NUMBER: _ClassVar[int]
    BINDINGS_FIELD_NUMBER: _ClassVar[int]
    source: str
    filename: str
    first_line: int
    bindings: _containers.MessageMap[str, _values_pb2.Value]
    def __init__(self, source: _Optional[str] = ..., filename: _Optional[str] = ..., first_line: _Optional[int] = ..., bindings: _Optional[_Mapping[str, _values_pb2.Value]] = ...) -> None: ...
