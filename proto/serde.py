"""Protobuf <-> domain conversion: the only module that touches both (DESIGN.md §5).

Paired ``x_to_proto`` / ``x_from_proto`` functions for every message with content;
``x_from_proto(x_to_proto(obj)) == obj`` for every valid ``obj``. ``*_from_proto``
raises ``ProtocolError`` (or ``ChunkError`` for tensor specs and chunks) for a message
no correct peer sends: an unset enum, a missing required sub-message, an unknown dtype,
a manifest whose ``total_bytes`` disagrees with its shape. Servicers and clients
receive protobuf, call one of these, and hand plain objects on.

Auth travels in gRPC metadata: ``auth_metadata(token)`` builds it on the agent,
``token_from_metadata(...)`` reads it on the coordinator.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from chainfed.proto import chainfed_pb2 as pb
from chainfed.proto.messages import (
    AgentCapabilities,
    AgentStatus,
    ChainPhase,
    ProbeReport,
    ProtocolError,
    RegisterAck,
    Registration,
    RoundRecord,
    StatusSnapshot,
    Task,
    TaskKind,
    TrainingParams,
    UpdateHeader,
    UpdateMetrics,
)
from chainfed.proto.tensor_chunks import ChunkError, TensorChunk, TensorSpec

AUTH_METADATA_KEY = "authorization"
"""gRPC metadata key of the agent's token (value ``Bearer <token>``)."""

_BEARER = "Bearer "


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``; pass as ``metadata=`` on every agent call."""
    return ((AUTH_METADATA_KEY, _BEARER + token),)


def token_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The bearer token in call metadata, or None when absent or not a bearer value."""
    for key, value in metadata or ():
        if key.lower() == AUTH_METADATA_KEY and isinstance(value, str):
            if value.startswith(_BEARER):
                return value[len(_BEARER) :]
    return None


Decoded = TypeVar("Decoded", bound=Message)


def parse_message(message_type: type[Decoded], data: bytes) -> Decoded:
    """Decode wire bytes as ``message_type``; ``ProtocolError`` when they are not one.

    Truncated fields, bad varints, wrong wire types and invalid UTF-8 in a string all
    end here, so a peer's garbage is a protocol violation, never a decoder exception.
    """
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        raise ProtocolError(
            f"cannot decode {len(data)} bytes as a {message_type.DESCRIPTOR.name}: {exc}"
        ) from None


# ---------------------------------------------------------------------------------
# Enums: protobuf value names are PREFIX_ + the domain name upper-cased.
# ---------------------------------------------------------------------------------


def _enum_to_proto(enum_type, prefix: str, name: str) -> int:
    return enum_type.Value(prefix + name.upper())


def _enum_from_proto(enum_type, prefix: str, value: int, what: str) -> str:
    name = enum_type.Name(value) if value in enum_type.values() else None
    if name is None or not name.startswith(prefix) or name.endswith("_UNSPECIFIED"):
        raise ProtocolError(f"{what} is unset or unknown ({value})")
    return name[len(prefix) :].lower()


def _optional_int(message, name: str) -> int | None:
    return getattr(message, name) if message.HasField(name) else None


def _optional_float(message, name: str) -> float | None:
    return getattr(message, name) if message.HasField(name) else None


def _required(message, name: str, what: str):
    if not message.HasField(name):
        raise ProtocolError(f"{what} is missing")
    return getattr(message, name)


# ---------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------


def dtype_to_proto(dtype: str) -> int:
    try:
        return _enum_to_proto(pb.DType, "DTYPE_", dtype)
    except ValueError:
        raise ChunkError(f"dtype {dtype!r} has no wire value") from None


def dtype_from_proto(value: int) -> str:
    try:
        return _enum_from_proto(pb.DType, "DTYPE_", value, "tensor dtype")
    except ProtocolError as err:
        raise ChunkError(str(err)) from None


