import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_EVENT_TYPE_UNSPECIFIED: _ClassVar[ModelEventType]
    MODEL_EVENT_TYPE_REGISTERED: _ClassVar[ModelEventType]
    MODEL_EVENT_TYPE_PROMOTED: _ClassVar[ModelEventType]
    MODEL_EVENT_TYPE_ROLLED_BACK: _ClassVar[ModelEventType]
MODEL_EVENT_TYPE_UNSPECIFIED: ModelEventType
MODEL_EVENT_TYPE_REGISTERED: ModelEventType
MODEL_EVENT_TYPE_PROMOTED: ModelEventType
MODEL_EVENT_TYPE_ROLLED_BACK: ModelEventType

class ModelEvent(_message.Message):
    __slots__ = ("event_id", "type", "name", "version", "alias", "previous_version", "kind", "created_at")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    type: ModelEventType
    name: str
    version: str
    alias: str
    previous_version: str
    kind: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[str] = ..., type: _Optional[_Union[ModelEventType, str]] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., alias: _Optional[str] = ..., previous_version: _Optional[str] = ..., kind: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
