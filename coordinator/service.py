"""The gRPC face of the coordinator: auth, long-poll, chunked transfers, persistence.

Servicer methods authenticate, convert protobuf at the edge (``serde``), then delegate
to ``ChainCoordinator`` under one lock and persist after every change. Agents pull;
the coordinator never dials anyone. A background ticker closes rounds at their
deadline even when no agent is polling.

Status codes: no or wrong token → UNAUTHENTICATED; a malformed message, bad chunk or
invalid update → INVALID_ARGUMENT; a stale round, unselected agent or wrong model →
FAILED_PRECONDITION; an unknown agent → NOT_FOUND. Every rejection is logged and never
touches the round's aggregate.

Scale. Every waiting GetTask holds one server thread, so the pool is large
(``ServiceConfig.max_workers``) and long-polls may hold all but a reserve of it: when
they would take the reserve, GetTask answers WAIT at once, so uploads and fetches always
find a thread, with ``retry_after_ms`` set to the caller's own poll window: the agent
comes back when its long-poll would have ended, as if it had held it (asked back sooner,
a fleet many times the pool polls in a tight loop and starves every other call).
Waiters are woken only when the answer to GetTask can change (phase, open round or
probe), not at every registration or upload; a caller that vanishes mid-poll keeps its
thread until its poll window ends.

Registrations are committed in groups: a registration is appended to the state's
journal (``state_store.persist``), one fsync'd write, and a fleet arriving together
would make one each. A Register records the agent and waits, lock released, a quarter
second for a save; then the first of the waiting calls to get the lock back writes once
for every registration made since. An acknowledged registration is on disk.

Persistence failure (state dir read-only, disk full): the call that triggered the save
fails with UNAVAILABLE (agents back off and retry), the servicer records the error in
``fatal`` and stops changing anything; ``chainfed coordinator`` then exits with that
error. The previous state on disk is intact, so a restart resumes from it.

Life cycle (``CoordinatorServer``): the port is bound first, with the standard health
service (``coordinator.health``) answering NOT_SERVING and every ChainFed call
UNAVAILABLE while the state loads; ``attach`` starts the chain, and ``report_serving``
turns health to SERVING once the service's other endpoints (metrics, status page) listen
too, so a probe that sees SERVING finds every endpoint up. ``shutdown`` (SIGTERM,
Ctrl-C) turns health to NOT_SERVING, waits for an aggregation or save in progress (both
run under the lock) and then refuses all new work with UNAVAILABLE, so the state on disk
is the last complete save; calls in flight get a bounded grace, then the port closes. A
restart resumes exactly as after a crash: a round that was open is re-run under a new id.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from chainfed.coordinator import fault_injection, state_store
from chainfed.coordinator.chain_state import ChainCoordinator
from chainfed.coordinator.health import HealthReporter
from chainfed.coordinator.metrics import CoordinatorMetrics
from chainfed.coordinator.update_checks import UpdateRejectedError
from chainfed.proto import chainfed_pb2 as pb
from chainfed.proto import chainfed_pb2_grpc as pb_grpc
from chainfed.proto import serde
from chainfed.proto.messages import (
    ProtocolError,
    RegisterAck,
    StatusSnapshot,
    TaskKind,
    UpdateHeader,
)
from chainfed.proto.tensor_chunks import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ChunkAssembler,
    ChunkError,
    chunk_data_budget,
    tensors_to_chunks,
)

log = logging.getLogger("chainfed.coordinator")

_CODES = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "not_found": grpc.StatusCode.NOT_FOUND,
}


GROUP_COMMIT_S = 0.25
"""How long a Register waits for a save that covers it before saving itself."""

FETCH_CACHE_ANSWERS = 2
"""FetchTensors answers kept cut into messages. Two, because a round is fetched two ways:
with the final adapters (an agent entering the stage, or restarted within it) and
without them (``omit_final``, every later round); with one, a restarted agent's fetch
would evict the answer every other agent of the round still asks for."""


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
    max_workers: int = 1024
    """Threads serving calls (created on demand); each waiting GetTask holds one."""
    max_transfers: int = 64
    """Tensor streams (FetchTensors, SubmitUpdate) served at once; more wait up to
    ``transfer_wait_s`` for a turn, then get UNAVAILABLE (agents back off and retry)."""
    transfer_wait_s: float = 20.0
    """How long a tensor stream waits for a turn."""

    @property
    def long_poll_slots(self) -> int:
        """Threads that waiting GetTask calls may hold; the rest stay free for uploads."""
        return max(1, self.max_workers - max(4, self.max_workers // 8))


class ChainFedServicer(pb_grpc.ChainFedServicer):
    """Implements ``chainfed.v1.ChainFed`` over a ``ChainCoordinator``."""

    def __init__(self, coordinator: ChainCoordinator, config: ServiceConfig) -> None:
        self.coordinator = coordinator
        self.config = config
        mutex = threading.RLock()
        self.lock = threading.Condition(mutex)
        self._saved = threading.Condition(mutex)
        """Notified after every completed save (registrations wait on it)."""
        self.saves_completed = 0
        """Saves completed so far."""
        self.fatal: state_store.StateDirError | None = None
        """Set when the state could not be saved; nothing changes after that."""
        self.draining = False
        """Set by ``drain``: shutting down, nothing changes after that."""
        self.metrics = CoordinatorMetrics(self.status_snapshot)
        coordinator.observer = self.metrics
        self._held = 0
        """GetTask calls waiting in the long-poll now."""
        self._task_key = self._current_task_key()
        self._transfers = threading.BoundedSemaphore(config.max_transfers)
        self._fetch_cache: OrderedDict[tuple, tuple[dict, list[pb.TensorChunk]]] = OrderedDict()
        """key -> (tensors, messages) of the latest FetchTensors answers, newest last:
        every agent of a round fetches the same tensors, so they are cut into messages
        once per round."""
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, daemon=True)
        self._ticker.start()

    # -- plumbing -----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop ticking and answer every waiting long-poll now (WAIT), so that a server
        shutting down with a grace period ends them cleanly instead of cancelling them."""
        self._stop.set()
        with self.lock:
            self.lock.notify_all()

    def drain(self) -> None:
        """Take no more work: returns once an aggregation or save in progress completed
        (they hold the lock); from then on every call that could change the chain gets
        UNAVAILABLE (agents back off and retry, reaching the restarted coordinator) and
        the ticker changes nothing, so the state on disk stays the last complete save."""
        with self.lock:
            self.draining = True
            self.lock.notify_all()
        self.stop()
        self._ticker.join()

    def status_snapshot(self) -> StatusSnapshot:
        """The chain's status now (``chainfed status``, the page, the metrics' gauges)."""
        with self.lock:
            return self.coordinator.snapshot(_now_ms())

    def _tick_loop(self) -> None:
        while not self._stop.wait(0.25):
            with self.lock:
                if self.fatal is None and not self.draining:
                    self.coordinator.tick(_now_ms())
                    self._persist_if_changed()

    def _current_task_key(self) -> tuple:
        """What GetTask answers depend on, besides the caller's own actions."""
        c = self.coordinator
        return (c.phase, c.open_round.round_id if c.open_round else None, c.probe_id)

    def _persist_if_changed(self) -> bool:
        """Save a changed state and wake the long-polls if tasks may have changed; False
        (and ``fatal`` set) when the state cannot be saved."""
        if self.coordinator.changed or self.coordinator.unsaved_agents:
            try:
                with self.metrics.state_save_seconds.time():
                    state_store.persist(self.coordinator, self.config.state_dir)
            except state_store.StateDirError as exc:
                log.error("stopping: %s", exc)
                self.fatal = exc
                self.lock.notify_all()
                self._saved.notify_all()
                return False
            self.saves_completed += 1
            self._saved.notify_all()
        key = self._current_task_key()
        if key != self._task_key:
            self._task_key = key
            self.lock.notify_all()
        return True

    def _check_fatal(self, context: grpc.ServicerContext) -> None:
        if self.fatal is not None:
            context.abort(
                grpc.StatusCode.UNAVAILABLE, f"coordinator cannot save its state: {self.fatal}"
            )
        if self.draining:
            context.abort(grpc.StatusCode.UNAVAILABLE, "coordinator is shutting down; retry")

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
            self.metrics.update_rejected("too_large")
            log.warning(
                "rejected a %d-byte message (limit %d)", size, self.config.max_message_bytes
            )
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"message of {size} bytes is over the limit of {self.config.max_message_bytes}",
            )

    def _reject(self, context: grpc.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, UpdateRejectedError):
            code = _CODES[exc.code]
        else:
            code = grpc.StatusCode.INVALID_ARGUMENT
        log.warning("rejected %s: %s", code.name, exc)
        context.abort(code, str(exc))

    def decoded(self, rpc, message_type, request: bytes, context: grpc.ServicerContext):
        """Run ``rpc`` on ``request`` decoded; bytes that are not a message: INVALID_ARGUMENT.

        grpc would answer a failing deserializer with INTERNAL and a traceback, as if the
        coordinator were broken; the token is still checked first.
        """
        try:
            message = serde.parse_message(message_type, request)
        except ProtocolError as exc:
            self._authenticate(context, None)
            self._reject(context, exc)
        return rpc(message, context)

    def decoded_stream(self, rpc, message_type, requests: Iterator[bytes], context):
        """``decoded`` for a request stream: an undecodable part raises ``ProtocolError``."""
        return rpc((serde.parse_message(message_type, r) for r in requests), context)

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
            self._check_fatal(context)
            try:
                agent_id = self.coordinator.register(
                    requested, registration.capabilities, _now_ms()
                )
            except UpdateRejectedError as exc:
                self._reject(context, exc)
            self.coordinator.tick(_now_ms())
            self._await_save(context)
        return serde.register_ack_to_proto(RegisterAck(agent_id, self.config.max_message_bytes))

    def _await_save(self, context: grpc.ServicerContext) -> None:
        """Return once a save begun after the caller's change has completed; called under
        the lock, which waiting releases. Saves run under the lock, so the next one to
        complete started after the change. The caller waits up to ``GROUP_COMMIT_S`` for
        another call (or the ticker) to save, then saves itself: the first of a group to
        get the lock back saves for all of them, and nobody depends on the ticker winning
        the lock against a crowd of calls."""
        target = self.saves_completed + 1
        self._saved.wait_for(lambda: self.saves_completed >= target, timeout=GROUP_COMMIT_S)
        self._check_fatal(context)  # draining or failed: nothing more is saved
        if self.saves_completed < target and not self._persist_if_changed():
            self._check_fatal(context)

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext):
        self._authenticate(context, request.agent_id)
        wait = min(self.config.poll_seconds, request.wait_ms / 1000, _remaining(context))
        give_up = time.monotonic() + wait
        with self.lock:
            while True:
                self._check_fatal(context)
                try:
                    task = self.coordinator.next_task(request.agent_id, _now_ms())
                except UpdateRejectedError as exc:
                    self._reject(context, exc)
                if not self._persist_if_changed():
                    self._check_fatal(context)
                if (
                    task.kind is not TaskKind.WAIT
                    or time.monotonic() >= give_up
                    or self._stop.is_set()
                ):
                    return serde.task_to_proto(task)
                if not context.is_active():
                    return serde.task_to_proto(task)
                if self._held >= self.config.long_poll_slots:
                    return serde.task_to_proto(replace(task, retry_after_ms=int(wait * 1000)))
                self._held += 1
                self.coordinator.polling[request.agent_id] += 1
                try:
                    self.lock.wait(timeout=max(0.0, give_up - time.monotonic()))
                finally:
                    self._held -= 1
                    self.coordinator.polling[request.agent_id] -= 1
                    if not self.coordinator.polling[request.agent_id]:
                        del self.coordinator.polling[request.agent_id]

    def FetchTensors(self, request: pb.FetchTensorsRequest, context: grpc.ServicerContext):
        self._authenticate(context, request.agent_id)
        with self.lock:
            self._check_fatal(context)
            try:
                self.coordinator.touch(request.agent_id, _now_ms())
                tensors = self.coordinator.tensors_for(
                    request.round_id, omit_final=request.omit_final
                )
            except UpdateRejectedError as exc:
                self._reject(context, exc)
            messages = self._fetch_messages(tensors)
        self._take_transfer_turn(context)
        try:
            for message in messages:
                yield message
                self.metrics.sent_bytes.inc(message.ByteSize())
        finally:
            self._transfers.release()

    def _take_transfer_turn(self, context: grpc.ServicerContext) -> None:
        """Wait for one of ``max_transfers`` turns. A thousand agents streaming at once
        overload the transport (calls dropped as CANCELLED or UNAVAILABLE after long
        stalls); in turns, each stream is quick."""
        if not self._transfers.acquire(timeout=self.config.transfer_wait_s):
            context.abort(
                grpc.StatusCode.UNAVAILABLE, "coordinator busy with other transfers; retry"
            )

    def _fetch_messages(self, tensors: dict) -> list[pb.TensorChunk]:
        """The chunk messages of ``tensors``, reused while they are the same, unmodified
        tensor objects (the cache holds them, so their ids cannot be reused)."""
        key = tuple((name, id(t), t._version) for name, t in tensors.items())
        if key in self._fetch_cache:
            self._fetch_cache.move_to_end(key)
        else:
            budget = chunk_data_budget(self.config.max_message_bytes)
            messages = [serde.tensor_chunk_to_proto(c) for c in tensors_to_chunks(tensors, budget)]
            self._fetch_cache[key] = (tensors, messages)
            while len(self._fetch_cache) > FETCH_CACHE_ANSWERS:
                self._fetch_cache.popitem(last=False)
        return self._fetch_cache[key][1]

    def SubmitUpdate(self, request_iterator: Iterator[pb.UpdatePart], context):
        self._authenticate(context, None)
        self._take_transfer_turn(context)
        try:
            return self._receive_update(request_iterator, context)
        finally:
            self._transfers.release()

    def _receive_update(self, request_iterator: Iterator[pb.UpdatePart], context):
        first, received = None, 0
        try:
            first_message = next(request_iterator)
            self._check_size(first_message, context)
            first = serde.update_part_from_proto(first_message)
            if not isinstance(first, UpdateHeader):
                raise ProtocolError("an update must start with its header")
            self._authenticate(context, first.agent_id)
            assembler = ChunkAssembler(first.tensors, max_total_bytes=self.config.max_update_bytes)
            self.metrics.received_bytes.inc(first_message.ByteSize())
            for message in request_iterator:
                self._check_size(message, context)
                self.metrics.received_bytes.inc(message.ByteSize())
                part = serde.update_part_from_proto(message)
                if isinstance(part, UpdateHeader):
                    raise ProtocolError("an update has exactly one header")
                assembler.add(part)
                received += len(part.data)
            tensors = assembler.finish()
        except StopIteration:
            self.metrics.update_rejected("malformed")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty update stream")
        except (ProtocolError, ChunkError, ValueError) as exc:
            self.metrics.update_rejected("malformed")
            self._reject(context, exc)
        except grpc.RpcError:
            # the agent went away mid-stream (cancelled, connection lost): nothing is kept
            log.warning(
                "discarded the partial upload of %s for round %s (%d of %d bytes): the "
                "agent disconnected mid-stream",
                first.agent_id if first else "an agent",
                first.round_id if first else "?",
                received,
                sum(spec.total_bytes for spec in first.tensors) if first else 0,
            )
            context.abort(grpc.StatusCode.CANCELLED, "upload interrupted")
        with self.lock:
            self._check_fatal(context)
            try:
                if self.coordinator.submit(
                    first.agent_id, first.round_id, first.metrics, tensors, _now_ms()
                ):
                    self.metrics.updates_accepted.inc()
            except UpdateRejectedError as exc:
                self.metrics.update_rejected(exc.reason)
                self._reject(context, exc)
            if not self._persist_if_changed():
                self._check_fatal(context)
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
            self._check_fatal(context)
            try:
                self.coordinator.touch(report.agent_id, _now_ms())
                self.coordinator.report_probe(report)
                self.coordinator.tick(_now_ms())
            except UpdateRejectedError as exc:
                self._reject(context, exc)
            if not self._persist_if_changed():
                self._check_fatal(context)
        return pb.ReportProbeResponse(round_id=report.round_id)

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext):
        self._authenticate(context, None)
        snapshot = self.status_snapshot()
        if request.history_limit and len(snapshot.history) > request.history_limit:
            snapshot = replace(
                snapshot,
                history=snapshot.history[-request.history_limit :],
                history_omitted=len(snapshot.history) - request.history_limit,
            )
        return fit_status(serde.status_snapshot_to_proto(snapshot), self.config.max_message_bytes)


