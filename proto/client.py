"""``CoordinatorClient``: the one client of the coordinator's gRPC service.

Used by the agent, the synthetic load-test agent, ``chainfed status`` and the
simulation's progress polling, so the channel options, the auth metadata, the retry
rule and the chunked transfers are written once. Protobuf stays inside (and in the
service): callers pass and receive the dataclasses of ``chainfed.proto.messages``.

Retry rule: a call that fails with a status meaning "the coordinator is away or
overloaded" (``RETRYABLE``) is retried after an exponentially growing, ±50 % jittered
delay; patience (``RetryPolicy.give_up_after_s``) counts from the first failure, so one
long attempt that timed out (a big fetch) is retried rather than taken as the whole
wait. Any other status is the coordinator's answer and raises ``CoordinatorError``
carrying the gRPC status code.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch

from chainfed.proto import chainfed_pb2 as pb
from chainfed.proto import chainfed_pb2_grpc as pb_grpc
from chainfed.proto import serde
from chainfed.proto.errors import ChainFedError
from chainfed.proto.messages import (
    ProbeReport,
    RegisterAck,
    Registration,
    StatusSnapshot,
    Task,
    UpdateHeader,
    UpdateMetrics,
)
from chainfed.proto.tensor_chunks import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ChunkAssembler,
    TensorSpec,
    chunk_data_budget,
    manifest_of,
    tensors_to_chunks,
)

log = logging.getLogger("chainfed.client")
T = TypeVar("T")

RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,  # how an overloaded or stopping server drops a call
)


class CoordinatorError(ChainFedError):
    """The coordinator answered a call with an error status (or stayed away too long)."""

    def __init__(self, message: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(message)
        self.code = code
        """The gRPC status code of the (last) failed attempt."""
        self.details = details


class CoordinatorUnreachableError(CoordinatorError):
    """The coordinator stayed unreachable longer than the client's patience."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often a call is retried while the coordinator is away."""

    give_up_after_s: float = 600.0
    """Give up after failing this long (counted from the first failure)."""
    first_backoff_s: float = 0.5
    """First delay; doubles after each failure, up to ``max_backoff_s``, ±50 % jitter."""
    max_backoff_s: float = 30.0