def tensor_spec_to_proto(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(
        name=spec.name,
        dtype=dtype_to_proto(spec.dtype),
        shape=spec.shape,
        total_bytes=spec.total_bytes,
    )


def tensor_spec_from_proto(message: pb.TensorSpec) -> TensorSpec:
    spec = TensorSpec(message.name, dtype_from_proto(message.dtype), tuple(message.shape))
    if message.total_bytes != spec.total_bytes:
        raise ChunkError(
            f"tensor {spec.name!r}: manifest says total_bytes={message.total_bytes} but "
            f"{spec.describe()} is {spec.total_bytes} bytes"
        )
    return spec


def tensor_chunk_to_proto(chunk: TensorChunk) -> pb.TensorChunk:
    return pb.TensorChunk(
        name=chunk.name,
        dtype=dtype_to_proto(chunk.dtype),
        shape=chunk.shape,
        offset=chunk.offset,
        total_bytes=chunk.total_bytes,
        data=chunk.data,
    )


def tensor_chunk_from_proto(message: pb.TensorChunk) -> TensorChunk:
    """Field-level conversion only; ``ChunkAssembler.add`` validates the chunk."""
    return TensorChunk(
        name=message.name,
        dtype=dtype_from_proto(message.dtype),
        shape=tuple(message.shape),
        offset=message.offset,
        total_bytes=message.total_bytes,
        data=message.data,
    )


# ---------------------------------------------------------------------------------
# Register
# ---------------------------------------------------------------------------------


def agent_capabilities_to_proto(caps: AgentCapabilities) -> pb.AgentCapabilities:
    return pb.AgentCapabilities(
        device=caps.device,
        memory_budget_bytes=caps.memory_budget_bytes,
        num_samples=caps.num_samples,
        software_version=caps.software_version,
        model_fingerprint=caps.model_fingerprint,
        max_window=caps.max_window,
        labels=caps.labels,
    )


def agent_capabilities_from_proto(message: pb.AgentCapabilities) -> AgentCapabilities:
    return AgentCapabilities(
        device=message.device,
        memory_budget_bytes=message.memory_budget_bytes,
        num_samples=message.num_samples,
        software_version=message.software_version,
        model_fingerprint=message.model_fingerprint,
        max_window=message.max_window,
        labels=tuple(message.labels),
    )


def registration_to_proto(registration: Registration) -> pb.RegisterRequest:
    return pb.RegisterRequest(
        agent_id=registration.agent_id,
        token=registration.token,
        capabilities=agent_capabilities_to_proto(registration.capabilities),
    )


def registration_from_proto(message: pb.RegisterRequest) -> Registration:
    caps = _required(message, "capabilities", "RegisterRequest.capabilities")
    return Registration(
        agent_id=message.agent_id,
        token=message.token,
        capabilities=agent_capabilities_from_proto(caps),
    )


def register_ack_to_proto(ack: RegisterAck) -> pb.RegisterResponse:
    return pb.RegisterResponse(agent_id=ack.agent_id, max_message_bytes=ack.max_message_bytes)


def register_ack_from_proto(message: pb.RegisterResponse) -> RegisterAck:
    return RegisterAck(agent_id=message.agent_id, max_message_bytes=message.max_message_bytes)


# ---------------------------------------------------------------------------------
# GetTask
# ---------------------------------------------------------------------------------


def _gpo_to_proto(spec: str) -> tuple[int, int]:
    kind, _, depth = spec.partition(":")
    return _enum_to_proto(pb.GpoKind, "GPO_KIND_", kind), (
        0 if depth in ("", "all") else int(depth)
    )


def _gpo_from_proto(kind_value: int, depth: int) -> str:
    kind = _enum_from_proto(pb.GpoKind, "GPO_KIND_", kind_value, "TrainingParams.gpo_kind")
    if kind != "exact":
        if depth:
            raise ProtocolError(f"TrainingParams.gpo_exact_depth={depth} with gpo_kind {kind}")
        return kind
    return f"exact:{depth or 'all'}"


def training_params_to_proto(params: TrainingParams) -> pb.TrainingParams:
    gpo_kind, gpo_depth = _gpo_to_proto(params.gpo)
    return pb.TrainingParams(
        lr=params.lr,
        weight_decay=params.weight_decay,
        micro_batch=params.micro_batch,
        grad_accum=params.grad_accum,
        local_steps=params.local_steps,
        local_epochs=params.local_epochs,
        gpo_kind=gpo_kind,
        gpo_exact_depth=gpo_depth,
        gpo_lambda=params.gpo_lambda,
        proxy_rank=params.proxy_rank,
        lora_rank=params.lora_rank,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        backbone_dropout=params.backbone_dropout,
        e2e_streamed=params.e2e_streamed,
        lora_targets=_enum_to_proto(pb.LoraTargets, "LORA_TARGETS_", params.lora_targets),
        lora_train_a=params.lora_train_a,
        lora_seed=params.lora_seed,
        seed=params.seed,
        foat_samples=params.foat_samples,
        local_dp_clip=params.local_dp_clip,
        local_dp_noise_multiplier=params.local_dp_noise_multiplier,
    )


def training_params_from_proto(message: pb.TrainingParams) -> TrainingParams:
    return TrainingParams(
        lr=message.lr,
        weight_decay=message.weight_decay,
        micro_batch=message.micro_batch,
        grad_accum=message.grad_accum,
        local_steps=message.local_steps,
        local_epochs=message.local_epochs,
        gpo=_gpo_from_proto(message.gpo_kind, message.gpo_exact_depth),
        gpo_lambda=message.gpo_lambda,
        proxy_rank=message.proxy_rank,
        lora_rank=message.lora_rank,
        lora_alpha=message.lora_alpha,
        lora_dropout=message.lora_dropout,
        backbone_dropout=message.backbone_dropout,
        e2e_streamed=message.e2e_streamed,
        lora_targets=_enum_from_proto(
            pb.LoraTargets, "LORA_TARGETS_", message.lora_targets, "TrainingParams.lora_targets"
        ),
        lora_train_a=message.lora_train_a,
        lora_seed=message.lora_seed,
        seed=message.seed,
        foat_samples=message.foat_samples,
        local_dp_clip=message.local_dp_clip,
        local_dp_noise_multiplier=message.local_dp_noise_multiplier,
    )


def task_to_proto(task: Task) -> pb.Task:
    message = pb.Task(
        kind=_enum_to_proto(pb.TaskKind, "TASK_KIND_", task.kind.value),
        round_id=task.round_id,
        stage_layer=task.stage_layer,
        window_layers=task.window_layers,
        frozen_layers=task.frozen_layers,
        deadline_unix_ms=task.deadline_unix_ms,
        tensors=[tensor_spec_to_proto(spec) for spec in task.tensors],
        retry_after_ms=task.retry_after_ms,
    )
    if task.params is not None:
        message.params.CopyFrom(training_params_to_proto(task.params))
    return message


def task_from_proto(message: pb.Task) -> Task:
    kind = _enum_from_proto(pb.TaskKind, "TASK_KIND_", message.kind, "Task.kind")
    return Task(
        kind=TaskKind(kind),
        round_id=message.round_id,
        stage_layer=_optional_int(message, "stage_layer"),
        window_layers=tuple(message.window_layers),
        frozen_layers=tuple(message.frozen_layers),
        params=(training_params_from_proto(message.params) if message.HasField("params") else None),
        deadline_unix_ms=message.deadline_unix_ms,
        tensors=tuple(tensor_spec_from_proto(spec) for spec in message.tensors),
        retry_after_ms=message.retry_after_ms,
    )


# ---------------------------------------------------------------------------------
# SubmitUpdate
# ---------------------------------------------------------------------------------


def update_metrics_to_proto(metrics: UpdateMetrics) -> pb.UpdateMetrics:
    return pb.UpdateMetrics(
        train_samples=metrics.train_samples,
        val_samples=metrics.val_samples,
        steps=metrics.steps,
        train_loss=metrics.train_loss,
        val_loss=metrics.val_loss,
        val_metric=metrics.val_metric,
        peak_memory_bytes=metrics.peak_memory_bytes,
        seconds=metrics.seconds,
    )


def update_metrics_from_proto(message: pb.UpdateMetrics) -> UpdateMetrics:
    return UpdateMetrics(
        train_samples=message.train_samples,
        val_samples=message.val_samples,
        steps=message.steps,
        train_loss=message.train_loss,
        val_loss=message.val_loss,
        val_metric=message.val_metric,
        peak_memory_bytes=message.peak_memory_bytes,
        seconds=message.seconds,
    )


def update_header_to_proto(header: UpdateHeader) -> pb.UpdateHeader:
    return pb.UpdateHeader(
        agent_id=header.agent_id,
        round_id=header.round_id,
        metrics=update_metrics_to_proto(header.metrics),
        tensors=[tensor_spec_to_proto(spec) for spec in header.tensors],
    )


def update_header_from_proto(message: pb.UpdateHeader) -> UpdateHeader:
    metrics = _required(message, "metrics", "UpdateHeader.metrics")
    return UpdateHeader(
        agent_id=message.agent_id,
        round_id=message.round_id,
        metrics=update_metrics_from_proto(metrics),
        tensors=tuple(tensor_spec_from_proto(spec) for spec in message.tensors),
    )


def update_part_to_proto(part: UpdateHeader | TensorChunk) -> pb.UpdatePart:
    if isinstance(part, UpdateHeader):
        return pb.UpdatePart(header=update_header_to_proto(part))
    return pb.UpdatePart(chunk=tensor_chunk_to_proto(part))


def update_part_from_proto(message: pb.UpdatePart) -> UpdateHeader | TensorChunk:
    which = message.WhichOneof("part")
    if which == "header":
        return update_header_from_proto(message.header)
    if which == "chunk":
        return tensor_chunk_from_proto(message.chunk)
    raise ProtocolError("UpdatePart carries neither a header nor a chunk")


# ---------------------------------------------------------------------------------
# ReportProbe
# ---------------------------------------------------------------------------------


def probe_report_to_proto(report: ProbeReport) -> pb.ProbeReport:
    return pb.ProbeReport(
        agent_id=report.agent_id,
        round_id=report.round_id,
        cka_scores=report.cka_scores,
        num_samples=report.num_samples,
        readout_losses=report.readout_losses,
    )


def probe_report_from_proto(message: pb.ProbeReport) -> ProbeReport:
    return ProbeReport(
        agent_id=message.agent_id,
        round_id=message.round_id,
        cka_scores=tuple(message.cka_scores),
        num_samples=message.num_samples,
        readout_losses=tuple(message.readout_losses),
    )


# ---------------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------------


def agent_status_to_proto(status: AgentStatus) -> pb.AgentStatus:
    return pb.AgentStatus(
        agent_id=status.agent_id,
        capabilities=agent_capabilities_to_proto(status.capabilities),
        last_seen_unix_ms=status.last_seen_unix_ms,
        rounds_completed=status.rounds_completed,
        inactive=status.inactive,
    )


def agent_status_from_proto(message: pb.AgentStatus) -> AgentStatus:
    caps = _required(message, "capabilities", "AgentStatus.capabilities")
    return AgentStatus(
        agent_id=message.agent_id,
        capabilities=agent_capabilities_from_proto(caps),
        last_seen_unix_ms=message.last_seen_unix_ms,
        rounds_completed=message.rounds_completed,
        inactive=message.inactive,
    )


def round_record_to_proto(record: RoundRecord) -> pb.RoundRecord:
    return pb.RoundRecord(
        round_id=record.round_id,
        stage_layer=record.stage_layer,
        window_layers=record.window_layers,
        participants=record.participants,
        dropped=record.dropped,
        metrics=update_metrics_to_proto(record.metrics),
        finished_unix_ms=record.finished_unix_ms,
        update_digests=record.update_digests,
        dp_epsilon=record.dp_epsilon,
        dp_round_epsilon=record.dp_round_epsilon,
    )


def round_record_from_proto(message: pb.RoundRecord) -> RoundRecord:
    metrics = _required(message, "metrics", "RoundRecord.metrics")
    return RoundRecord(
        round_id=message.round_id,
        stage_layer=message.stage_layer,
        window_layers=tuple(message.window_layers),
        participants=tuple(message.participants),
        dropped=tuple(message.dropped),
        metrics=update_metrics_from_proto(metrics),
        finished_unix_ms=message.finished_unix_ms,
        update_digests=tuple(message.update_digests),
        dp_epsilon=_optional_float(message, "dp_epsilon"),
        dp_round_epsilon=_optional_float(message, "dp_round_epsilon"),
    )


def status_snapshot_to_proto(snapshot: StatusSnapshot) -> pb.StatusSnapshot:
    return pb.StatusSnapshot(
        phase=_enum_to_proto(pb.ChainPhase, "CHAIN_PHASE_", snapshot.phase.value),
        num_layers=snapshot.num_layers,
        start_layer=snapshot.start_layer,
        stage_layer=snapshot.stage_layer,
        window_layers=snapshot.window_layers,
        final_layers=snapshot.final_layers,
        round_id=snapshot.round_id,
        stage_rounds=snapshot.stage_rounds,
        total_rounds=snapshot.total_rounds,
        agents=[agent_status_to_proto(agent) for agent in snapshot.agents],
        history=[round_record_to_proto(record) for record in snapshot.history],
        dp_epsilon=snapshot.dp_epsilon,
        dp_delta=snapshot.dp_delta,
        dp_epsilon_budget=snapshot.dp_epsilon_budget,
        stop_reason=snapshot.stop_reason,
        history_omitted=snapshot.history_omitted,
        params=None if snapshot.params is None else training_params_to_proto(snapshot.params),
    )


def status_snapshot_from_proto(message: pb.StatusSnapshot) -> StatusSnapshot:
    phase = _enum_from_proto(pb.ChainPhase, "CHAIN_PHASE_", message.phase, "StatusSnapshot.phase")
    return StatusSnapshot(
        phase=ChainPhase(phase),
        num_layers=message.num_layers,
        start_layer=_optional_int(message, "start_layer"),
        stage_layer=_optional_int(message, "stage_layer"),
        window_layers=tuple(message.window_layers),
        final_layers=tuple(message.final_layers),
        round_id=message.round_id,
        stage_rounds=message.stage_rounds,
        total_rounds=message.total_rounds,
        agents=tuple(agent_status_from_proto(agent) for agent in message.agents),
        history=tuple(round_record_from_proto(record) for record in message.history),
        dp_epsilon=_optional_float(message, "dp_epsilon"),
        dp_delta=message.dp_delta,
        dp_epsilon_budget=_optional_float(message, "dp_epsilon_budget"),
        stop_reason=message.stop_reason,
        history_omitted=message.history_omitted,
        params=(training_params_from_proto(message.params) if message.HasField("params") else None),
    )