_OMITTED_FIELD_BYTES = 6
"""Most bytes ``history_omitted`` can add: one tag byte and a varint of up to 5."""


def fit_status(reply: pb.StatusSnapshot, limit: int) -> pb.StatusSnapshot:
    """``reply`` with its oldest round records left out until it fits ``limit`` bytes.

    A long federation (about 50 rounds of 1,000 agents) outgrows the message limit, and
    gRPC would refuse to send the reply at all; the newest rounds are the ones an
    operator wants. ``history_omitted`` counts what was left out. Each removed record
    is credited with its own size plus one byte, no more than the tag and length it
    also frees, so the result is guaranteed to fit unless the rest of the reply alone
    (the agent list) does not.
    """
    excess = reply.ByteSize() + _OMITTED_FIELD_BYTES - limit
    dropped = 0
    while excess > 0 and dropped < len(reply.history):
        excess -= reply.history[dropped].ByteSize() + 1
        dropped += 1
    if dropped:
        del reply.history[:dropped]
        reply.history_omitted += dropped
    return reply


_METHOD_HANDLERS = {  # (client streams, server streams) -> grpc handler factory
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _decoding_handler(servicer: ChainFedServicer) -> grpc.GenericRpcHandler:
    """Every rpc of ``chainfed.v1.ChainFed``, fed raw request bytes through ``decoded``."""
    service = pb.DESCRIPTOR.services_by_name["ChainFed"]
    handlers = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        serialize = getattr(pb, method.output_type.name).SerializeToString
        rpc = getattr(servicer, method.name)
        decode = servicer.decoded_stream if method.client_streaming else servicer.decoded
        make = _METHOD_HANDLERS[method.client_streaming, method.server_streaming]
        handlers[method.name] = make(functools.partial(decode, rpc, request_type), None, serialize)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _remaining(context: grpc.ServicerContext) -> float:
    remaining = context.time_remaining()
    return 3600.0 if remaining is None else max(0.0, remaining - 0.5)


class _ChainFedGate(grpc.GenericRpcHandler):
    """Routes ``chainfed.v1.ChainFed`` calls to the servicer once one is attached; until
    then (the state is loading) each gets UNAVAILABLE, which agents retry."""

    def __init__(self) -> None:
        self._handler: grpc.GenericRpcHandler | None = None
        service = pb.DESCRIPTOR.services_by_name["ChainFed"]
        self._prefix = f"/{service.full_name}/"
        self._loading = {
            f"{self._prefix}{m.name}": _METHOD_HANDLERS[m.client_streaming, m.server_streaming](
                _answer_loading
            )
            for m in service.methods
        }

    def attach(self, handler: grpc.GenericRpcHandler) -> None:
        self._handler = handler

    def service(self, handler_call_details):
        if self._handler is not None:
            return self._handler.service(handler_call_details)
        return self._loading.get(handler_call_details.method)


def _answer_loading(_request, context: grpc.ServicerContext):
    context.abort(grpc.StatusCode.UNAVAILABLE, "coordinator is loading its state; retry")


class CoordinatorServer:
    """The gRPC server of one coordinator through its life: bound and NOT_SERVING at
    construction, SERVING after ``attach`` and ``report_serving``, NOT_SERVING again from
    ``shutdown`` (module docstring)."""

    def __init__(
        self, config: ServiceConfig, address: str, *, tls: tuple[bytes, bytes] | None = None
    ) -> None:
        """Bind ``address`` (``host:port``, port 0 = any free one) and start answering:
        health NOT_SERVING, ChainFed UNAVAILABLE. With ``tls=(cert_pem, key_pem)`` the port
        accepts TLS only; a plaintext client fails its handshake. ``OSError`` when the
        address cannot be bound."""
        # grpc's own receive limit sits above ours: a message over it can reach the handler
        # as a silent end of stream; between the two, the handler rejects it explicitly.
        options = [
            ("grpc.max_receive_message_length", 2 * config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ]
        fault_injection.load_plan()  # a bad CHAINFED_FAULT fails here, not at the first save
        self.config = config
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_workers), options=options
        )
        self.health = HealthReporter(self.server)
        self._gate = _ChainFedGate()
        self.server.add_generic_rpc_handlers((self._gate,))
        if tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot bind {address}")
        self.server.start()
        self.servicer: ChainFedServicer | None = None

    def attach(self, coordinator: ChainCoordinator) -> ChainFedServicer:
        """Serve ``coordinator`` (its state saved first, so the state dir is whole from
        here on); health stays NOT_SERVING until ``report_serving``. Agent silence counts
        from now (``online_since_ms``)."""
        coordinator.online_since_ms = _now_ms()
        servicer = ChainFedServicer(coordinator, self.config)
        with servicer.lock:
            state_store.save(coordinator, self.config.state_dir)
        self.servicer = servicer
        self._gate.attach(_decoding_handler(servicer))
        return servicer

    def report_serving(self) -> None:
        """Health SERVING: called once everything the service offers answers."""
        self.health.serving()

    def shutdown(self, grace_s: float) -> None:
        """NOT_SERVING, then drain the servicer (an aggregation or save in progress
        completes; new work is refused), then give calls in flight ``grace_s`` seconds
        and close the port. Returns when the server has stopped."""
        self.health.shutting_down()
        if self.servicer is not None:
            self.servicer.drain()
        self.server.stop(grace=grace_s).wait()


def start_server(
    coordinator: ChainCoordinator,
    config: ServiceConfig,
    address: str,
    *,
    tls: tuple[bytes, bytes] | None = None,
) -> tuple[grpc.Server, ChainFedServicer, int]:
    """``CoordinatorServer`` bound to ``address``, attached to ``coordinator`` and SERVING
    at once. Returns (server, servicer, bound port)."""
    server = CoordinatorServer(config, address, tls=tls)
    servicer = server.attach(coordinator)
    server.report_serving()
    return server.server, servicer, server.port
