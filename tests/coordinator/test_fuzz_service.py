"""Fuzzing the real coordinator service: garbage over a localhost gRPC socket.

One ``start_server`` with a real ``ChainCoordinator`` (agents a and b registered,
round r1 open) serves the whole module. Requests go through grpc's generic calls with
no serializer, so the bodies are exactly the bytes generated here: random bytes and
byte-mutated valid requests to every RPC, and malformed SubmitUpdate streams (gaps,
duplicates, wrong totals, shapes or names, a second header, undecodable parts).

After every call: a rejection carries a status other than INTERNAL / UNKNOWN and a
message (INVALID_ARGUMENT whenever the bytes are not the RPC's request message, or the
update stream is malformed), the server still answers Status, and the coordinator's
state (snapshot, open round, state.json) is what it was before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chainfed.coordinator.chain_state import ChainCoordinator
from chainfed.coordinator.config import CoordinatorConfig
from chainfed.coordinator.service import ChainFedServicer, ServiceConfig, start_server
from chainfed.coordinator.state_store import STATE_FILE
from chainfed.proto import chainfed_pb2 as pb
from chainfed.proto import chainfed_pb2_grpc as pb_grpc
from chainfed.proto import serde
from chainfed.proto.messages import (
    AgentCapabilities,
    Registration,
    TaskKind,
    TrainingParams,
    UpdateHeader,
    UpdateMetrics,
)
from chainfed.proto.tensor_chunks import manifest_of, tensors_to_chunks

FUZZ = settings(  # the "fuzz" profile of tests/conftest.py
    settings.get_profile("fuzz"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
CALL_TIMEOUT = 10
SERVICE = "/chainfed.v1.ChainFed/"
FINGERPRINT = "f" * 64
TOKEN = "shared"
"""A token valid for any agent id, so that garbage reaches the parsers."""

REQUESTS = {
    "Register": pb.RegisterRequest,
    "GetTask": pb.GetTaskRequest,
    "FetchTensors": pb.FetchTensorsRequest,
    "ReportProbe": pb.ProbeReport,
    "Status": pb.StatusRequest,
}
"""The unary-request RPCs and their request messages (SubmitUpdate is the stream)."""

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass(repr=False)
class Served:
    coordinator: ChainCoordinator
    servicer: ChainFedServicer
    channel: grpc.Channel
    state_dir: Path
    update: dict[str, torch.Tensor]
    """What agent b would honestly upload for round r1."""

    def state(self) -> tuple:
        """Everything a bad call must leave as it was.

        Agents' last-seen times are left out: any authenticated call naming a known
        agent refreshes them, and a mutated body may name agent a or b."""
        with self.servicer.lock:
            snapshot = serde.status_snapshot_to_proto(self.coordinator.snapshot())
            for agent in snapshot.agents:
                agent.ClearField("last_seen_unix_ms")
            r = self.coordinator.open_round
            open_round = (r.round_id, sorted(r.updates)) if r else None
            saved = json.loads((self.state_dir / STATE_FILE).read_text())
            for entry in saved["agents"].values():
                del entry["last_seen_ms"]
            return snapshot.SerializeToString(deterministic=True), open_round, saved

    def call(self, method: str, body: bytes) -> grpc.RpcError | None:
        call = self.channel.unary_unary(SERVICE + method)
        if method == "FetchTensors":
            call = self.channel.unary_stream(SERVICE + method)
        try:
            reply = call(body, metadata=serde.auth_metadata(TOKEN), timeout=CALL_TIMEOUT)
            if method == "FetchTensors":
                list(reply)
        except grpc.RpcError as error:
            return error
        return None

    def submit(self, parts: list[bytes]) -> grpc.RpcError | None:
        call = self.channel.stream_unary(SERVICE + "SubmitUpdate")
        try:
            call(iter(parts), metadata=serde.auth_metadata(TOKEN), timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            return error
        return None

    def assert_serving(self) -> None:
        reply = pb_grpc.ChainFedStub(self.channel).Status(
            pb.StatusRequest(), metadata=serde.auth_metadata(TOKEN), timeout=CALL_TIMEOUT
        )
        assert reply.round_id == "r1" and len(reply.agents) == 2


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    config = CoordinatorConfig(
        num_layers=4,
        model_fingerprint=FINGERPRINT,
        task="classify",
        params=TrainingParams(lora_rank=2),
        start_layer=0,
        window=2,
        min_agents=2,
        min_rounds=5,
        max_rounds=5,
        round_deadline_s=3600.0,
    )
    coordinator = ChainCoordinator(config)
    state_dir = tmp_path_factory.mktemp("fuzz-service") / "state"
    service = ServiceConfig(state_dir, {TOKEN: ""}, max_message_bytes=64 << 10, poll_seconds=0.05)
    server, servicer, port = start_server(coordinator, service, "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.ChainFedStub(channel)
    caps = AgentCapabilities("cpu", 0, 10, "0.1.0", FINGERPRINT)
    for agent in ("a", "b"):
        request = serde.registration_to_proto(Registration(agent, TOKEN, caps))
        stub.Register(request, metadata=serde.auth_metadata(TOKEN), timeout=CALL_TIMEOUT)
    task = serde.task_from_proto(
        stub.GetTask(
            pb.GetTaskRequest(agent_id="b"), metadata=serde.auth_metadata(TOKEN), timeout=10
        )
    )
    assert (task.kind, task.round_id) == (TaskKind.TRAIN_ROUND, "r1")
    g = torch.Generator().manual_seed(0)
    update = {
        "layers.0.q_proj.lora_a": torch.randn(2, 8, generator=g),
        "layers.0.q_proj.lora_b": torch.randn(8, 2, generator=g),
        "objective.head.bias": torch.randn(3, generator=g),
    }
    logging.getLogger("chainfed.coordinator").setLevel(logging.ERROR)  # one line per rejection
    yield Served(coordinator, servicer, channel, state_dir, update)
    channel.close()
    servicer.stop()
    server.stop(None)


def _decodes(message_type, body: bytes) -> bool:
    try:
        message_type.FromString(body)
    except DecodeError:
        return False
    return True


def _check_rejection(error: grpc.RpcError | None, *, invalid: bool) -> None:
    if error is None:
        assert not invalid, "a malformed request was accepted"
        return
    assert error.code() not in FORBIDDEN, (error.code(), error.details())
    assert error.details(), error.code()
    if invalid:
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())


def _valid_bodies(served: Served) -> dict[str, bytes]:
    """Well-formed requests the coordinator refuses (another model, unknown agent c)."""
    caps = AgentCapabilities("cpu", 0, 10, "0.1.0", "0" * 64)
    return {
        "Register": serde.registration_to_proto(Registration("c", TOKEN, caps)),
        "GetTask": pb.GetTaskRequest(agent_id="c", wait_ms=10),
        "FetchTensors": pb.FetchTensorsRequest(agent_id="c", round_id="r1"),
        "ReportProbe": pb.ProbeReport(agent_id="c", round_id="r1", cka_scores=[0.5] * 4),
        "Status": pb.StatusRequest(history_limit=2),
    }


@FUZZ
@given(method=st.sampled_from(sorted(REQUESTS)), data=st.data())
@example(method="Register", data=None)
def test_random_and_mutated_request_bodies_are_rejected_cleanly(
    served, byte_mutations, method, data
):
    before = served.state()
    if data is None:  # pinned: a length prefix running past the end of the body
        body = b"\x1a\xff\xff\xff\x0f"
    elif data.draw(st.booleans()):
        body = data.draw(st.binary(max_size=200))
    else:
        seed = _valid_bodies(served)[method].SerializeToString()
        body = data.draw(byte_mutations(seed, max_edits=3, max_insert=8, max_delete=6))
    error = served.call(method, body)
    _check_rejection(error, invalid=not _decodes(REQUESTS[method], body))
    served.assert_serving()
    assert served.state() == before


FATAL = (
    "drop",
    "duplicate",
    "total",
    "dtype",
    "shape",
    "name",
    "offset",
    "empty",
    "second_header",
    "garbage",
    "chunk_first",
)
"""Stream mutations each of which makes any upload with this manifest invalid."""


def _header(served: Served) -> UpdateHeader:
    metrics = UpdateMetrics(10, 5, 3, 0.5, 0.4, 0.5, 0, 0.1)
    return UpdateHeader("b", "r1", metrics, tuple(manifest_of(served.update)))


def _wire(part) -> bytes:
    return serde.update_part_to_proto(part).SerializeToString()


@st.composite
def malformed_streams(draw, served: Served) -> tuple[list[bytes], list[str]]:
    """b's upload for r1 with 1-3 FATAL mutations; returns the parts and the mutations."""
    header = _header(served)
    chunks = list(draw(st.permutations(list(tensors_to_chunks(served.update, 16)))))
    first: list[bytes] = []
    inserted: list[bytes] = []
    applied = draw(st.lists(st.sampled_from(FATAL), min_size=1, max_size=3))
    for how in applied:
        k = draw(st.integers(0, len(chunks) - 1))
        c = chunks[k]
        if how == "drop" and any(x != c for x in chunks):  # every copy: a gap for sure
            chunks = [x for x in chunks if x != c]
        elif how in ("drop", "duplicate"):
            chunks.insert(draw(st.integers(0, len(chunks))), c)
        elif how == "total":
            total = draw(st.integers(0, 2**64 - 1).filter(lambda t, c=c: t != c.total_bytes))
            chunks[k] = replace(c, total_bytes=total)
        elif how == "dtype":
            chunks[k] = replace(c, dtype=draw(st.sampled_from(["float16", "int64", "uint8"])))
        elif how == "shape":
            chunks[k] = replace(c, shape=(*c.shape, draw(st.integers(2, 2**40))))
        elif how == "name":
            chunks[k] = replace(c, name=draw(st.sampled_from(["x", "layers.9.q_proj.lora_a"])))
        elif how == "offset":
            chunks[k] = replace(c, offset=draw(st.integers(c.total_bytes, 2**64 - 1)))
        elif how == "empty":
            chunks[k] = replace(c, data=b"")
        elif how == "second_header":
            inserted.append(_wire(header))
        elif how == "garbage":  # bytes that are not an UpdatePart at all
            inserted.append(b"\x12\xff\xff\xff\x0f\x01")
        elif how == "chunk_first":
            first.append(_wire(c))
    parts = [_wire(c) for c in chunks]
    for extra in inserted:
        parts.insert(draw(st.integers(0, len(parts))), extra)
    return [*first, _wire(header), *parts], applied


