from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_WAIT: _ClassVar[TaskKind]
    TASK_KIND_PROBE: _ClassVar[TaskKind]
    TASK_KIND_TRAIN_ROUND: _ClassVar[TaskKind]
    TASK_KIND_ADVANCE: _ClassVar[TaskKind]
    TASK_KIND_DONE: _ClassVar[TaskKind]
    TASK_KIND_EVALUATE: _ClassVar[TaskKind]
    TASK_KIND_FIT_HEAD: _ClassVar[TaskKind]

class GpoKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GPO_KIND_UNSPECIFIED: _ClassVar[GpoKind]
    GPO_KIND_NONE: _ClassVar[GpoKind]
    GPO_KIND_PROXY: _ClassVar[GpoKind]
    GPO_KIND_EXACT: _ClassVar[GpoKind]

class LoraTargets(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LORA_TARGETS_UNSPECIFIED: _ClassVar[LoraTargets]
    LORA_TARGETS_ATTENTION: _ClassVar[LoraTargets]
    LORA_TARGETS_ALL: _ClassVar[LoraTargets]
    LORA_TARGETS_QV: _ClassVar[LoraTargets]

class ChainPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHAIN_PHASE_UNSPECIFIED: _ClassVar[ChainPhase]
    CHAIN_PHASE_WAITING_FOR_AGENTS: _ClassVar[ChainPhase]
    CHAIN_PHASE_PROBING: _ClassVar[ChainPhase]
    CHAIN_PHASE_TRAINING: _ClassVar[ChainPhase]
    CHAIN_PHASE_DONE: _ClassVar[ChainPhase]
    CHAIN_PHASE_EVALUATING: _ClassVar[ChainPhase]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT64: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_INT16: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_WAIT: TaskKind
TASK_KIND_PROBE: TaskKind
TASK_KIND_TRAIN_ROUND: TaskKind
TASK_KIND_ADVANCE: TaskKind
TASK_KIND_DONE: TaskKind
TASK_KIND_EVALUATE: TaskKind
TASK_KIND_FIT_HEAD: TaskKind
GPO_KIND_UNSPECIFIED: GpoKind
GPO_KIND_NONE: GpoKind
GPO_KIND_PROXY: GpoKind
GPO_KIND_EXACT: GpoKind
LORA_TARGETS_UNSPECIFIED: LoraTargets
LORA_TARGETS_ATTENTION: LoraTargets
LORA_TARGETS_ALL: LoraTargets
LORA_TARGETS_QV: LoraTargets
CHAIN_PHASE_UNSPECIFIED: ChainPhase
CHAIN_PHASE_WAITING_FOR_AGENTS: ChainPhase
CHAIN_PHASE_PROBING: ChainPhase
CHAIN_PHASE_TRAINING: ChainPhase
CHAIN_PHASE_DONE: ChainPhase
CHAIN_PHASE_EVALUATING: ChainPhase

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "total_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    total_bytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "total_bytes", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    total_bytes: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class AgentCapabilities(_message.Message):
    __slots__ = ("device", "memory_budget_bytes", "num_samples", "software_version", "model_fingerprint", "max_window", "labels")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_WINDOW_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    device: str
    memory_budget_bytes: int
    num_samples: int
    software_version: str
    model_fingerprint: str
    max_window: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, device: _Optional[str] = ..., memory_budget_bytes: _Optional[int] = ..., num_samples: _Optional[int] = ..., software_version: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., max_window: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("agent_id", "token", "capabilities")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    token: str
    capabilities: AgentCapabilities
    def __init__(self, agent_id: _Optional[str] = ..., token: _Optional[str] = ..., capabilities: _Optional[_Union[AgentCapabilities, _Mapping]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("agent_id", "max_message_bytes")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    max_message_bytes: int
    def __init__(self, agent_id: _Optional[str] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("agent_id", "wait_ms")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    wait_ms: int
    def __init__(self, agent_id: _Optional[str] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class TrainingParams(_message.Message):
    __slots__ = ("lr", "weight_decay", "micro_batch", "grad_accum", "local_steps", "gpo_kind", "gpo_exact_depth", "gpo_lambda", "proxy_rank", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_train_a", "lora_seed", "seed", "foat_samples", "local_dp_clip", "local_dp_noise_multiplier", "local_epochs", "backbone_dropout", "e2e_streamed")
    LR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    GRAD_ACCUM_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    GPO_KIND_FIELD_NUMBER: _ClassVar[int]
    GPO_EXACT_DEPTH_FIELD_NUMBER: _ClassVar[int]
    GPO_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    PROXY_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGETS_FIELD_NUMBER: _ClassVar[int]
    LORA_TRAIN_A_FIELD_NUMBER: _ClassVar[int]
    LORA_SEED_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FOAT_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_DP_CLIP_FIELD_NUMBER: _ClassVar[int]
    LOCAL_DP_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    E2E_STREAMED_FIELD_NUMBER: _ClassVar[int]
    lr: float
    weight_decay: float
    micro_batch: int
    grad_accum: int
    local_steps: int
    gpo_kind: GpoKind
    gpo_exact_depth: int
    gpo_lambda: float
    proxy_rank: int
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: LoraTargets
    lora_train_a: bool
    lora_seed: int
    seed: int
    foat_samples: int
    local_dp_clip: float
    local_dp_noise_multiplier: float
    local_epochs: float
    backbone_dropout: float
    e2e_streamed: bool
    def __init__(self, lr: _Optional[float] = ..., weight_decay: _Optional[float] = ..., micro_batch: _Optional[int] = ..., grad_accum: _Optional[int] = ..., local_steps: _Optional[int] = ..., gpo_kind: _Optional[_Union[GpoKind, str]] = ..., gpo_exact_depth: _Optional[int] = ..., gpo_lambda: _Optional[float] = ..., proxy_rank: _Optional[int] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_dropout: _Optional[float] = ..., lora_targets: _Optional[_Union[LoraTargets, str]] = ..., lora_train_a: _Optional[bool] = ..., lora_seed: _Optional[int] = ..., seed: _Optional[int] = ..., foat_samples: _Optional[int] = ..., local_dp_clip: _Optional[float] = ..., local_dp_noise_multiplier: _Optional[float] = ..., local_epochs: _Optional[float] = ..., backbone_dropout: _Optional[float] = ..., e2e_streamed: _Optional[bool] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("kind", "round_id", "stage_layer", "window_layers", "frozen_layers", "params", "deadline_unix_ms", "tensors", "retry_after_ms")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_LAYER_FIELD_NUMBER: _ClassVar[int]
    WINDOW_LAYERS_FIELD_NUMBER: _ClassVar[int]
    FROZEN_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    kind: TaskKind
    round_id: str
    stage_layer: int
    window_layers: _containers.RepeatedScalarFieldContainer[int]
    frozen_layers: _containers.RepeatedScalarFieldContainer[int]
    params: TrainingParams
    deadline_unix_ms: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    retry_after_ms: int
    def __init__(self, kind: _Optional[_Union[TaskKind, str]] = ..., round_id: _Optional[str] = ..., stage_layer: _Optional[int] = ..., window_layers: _Optional[_Iterable[int]] = ..., frozen_layers: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[TrainingParams, _Mapping]] = ..., deadline_unix_ms: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class FetchTensorsRequest(_message.Message):
    __slots__ = ("agent_id", "round_id", "omit_final")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    OMIT_FINAL_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    round_id: str
    omit_final: bool
    def __init__(self, agent_id: _Optional[str] = ..., round_id: _Optional[str] = ..., omit_final: _Optional[bool] = ...) -> None: ...

class UpdateMetrics(_message.Message):
    __slots__ = ("train_samples", "val_samples", "steps", "train_loss", "val_loss", "val_metric", "peak_memory_bytes", "seconds")
    TRAIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    VAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_METRIC_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    train_samples: int
    val_samples: int
    steps: int
    train_loss: float
    val_loss: float
    val_metric: float
    peak_memory_bytes: int
    seconds: float
    def __init__(self, train_samples: _Optional[int] = ..., val_samples: _Optional[int] = ..., steps: _Optional[int] = ..., train_loss: _Optional[float] = ..., val_loss: _Optional[float] = ..., val_metric: _Optional[float] = ..., peak_memory_bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("agent_id", "round_id", "metrics", "tensors")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    round_id: str
    metrics: UpdateMetrics
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, agent_id: _Optional[str] = ..., round_id: _Optional[str] = ..., metrics: _Optional[_Union[UpdateMetrics, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class UpdatePart(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class SubmitUpdateResponse(_message.Message):
    __slots__ = ("round_id", "tensors", "bytes")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    tensors: int
    bytes: int
    def __init__(self, round_id: _Optional[str] = ..., tensors: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class ProbeReport(_message.Message):
    __slots__ = ("agent_id", "round_id", "cka_scores", "num_samples", "readout_losses")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    CKA_SCORES_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    READOUT_LOSSES_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    round_id: str
    cka_scores: _containers.RepeatedScalarFieldContainer[float]
    num_samples: int
    readout_losses: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, agent_id: _Optional[str] = ..., round_id: _Optional[str] = ..., cka_scores: _Optional[_Iterable[float]] = ..., num_samples: _Optional[int] = ..., readout_losses: _Optional[_Iterable[float]] = ...) -> None: ...

class ReportProbeResponse(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("history_limit",)
    HISTORY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    history_limit: int
    def __init__(self, history_limit: _Optional[int] = ...) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("agent_id", "capabilities", "last_seen_unix_ms", "rounds_completed", "inactive")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    INACTIVE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    capabilities: AgentCapabilities
    last_seen_unix_ms: int
    rounds_completed: int
    inactive: bool
    def __init__(self, agent_id: _Optional[str] = ..., capabilities: _Optional[_Union[AgentCapabilities, _Mapping]] = ..., last_seen_unix_ms: _Optional[int] = ..., rounds_completed: _Optional[int] = ..., inactive: _Optional[bool] = ...) -> None: ...

class RoundRecord(_message.Message):
    __slots__ = ("round_id", "stage_layer", "window_layers", "participants", "dropped", "metrics", "finished_unix_ms", "update_digests", "dp_epsilon", "dp_round_epsilon")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_LAYER_FIELD_NUMBER: _ClassVar[int]
    WINDOW_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    DP_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DP_ROUND_EPSILON_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    stage_layer: int
    window_layers: _containers.RepeatedScalarFieldContainer[int]
    participants: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    metrics: UpdateMetrics
    finished_unix_ms: int
    update_digests: _containers.RepeatedScalarFieldContainer[str]
    dp_epsilon: float
    dp_round_epsilon: float
    def __init__(self, round_id: _Optional[str] = ..., stage_layer: _Optional[int] = ..., window_layers: _Optional[_Iterable[int]] = ..., participants: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ..., metrics: _Optional[_Union[UpdateMetrics, _Mapping]] = ..., finished_unix_ms: _Optional[int] = ..., update_digests: _Optional[_Iterable[str]] = ..., dp_epsilon: _Optional[float] = ..., dp_round_epsilon: _Optional[float] = ...) -> None: ...

class StatusSnapshot(_message.Message):
    __slots__ = ("phase", "num_layers", "start_layer", "stage_layer", "window_layers", "final_layers", "round_id", "stage_rounds", "total_rounds", "agents", "history", "dp_epsilon", "dp_delta", "dp_epsilon_budget", "stop_reason", "history_omitted", "params")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    STAGE_LAYER_FIELD_NUMBER: _ClassVar[int]
    WINDOW_LAYERS_FIELD_NUMBER: _ClassVar[int]
    FINAL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    DP_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    DP_EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    HISTORY_OMITTED_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    phase: ChainPhase
    num_layers: int
    start_layer: int
    stage_layer: int
    window_layers: _containers.RepeatedScalarFieldContainer[int]
    final_layers: _containers.RepeatedScalarFieldContainer[int]
    round_id: str
    stage_rounds: int
    total_rounds: int
    agents: _containers.RepeatedCompositeFieldContainer[AgentStatus]
    history: _containers.RepeatedCompositeFieldContainer[RoundRecord]
    dp_epsilon: float
    dp_delta: float
    dp_epsilon_budget: float
    stop_reason: str
    history_omitted: int
    params: TrainingParams
    def __init__(self, phase: _Optional[_Union[ChainPhase, str]] = ..., num_layers: _Optional[int] = ..., start_layer: _Optional[int] = ..., stage_layer: _Optional[int] = ..., window_layers: _Optional[_Iterable[int]] = ..., final_layers: _Optional[_Iterable[int]] = ..., round_id: _Optional[str] = ..., stage_rounds: _Optional[int] = ..., total_rounds: _Optional[int] = ..., agents: _Optional[_Iterable[_Union[AgentStatus, _Mapping]]] = ..., history: _Optional[_Iterable[_Union[RoundRecord, _Mapping]]] = ..., dp_epsilon: _Optional[float] = ..., dp_delta: _Optional[float] = ..., dp_epsilon_budget: _Optional[float] = ..., stop_reason: _Optional[str] = ..., history_omitted: _Optional[int] = ..., params: _Optional[_Union[TrainingParams, _Mapping]] = ...) -> None: ...
