"""The gRPC face of the coordinator: auth, long-poll, chunked transfers, persistence.

Servicer methods authenticate, convert protobuf at the edge (``serde``), then delegate
to ``ChainCoordinator`` under one lock and persist after every change. Agents pull;
the coordinator never dials anyone. A background ticker closes rounds at their
deadline even when no agent is polling.

Status codes: no or wrong token → UNAUTHENTICATED; a malformed message, bad chunk or
invalid update → INVALID_ARGUMENT; a stale round, unselected agent or wrong model →
FAILED_PRECONDITION; an unknown agent → NOT_FOUND. Every rejection is logged and never
touches the round's aggregate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from chainfed.coordinator import serde, state_store
from chainfed.coordinator.chain_state import ChainCoordinator, UpdateRejected
from chainfed.coordinator.messages import ProtocolError, RegisterAck, TaskKind, UpdateHeader
from chainfed.coordinator.tensor_chunks import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ChunkAssembler,
    ChunkError,
    chunk_data_budget,
    tensors_to_chunks,
)
from chainfed.proto import chainfed_pb2 as pb
from chainfed.proto import chainfed_pb2_grpc as pb_grpc

log = logging.getLogger("chainfed.coordinator")

_CODES = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "not_found": grpc.StatusCode.NOT_FOUND,
}


@dataclass(frozen=True)
class ServiceConfig:
    """Transport settings of the coordinator service."""

    state_dir: Path
    """Where the chain state is persisted (and resumed from)."""
    tokens: dict[str, str]
    """token -> agent id it is bound to ("" = a shared token valid for any agent id)."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Hard per-message limit, both directions."""
    poll_seconds: float = 10.0
    """How long GetTask holds a call open before answering WAIT."""
    max_update_bytes: int = 1 << 30
    """Cap on the declared size of one update (checked before allocating)."""