class CoordinatorClient:
    """Typed calls to one coordinator, with retry, over one channel.

    ``wait(seconds)`` sleeps between retries and returns True when the caller wants to
    stop instead (a ``threading.Event.wait``); ``on_call(method, seconds)`` is told of
    every call that succeeded and ``on_retry(method)`` of every retry (the load test's
    latencies and retry counts).
    """

    def __init__(
        self,
        address: str,
        token: str,
        *,
        tls_ca: bytes | None = None,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        own_connection: bool = False,
        wait: Callable[[float], bool | None] = time.sleep,
        on_call: Callable[[str, float], None] | None = None,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.address, self.tls_ca = address, tls_ca
        self.retry = retry
        """None: one attempt, no retry (``chainfed status``)."""
        self.max_message_bytes = max_message_bytes
        self.own_connection = own_connection
        """One TCP connection for this client alone, as a separate device would have."""
        self.wait, self.on_call, self.on_retry = wait, on_call, on_retry
        self.metadata = serde.auth_metadata(token)
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.ChainFedStub | None = None

    # -- the channel ---------------------------------------------------------------------

    def connect(self) -> None:
        """(Re)open the channel with the current message limit."""
        self.close()
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]
        if self.own_connection:
            options.append(("grpc.use_local_subchannel_pool", 1))
        if self.tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.tls_ca)
            self._channel = grpc.secure_channel(self.address, credentials, options)
        else:
            self._channel = grpc.insecure_channel(self.address, options)
        self._stub = pb_grpc.ChainFedStub(self._channel)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = self._stub = None

    @property
    def stub(self) -> pb_grpc.ChainFedStub:
        if self._stub is None:
            self.connect()
        return self._stub

    # -- retry ---------------------------------------------------------------------------

    def call(self, what: str, attempt: Callable[[], T]) -> T:
        """``attempt()`` (one RPC), retried per ``retry`` while the coordinator is away."""
        policy = self.retry
        delay = policy.first_backoff_s if policy else 0.0
        first_failure = None
        while True:
            started = time.perf_counter()
            try:
                result = attempt()
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details()
                if policy is None or code not in RETRYABLE:
                    raise CoordinatorError(
                        f"coordinator refused {what}: {code.name}: {details}", code, details
                    ) from exc
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                if now - first_failure > policy.give_up_after_s:
                    raise CoordinatorUnreachableError(
                        f"coordinator {self.address} unreachable for "
                        f"{policy.give_up_after_s:.0f} s ({code.name})",
                        code,
                        details,
                    ) from exc
                pause = delay * random.uniform(0.5, 1.5)
                log.info(
                    "%s: coordinator unavailable (%s), retrying in %.1f s", what, code.name, pause
                )
                if self.on_retry is not None:
                    self.on_retry(what)
                if self.wait(pause):
                    raise CoordinatorUnreachableError(f"{what}: stopped", code, details) from exc
                delay = min(delay * 2, policy.max_backoff_s)
                continue
            if self.on_call is not None:
                self.on_call(what, time.perf_counter() - started)
            return result

    # -- the RPCs ------------------------------------------------------------------------

    def register(self, registration: Registration, *, timeout: float = 30) -> RegisterAck:
        """Register; when the coordinator states another message limit, the channel is
        reopened with it."""
        request = serde.registration_to_proto(registration)
        ack = self.call(
            "Register",
            lambda: serde.register_ack_from_proto(
                self.stub.Register(request, metadata=self.metadata, timeout=timeout)
            ),
        )
        if ack.max_message_bytes != self.max_message_bytes:
            self.max_message_bytes = ack.max_message_bytes
            self.connect()
        return ack

    def get_task(self, agent_id: str, wait_ms: int) -> Task:
        """The agent's next task, long-polling up to ``wait_ms``."""
        request = pb.GetTaskRequest(agent_id=agent_id, wait_ms=wait_ms)
        return self.call(
            "GetTask",
            lambda: serde.task_from_proto(
                self.stub.GetTask(request, metadata=self.metadata, timeout=wait_ms / 1000 + 30)
            ),
        )

    def fetch(
        self,
        agent_id: str,
        round_id: str,
        specs: list[TensorSpec] | tuple[TensorSpec, ...],
        *,
        omit_final: bool = False,
        timeout: float = 600,
    ) -> dict[str, torch.Tensor]:
        """The round's tensors (``specs``: what the task's manifest says they are)."""
        request = pb.FetchTensorsRequest(
            agent_id=agent_id, round_id=round_id, omit_final=omit_final
        )

        def fetch() -> dict[str, torch.Tensor]:
            assembler = ChunkAssembler(list(specs))
            for message in self.stub.FetchTensors(request, metadata=self.metadata, timeout=timeout):
                assembler.add(serde.tensor_chunk_from_proto(message))
            return assembler.finish()

        return self.call("FetchTensors", fetch)

    def submit(
        self,
        agent_id: str,
        round_id: str,
        metrics: UpdateMetrics,
        tensors: dict[str, torch.Tensor],
        *,
        timeout: float = 600,
        before_chunk: Callable[[int, int], None] | None = None,
    ) -> None:
        """Upload an update as a header and chunks cut to the message limit;
        ``before_chunk(k, n)`` runs before chunk k of n is sent (fault injection)."""
        header = UpdateHeader(agent_id, round_id, metrics, tuple(manifest_of(tensors)))
        chunks = list(tensors_to_chunks(tensors, chunk_data_budget(self.max_message_bytes)))

        def parts() -> Iterator[pb.UpdatePart]:
            yield serde.update_part_to_proto(header)
            for k, chunk in enumerate(chunks):
                if before_chunk is not None:
                    before_chunk(k, len(chunks))
                yield serde.update_part_to_proto(chunk)

        self.call(
            "SubmitUpdate",
            lambda: self.stub.SubmitUpdate(parts(), metadata=self.metadata, timeout=timeout),
        )

    def report_probe(self, report: ProbeReport, *, timeout: float = 60) -> None:
        request = serde.probe_report_to_proto(report)
        self.call(
            "ReportProbe",
            lambda: self.stub.ReportProbe(request, metadata=self.metadata, timeout=timeout),
        )

    def status(self, history_limit: int = 0, *, timeout: float = 10) -> StatusSnapshot:
        """Where the chain stands (the last ``history_limit`` rounds; 0 = all that fit)."""
        request = pb.StatusRequest(history_limit=history_limit)
        return self.call(
            "Status",
            lambda: serde.status_snapshot_from_proto(
                self.stub.Status(request, metadata=self.metadata, timeout=timeout)
            ),
        )
