from tuneloop.v1 import completion_pb2 as _completion_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "sampling", "model", "tenant", "conversation_id", "request_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: _completion_pb2.Prompt
    sampling: _completion_pb2.SamplingParams
    model: str
    tenant: str
    conversation_id: str
    request_id: str
    def __init__(self, prompt: _Optional[_Union[_completion_pb2.Prompt, _Mapping]] = ..., sampling: _Optional[_Union[_completion_pb2.SamplingParams, _Mapping]] = ..., model: _Optional[str] = ..., tenant: _Optional[str] = ..., conversation_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "model", "prompt_tokens", "completions")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: _completion_pb2.ModelVersion
    prompt_tokens: int
    completions: _containers.RepeatedCompositeFieldContainer[_completion_pb2.Completion]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[_completion_pb2.ModelVersion, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., completions: _Optional[_Iterable[_Union[_completion_pb2.Completion, _Mapping]]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("request_id", "model", "index", "completion_id", "delta", "finish_reason", "completion_tokens", "prompt_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: _completion_pb2.ModelVersion
    index: int
    completion_id: str
    delta: str
    finish_reason: _completion_pb2.FinishReason
    completion_tokens: int
    prompt_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[_completion_pb2.ModelVersion, _Mapping]] = ..., index: _Optional[int] = ..., completion_id: _Optional[str] = ..., delta: _Optional[str] = ..., finish_reason: _Optional[_Union[_completion_pb2.FinishReason, str]] = ..., completion_tokens: _Optional[int] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServedModel(_message.Message):
    __slots__ = ("model", "aliases", "engine", "adapter")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    model: _completion_pb2.ModelVersion
    aliases: _containers.RepeatedScalarFieldContainer[str]
    engine: str
    adapter: bool
    def __init__(self, model: _Optional[_Union[_completion_pb2.ModelVersion, _Mapping]] = ..., aliases: _Optional[_Iterable[str]] = ..., engine: _Optional[str] = ..., adapter: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ServedModel]
    def __init__(self, models: _Optional[_Iterable[_Union[ServedModel, _Mapping]]] = ...) -> None: ...