class ChainFedServicer(pb_grpc.ChainFedServicer):
    """Implements ``chainfed.v1.ChainFed`` over a ``ChainCoordinator``."""

    def __init__(self, coordinator: ChainCoordinator, config: ServiceConfig) -> None:
        self.coordinator = coordinator
        self.config = config
        self.lock = threading.Condition()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, daemon=True)
        self._ticker.start()

    # -- plumbing -----------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def _tick_loop(self) -> None:
        while not self._stop.wait(0.25):
            with self.lock:
                self.coordinator.tick(_now_ms())
                self._persist_if_changed()

    def _persist_if_changed(self) -> None:
        if self.coordinator.changed:
            state_store.save(self.coordinator, self.config.state_dir)
            self.coordinator.changed = False
            self.lock.notify_all()

    def _authenticate(self, context: grpc.ServicerContext, agent_id: str | None) -> None:
        token = serde.token_from_metadata(context.invocation_metadata())
        if token is None or token not in self.config.tokens:
            log.warning("rejected call without a valid token (%s)", context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid token")
        bound = self.config.tokens[token]
        if bound and agent_id is not None and agent_id not in ("", bound):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"this token is not valid for agent {agent_id}"
            )

    def _check_size(self, message, context: grpc.ServicerContext) -> None:
        size = message.ByteSize()
        if size > self.config.max_message_bytes:
            log.warning(
                "rejected a %d-byte message (limit %d)", size, self.config.max_message_bytes
            )
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"message of {size} bytes is over the limit of {self.config.max_message_bytes}",
            )

    def _reject(self, context: grpc.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, UpdateRejected):
            code = _CODES[exc.code]
        else:
            code = grpc.StatusCode.INVALID_ARGUMENT
        log.warning("rejected %s: %s", code.name, exc)
        context.abort(code, str(exc))

    # -- rpcs ---------------------------------------------------------------------------

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext):
        self._authenticate(context, None)
        try:
            registration = serde.registration_from_proto(request)
        except (ProtocolError, ValueError) as exc:
            self._reject(context, exc)
        self._authenticate(context, registration.agent_id)
        token = serde.token_from_metadata(context.invocation_metadata())
        requested = registration.agent_id or self.config.tokens[token]
        with self.lock:
            try:
                agent_id = self.coordinator.register(
                    requested, registration.capabilities, _now_ms()
                )
            except UpdateRejected as exc:
                self._reject(context, exc)
            self.coordinator.tick(_now_ms())
            self._persist_if_changed()
        return serde.register_ack_to_proto(RegisterAck(agent_id, self.config.max_message_bytes))

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext):
        self._authenticate(context, request.agent_id)
        wait = min(self.config.poll_seconds, request.wait_ms / 1000, _remaining(context))
        give_up = time.monotonic() + wait
        with self.lock:
            while True:
                try:
                    task = self.coordinator.next_task(request.agent_id, _now_ms())
                except UpdateRejected as exc:
                    self._reject(context, exc)
                self._persist_if_changed()
                if task.kind is not TaskKind.WAIT or time.monotonic() >= give_up:
                    return serde.task_to_proto(task)
                if not context.is_active():
                    return serde.task_to_proto(task)
                self.lock.wait(timeout=max(0.0, min(0.25, give_up - time.monotonic())))

    def FetchTensors(self, request: pb.FetchTensorsRequest, context: grpc.ServicerContext):
        self._authenticate(context, request.agent_id)
        with self.lock:
            try:
                self.coordinator.touch(request.agent_id, _now_ms())
                tensors = self.coordinator.tensors_for(request.round_id)
            except UpdateRejected as exc:
                self._reject(context, exc)
        budget = chunk_data_budget(self.config.max_message_bytes)
        for chunk in tensors_to_chunks(tensors, budget):
            yield serde.tensor_chunk_to_proto(chunk)

    def SubmitUpdate(self, request_iterator: Iterator[pb.UpdatePart], context):
        self._authenticate(context, None)
        try:
            first_message = next(request_iterator)
            self._check_size(first_message, context)
            first = serde.update_part_from_proto(first_message)
            if not isinstance(first, UpdateHeader):
                raise ProtocolError("an update must start with its header")
            self._authenticate(context, first.agent_id)
            assembler = ChunkAssembler(first.tensors, max_total_bytes=self.config.max_update_bytes)
            for message in request_iterator:
                self._check_size(message, context)
                part = serde.update_part_from_proto(message)
                if isinstance(part, UpdateHeader):
                    raise ProtocolError("an update has exactly one header")
                assembler.add(part)
            tensors = assembler.finish()
        except StopIteration:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty update stream")
        except (ProtocolError, ChunkError, ValueError) as exc:
            self._reject(context, exc)
        with self.lock:
            try:
                self.coordinator.submit(
                    first.agent_id, first.round_id, first.metrics, tensors, _now_ms()
                )
            except UpdateRejected as exc:
                self._reject(context, exc)
            self._persist_if_changed()
        return pb.SubmitUpdateResponse(
            round_id=first.round_id,
            tensors=len(tensors),
            bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        )

    def ReportProbe(self, request: pb.ProbeReport, context: grpc.ServicerContext):
        self._authenticate(context, None)
        try:
            report = serde.probe_report_from_proto(request)
        except (ProtocolError, ValueError) as exc:
            self._reject(context, exc)
        self._authenticate(context, report.agent_id)
        with self.lock:
            try:
                self.coordinator.touch(report.agent_id, _now_ms())
                self.coordinator.report_probe(report)
                self.coordinator.tick(_now_ms())
            except UpdateRejected as exc:
                self._reject(context, exc)
            self._persist_if_changed()
        return pb.ReportProbeResponse(round_id=report.round_id)

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext):
        self._authenticate(context, None)
        with self.lock:
            snapshot = self.coordinator.snapshot()
        if request.history_limit:
            snapshot = replace(snapshot, history=snapshot.history[-request.history_limit :])
        return serde.status_snapshot_to_proto(snapshot)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _remaining(context: grpc.ServicerContext) -> float:
    remaining = context.time_remaining()
    return 3600.0 if remaining is None else max(0.0, remaining - 0.5)


def start_server(
    coordinator: ChainCoordinator,
    config: ServiceConfig,
    address: str,
    *,
    tls: tuple[bytes, bytes] | None = None,
    max_workers: int = 64,
) -> tuple[grpc.Server, ChainFedServicer, int]:
    """Start serving on ``address`` (``host:port``, port 0 = any free one).

    Returns (server, servicer, bound port). With ``tls=(cert_pem, key_pem)`` the port
    accepts TLS only; a plaintext client fails its handshake.
    """
    # grpc's own receive limit sits above ours: a message over it can reach the handler
    # as a silent end of stream; between the two, the handler rejects it explicitly.
    options = [
        ("grpc.max_receive_message_length", 2 * config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
    servicer = ChainFedServicer(coordinator, config)
    pb_grpc.add_ChainFedServicer_to_server(servicer, server)
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    server.start()
    with servicer.lock:
        state_store.save(coordinator, config.state_dir)
        coordinator.changed = False
    return server, servicer, port
