from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WatchRequest(_message.Message):
    __slots__ = ("cell_id", "current_version")
    CELL_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    cell_id: str
    current_version: str
    def __init__(self, cell_id: _Optional[str] = ..., current_version: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("version_id", "manifest_json", "size_bytes", "sha256", "signature", "published_at", "shadow_version_id", "shadow", "prefetch")
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    version_id: str
    manifest_json: str
    size_bytes: int
    sha256: str
    signature: str
    published_at: float
    shadow_version_id: str
    shadow: Assignment
    prefetch: _containers.RepeatedCompositeFieldContainer[Assignment]
    def __init__(self, version_id: _Optional[str] = ..., manifest_json: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., signature: _Optional[str] = ..., published_at: _Optional[float] = ..., shadow_version_id: _Optional[str] = ..., shadow: _Optional[_Union[Assignment, _Mapping]] = ..., prefetch: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("cell_id", "version_id", "offset", "chunk_bytes", "max_bytes_per_s")
    CELL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    cell_id: str
    version_id: str
    offset: int
    chunk_bytes: int
    max_bytes_per_s: int
    def __init__(self, cell_id: _Optional[str] = ..., version_id: _Optional[str] = ..., offset: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., max_bytes_per_s: _Optional[int] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("offset", "data", "total_bytes")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_bytes: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("cell_id", "version_running", "task", "episodes", "steps_recorded", "steps_acked", "loop_hz", "late_ticks", "last_fault", "sent_at", "versions_adopted_json", "successes", "interventions", "spool_bytes", "spool_chunks", "shadow_version", "fault_count")
    CELL_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_RUNNING_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    STEPS_RECORDED_FIELD_NUMBER: _ClassVar[int]
    STEPS_ACKED_FIELD_NUMBER: _ClassVar[int]
    LOOP_HZ_FIELD_NUMBER: _ClassVar[int]
    LATE_TICKS_FIELD_NUMBER: _ClassVar[int]
    LAST_FAULT_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_ADOPTED_JSON_FIELD_NUMBER: _ClassVar[int]
    SUCCESSES_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    SPOOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPOOL_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    FAULT_COUNT_FIELD_NUMBER: _ClassVar[int]
    cell_id: str
    version_running: str
    task: str
    episodes: int
    steps_recorded: int
    steps_acked: int
    loop_hz: float
    late_ticks: int
    last_fault: str
    sent_at: float
    versions_adopted_json: str
    successes: int
    interventions: int
    spool_bytes: int
    spool_chunks: int
    shadow_version: str
    fault_count: int
    def __init__(self, cell_id: _Optional[str] = ..., version_running: _Optional[str] = ..., task: _Optional[str] = ..., episodes: _Optional[int] = ..., steps_recorded: _Optional[int] = ..., steps_acked: _Optional[int] = ..., loop_hz: _Optional[float] = ..., late_ticks: _Optional[int] = ..., last_fault: _Optional[str] = ..., sent_at: _Optional[float] = ..., versions_adopted_json: _Optional[str] = ..., successes: _Optional[int] = ..., interventions: _Optional[int] = ..., spool_bytes: _Optional[int] = ..., spool_chunks: _Optional[int] = ..., shadow_version: _Optional[str] = ..., fault_count: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("server_time",)
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    server_time: float
    def __init__(self, server_time: _Optional[float] = ...) -> None: ...
