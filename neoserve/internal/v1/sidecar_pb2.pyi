from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SidecarModelShape(_message.Message):
    __slots__ = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "dtype", "scale")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    scale: float
    def __init__(self, num_layers: _Optional[int] = ..., num_heads: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., scale: _Optional[float] = ...) -> None: ...

class SidecarHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SidecarHealthResponse(_message.Message):
    __slots__ = ("status", "pid", "pid_start_time", "configured", "shape", "threads", "cpus", "kv_capacity_bytes", "attached")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[SidecarHealthResponse.Status]
        SERVING: _ClassVar[SidecarHealthResponse.Status]
        NOT_CONFIGURED: _ClassVar[SidecarHealthResponse.Status]
        SHUTTING_DOWN: _ClassVar[SidecarHealthResponse.Status]
    STATUS_UNSPECIFIED: SidecarHealthResponse.Status
    SERVING: SidecarHealthResponse.Status
    NOT_CONFIGURED: SidecarHealthResponse.Status
    SHUTTING_DOWN: SidecarHealthResponse.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PID_START_TIME_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    status: SidecarHealthResponse.Status
    pid: int
    pid_start_time: int
    configured: bool
    shape: SidecarModelShape
    threads: int
    cpus: _containers.RepeatedScalarFieldContainer[int]
    kv_capacity_bytes: int
    attached: bool
    def __init__(self, status: _Optional[_Union[SidecarHealthResponse.Status, str]] = ..., pid: _Optional[int] = ..., pid_start_time: _Optional[int] = ..., configured: _Optional[bool] = ..., shape: _Optional[_Union[SidecarModelShape, _Mapping]] = ..., threads: _Optional[int] = ..., cpus: _Optional[_Iterable[int]] = ..., kv_capacity_bytes: _Optional[int] = ..., attached: _Optional[bool] = ...) -> None: ...

class SidecarConfigureRequest(_message.Message):
    __slots__ = ("shape",)
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    shape: SidecarModelShape
    def __init__(self, shape: _Optional[_Union[SidecarModelShape, _Mapping]] = ...) -> None: ...

class SidecarConfigureResponse(_message.Message):
    __slots__ = ("shape", "kv_capacity_bytes")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    shape: SidecarModelShape
    kv_capacity_bytes: int
    def __init__(self, shape: _Optional[_Union[SidecarModelShape, _Mapping]] = ..., kv_capacity_bytes: _Optional[int] = ...) -> None: ...

class SidecarAttachRequest(_message.Message):
    __slots__ = ("client_pid", "free_all_sequences")
    CLIENT_PID_FIELD_NUMBER: _ClassVar[int]
    FREE_ALL_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    client_pid: int
    free_all_sequences: bool
    def __init__(self, client_pid: _Optional[int] = ..., free_all_sequences: _Optional[bool] = ...) -> None: ...

class SidecarAttachResponse(_message.Message):
    __slots__ = ("request_ring", "response_ring", "slot_size", "request_slots", "response_slots", "generation")
    REQUEST_RING_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_RING_FIELD_NUMBER: _ClassVar[int]
    SLOT_SIZE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_SLOTS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    request_ring: str
    response_ring: str
    slot_size: int
    request_slots: int
    response_slots: int
    generation: int
    def __init__(self, request_ring: _Optional[str] = ..., response_ring: _Optional[str] = ..., slot_size: _Optional[int] = ..., request_slots: _Optional[int] = ..., response_slots: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class SidecarSequenceIds(_message.Message):
    __slots__ = ("seq_ids",)
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    seq_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SidecarSequencesResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class SidecarStatsRequest(_message.Message):
    __slots__ = ("per_sequence",)
    PER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    per_sequence: bool
    def __init__(self, per_sequence: _Optional[bool] = ...) -> None: ...

class SidecarStatsResponse(_message.Message):
    __slots__ = ("configured", "num_sequences", "sequence_tokens", "total_tokens", "blocks_used", "blocks_total", "bytes_used", "bytes_total", "messages_processed", "errors", "busy_seconds", "uptime_seconds", "request_ring_pending_slots", "response_ring_pending_slots", "kv_stats")
    class SequenceTokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    class KvStatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    NUM_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_RING_PENDING_SLOTS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_RING_PENDING_SLOTS_FIELD_NUMBER: _ClassVar[int]
    KV_STATS_FIELD_NUMBER: _ClassVar[int]
    configured: bool
    num_sequences: int
    sequence_tokens: _containers.ScalarMap[int, int]
    total_tokens: int
    blocks_used: int
    blocks_total: int
    bytes_used: int
    bytes_total: int
    messages_processed: int
    errors: int
    busy_seconds: float
    uptime_seconds: float
    request_ring_pending_slots: int
    response_ring_pending_slots: int
    kv_stats: _containers.ScalarMap[str, float]
    def __init__(self, configured: _Optional[bool] = ..., num_sequences: _Optional[int] = ..., sequence_tokens: _Optional[_Mapping[int, int]] = ..., total_tokens: _Optional[int] = ..., blocks_used: _Optional[int] = ..., blocks_total: _Optional[int] = ..., bytes_used: _Optional[int] = ..., bytes_total: _Optional[int] = ..., messages_processed: _Optional[int] = ..., errors: _Optional[int] = ..., busy_seconds: _Optional[float] = ..., uptime_seconds: _Optional[float] = ..., request_ring_pending_slots: _Optional[int] = ..., response_ring_pending_slots: _Optional[int] = ..., kv_stats: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SidecarShutdownRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SidecarShutdownResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
