from protos.fleetlearn.v1 import arrays_pb2 as _arrays_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EpisodeOutcome(_message.Message):
    __slots__ = ("success", "reason", "started_at", "ended_at")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    success: bool
    reason: str
    started_at: float
    ended_at: float
    def __init__(self, success: _Optional[bool] = ..., reason: _Optional[str] = ..., started_at: _Optional[float] = ..., ended_at: _Optional[float] = ...) -> None: ...

class StepChunk(_message.Message):
    __slots__ = ("cell_id", "episode_id", "seq", "first_step", "task", "policy_version", "timestamp", "joint_pos", "action", "intervention", "reward", "cameras", "last", "outcome", "shadow_action", "shadow_version")
    CELL_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    JOINT_POS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    INTERVENTION_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    CAMERAS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SHADOW_ACTION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    cell_id: str
    episode_id: str
    seq: int
    first_step: int
    task: str
    policy_version: str
    timestamp: _arrays_pb2.Tensor
    joint_pos: _arrays_pb2.Tensor
    action: _arrays_pb2.Tensor
    intervention: _arrays_pb2.Tensor
    reward: _arrays_pb2.Tensor
    cameras: _containers.RepeatedCompositeFieldContainer[_arrays_pb2.CameraFrames]
    last: bool
    outcome: EpisodeOutcome
    shadow_action: _arrays_pb2.Tensor
    shadow_version: str
    def __init__(self, cell_id: _Optional[str] = ..., episode_id: _Optional[str] = ..., seq: _Optional[int] = ..., first_step: _Optional[int] = ..., task: _Optional[str] = ..., policy_version: _Optional[str] = ..., timestamp: _Optional[_Union[_arrays_pb2.Tensor, _Mapping]] = ..., joint_pos: _Optional[_Union[_arrays_pb2.Tensor, _Mapping]] = ..., action: _Optional[_Union[_arrays_pb2.Tensor, _Mapping]] = ..., intervention: _Optional[_Union[_arrays_pb2.Tensor, _Mapping]] = ..., reward: _Optional[_Union[_arrays_pb2.Tensor, _Mapping]] = ..., cameras: _Optional[_Iterable[_Union[_arrays_pb2.CameraFrames, _Mapping]]] = ..., last: _Optional[bool] = ..., outcome: _Optional[_Union[EpisodeOutcome, _Mapping]] = ..., shadow_action: _Optional[_Union[_arrays_pb2.Tensor, _Mapping]] = ..., shadow_version: _Optional[str] = ...) -> None: ...

class ChunkAck(_message.Message):
    __slots__ = ("cell_id", "episode_id", "seq", "durable", "duplicate", "code", "message")
    CELL_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    cell_id: str
    episode_id: str
    seq: int
    durable: bool
    duplicate: bool
    code: int
    message: str
    def __init__(self, cell_id: _Optional[str] = ..., episode_id: _Optional[str] = ..., seq: _Optional[int] = ..., durable: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
