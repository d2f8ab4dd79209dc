from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Truncate(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATE_END: _ClassVar[Truncate]
    TRUNCATE_START: _ClassVar[Truncate]
    TRUNCATE_NONE: _ClassVar[Truncate]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_FLOAT: _ClassVar[Encoding]
    ENCODING_FLOAT32_BYTES: _ClassVar[Encoding]
    ENCODING_FLOAT16_BYTES: _ClassVar[Encoding]
    ENCODING_UBINARY: _ClassVar[Encoding]
TRUNCATE_END: Truncate
TRUNCATE_START: Truncate
TRUNCATE_NONE: Truncate
ENCODING_FLOAT: Encoding
ENCODING_FLOAT32_BYTES: Encoding
ENCODING_FLOAT16_BYTES: Encoding
ENCODING_UBINARY: Encoding

class EmbedRequest(_message.Message):
    __slots__ = ("inputs", "prompt_name", "instruction", "dimensions", "normalize", "truncate", "encoding", "request_id", "model")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_NAME_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    prompt_name: str
    instruction: str
    dimensions: int
    normalize: bool
    truncate: Truncate
    encoding: Encoding
    request_id: str
    model: str
    def __init__(self, inputs: _Optional[_Iterable[str]] = ..., prompt_name: _Optional[str] = ..., instruction: _Optional[str] = ..., dimensions: _Optional[int] = ..., normalize: _Optional[bool] = ..., truncate: _Optional[_Union[Truncate, str]] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "truncated_inputs")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_INPUTS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    truncated_inputs: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., truncated_inputs: _Optional[int] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("request_id", "dimensions", "encoding", "embeddings", "data", "usage", "error", "count", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    dimensions: int
    encoding: Encoding
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    data: bytes
    usage: Usage
    error: Status
    count: int
    model: str
    def __init__(self, request_id: _Optional[str] = ..., dimensions: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., data: _Optional[bytes] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., error: _Optional[_Union[Status, _Mapping]] = ..., count: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("inputs", "prompt_name", "instruction", "truncate", "return_tokens", "model")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_NAME_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    prompt_name: str
    instruction: str
    truncate: Truncate
    return_tokens: bool
    model: str
    def __init__(self, inputs: _Optional[_Iterable[str]] = ..., prompt_name: _Optional[str] = ..., instruction: _Optional[str] = ..., truncate: _Optional[_Union[Truncate, str]] = ..., return_tokens: _Optional[bool] = ..., model: _Optional[str] = ...) -> None: ...

class TokenizedInput(_message.Message):
    __slots__ = ("ids", "tokens", "truncated")
    IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    truncated: bool
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("inputs", "usage")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[TokenizedInput]
    usage: Usage
    def __init__(self, inputs: _Optional[_Iterable[_Union[TokenizedInput, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelDescription(_message.Message):
    __slots__ = ("name", "task", "dimensions", "max_length", "precision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    task: str
    dimensions: int
    max_length: int
    precision: str
    def __init__(self, name: _Optional[str] = ..., task: _Optional[str] = ..., dimensions: _Optional[int] = ..., max_length: _Optional[int] = ..., precision: _Optional[str] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model", "dimensions", "min_dimensions", "max_length", "prompt_names", "pooling", "precision", "devices", "max_batch_tokens", "version", "max_inputs", "workers", "pooled_token", "pooled_token_id", "pooled_token_source", "task", "models", "default_instruction")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    MIN_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PROMPT_NAMES_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUTS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    POOLED_TOKEN_FIELD_NUMBER: _ClassVar[int]
    POOLED_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    POOLED_TOKEN_SOURCE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    dimensions: int
    min_dimensions: int
    max_length: int
    prompt_names: _containers.RepeatedScalarFieldContainer[str]
    pooling: str
    precision: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    max_batch_tokens: int
    version: str
    max_inputs: int
    workers: int
    pooled_token: str
    pooled_token_id: int
    pooled_token_source: str
    task: str
    models: _containers.RepeatedCompositeFieldContainer[ModelDescription]
    default_instruction: str
    def __init__(self, model: _Optional[str] = ..., dimensions: _Optional[int] = ..., min_dimensions: _Optional[int] = ..., max_length: _Optional[int] = ..., prompt_names: _Optional[_Iterable[str]] = ..., pooling: _Optional[str] = ..., precision: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., max_batch_tokens: _Optional[int] = ..., version: _Optional[str] = ..., max_inputs: _Optional[int] = ..., workers: _Optional[int] = ..., pooled_token: _Optional[str] = ..., pooled_token_id: _Optional[int] = ..., pooled_token_source: _Optional[str] = ..., task: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelDescription, _Mapping]]] = ..., default_instruction: _Optional[str] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("query", "documents", "instruction", "top_n", "return_documents", "truncate", "request_id", "model")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    RETURN_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    query: str
    documents: _containers.RepeatedScalarFieldContainer[str]
    instruction: str
    top_n: int
    return_documents: bool
    truncate: Truncate
    request_id: str
    model: str
    def __init__(self, query: _Optional[str] = ..., documents: _Optional[_Iterable[str]] = ..., instruction: _Optional[str] = ..., top_n: _Optional[int] = ..., return_documents: _Optional[bool] = ..., truncate: _Optional[_Union[Truncate, str]] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class RerankResult(_message.Message):
    __slots__ = ("index", "score", "document")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    document: str
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ..., document: _Optional[str] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("request_id", "results", "usage", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    results: _containers.RepeatedCompositeFieldContainer[RerankResult]
    usage: Usage
    model: str
    def __init__(self, request_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[RerankResult, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class RerankBatchRequest(_message.Message):
    __slots__ = ("requests", "request_id")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RerankRequest]
    request_id: str
    def __init__(self, requests: _Optional[_Iterable[_Union[RerankRequest, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RerankBatchResponse(_message.Message):
    __slots__ = ("responses", "request_id", "usage", "model")
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[RerankResponse]
    request_id: str
    usage: Usage
    model: str
    def __init__(self, responses: _Optional[_Iterable[_Union[RerankResponse, _Mapping]]] = ..., request_id: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...
