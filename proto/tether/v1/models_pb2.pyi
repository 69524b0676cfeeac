from tether.v1 import values_pb2 as _values_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_FAILED: ModelState

class ModelInfo(_message.Message):
    __slots__ = ("name", "architecture", "parameter_count", "data_type", "device", "queue_depth", "ready", "replicas", "state", "state_message")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    DATA_TYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: str
    parameter_count: int
    data_type: _values_pb2.DataType
    device: str
    queue_depth: int
    ready: bool
    replicas: int
    state: ModelState
    state_message: str
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[str] = ..., parameter_count: _Optional[int] = ..., data_type: _Optional[_Union[_values_pb2.DataType, str]] = ..., device: _Optional[str] = ..., queue_depth: _Optional[int] = ..., ready: _Optional[bool] = ..., replicas: _Optional[int] = ..., state: _Optional[_Union[ModelState, str]] = ..., state_message: _Optional[str] = ...) -> None: ...

class ModuleNode(_message.Message):
    __slots__ = ("path", "class_name", "class_module", "extra_repr")
    PATH_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    CLASS_MODULE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_REPR_FIELD_NUMBER: _ClassVar[int]
    path: str
    class_name: str
    class_module: str
    extra_repr: str
    def __init__(self, path: _Optional[str] = ..., class_name: _Optional[str] = ..., class_module: _Optional[str] = ..., extra_repr: _Optional[str] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("info", "modules", "printed", "config_json", "tokenizer_files", "aliases")
    class TokenizerFilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    INFO_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    PRINTED_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FILES_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    info: ModelInfo
    modules: _containers.RepeatedCompositeFieldContainer[ModuleNode]
    printed: str
    config_json: str
    tokenizer_files: _containers.ScalarMap[str, bytes]
    aliases: _containers.RepeatedCompositeFieldContainer[_values_pb2.ModuleAlias]
    def __init__(self, info: _Optional[_Union[ModelInfo, _Mapping]] = ..., modules: _Optional[_Iterable[_Union[ModuleNode, _Mapping]]] = ..., printed: _Optional[str] = ..., config_json: _Optional[str] = ..., tokenizer_files: _Optional[_Mapping[str, bytes]] = ..., aliases: _Optional[_Iterable[_Union[_values_pb2.ModuleAlias, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: ModelSpec
    def __init__(self, spec: _Optional[_Union[ModelSpec, _Mapping]] = ...) -> None: ...