@FUZZ
@given(data=st.data())
def test_malformed_update_streams_are_invalid_argument(served, data):
    before = served.state()
    parts, applied = data.draw(malformed_streams(served))
    error = served.submit(parts)
    assert error is not None, f"accepted an upload with {applied}"
    _check_rejection(error, invalid=True)
    served.assert_serving()
    assert served.state() == before


@FUZZ
@given(parts=st.lists(st.binary(max_size=120), max_size=6))
@example(parts=[])
def test_random_byte_update_streams_are_rejected_cleanly(served, parts):
    before = served.state()
    error = served.submit(parts)
    _check_rejection(error, invalid=not all(_decodes(pb.UpdatePart, p) for p in parts))
    served.assert_serving()
    assert served.state() == before


@pytest.mark.parametrize("method", [*sorted(REQUESTS), "SubmitUpdate"])
def test_undecodable_bodies_without_a_token_are_unauthenticated(served, method):
    """The token is checked before the body is decoded, as for well-formed bodies."""
    body = b"\x1a\xff\xff\xff\x0f"
    if method == "SubmitUpdate":
        call = served.channel.stream_unary(SERVICE + method)
        request = iter([body])
    else:
        call = served.channel.unary_unary(SERVICE + method)
        if method == "FetchTensors":
            call = served.channel.unary_stream(SERVICE + method)
        request = body
    with pytest.raises(grpc.RpcError) as info:
        reply = call(request, metadata=serde.auth_metadata("wrong"), timeout=CALL_TIMEOUT)
        if method == "FetchTensors":
            list(reply)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_the_honest_upload_is_accepted_last(served):
    """The fuzzed streams were rejected for what they broke: the intact one is counted."""
    parts = [_header(served), *tensors_to_chunks(served.update, 16)]
    error = served.submit([_wire(p) for p in parts])
    assert error is None
    assert served.state()[1] == ("r1", ["b"])
