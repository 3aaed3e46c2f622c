"""The coordinator service over a real localhost gRPC socket, driven by raw stub calls.

Every test starts ``start_server`` on port 0 in-process and talks to it through
``ChainFedStub`` with the serde helpers, exactly the bytes an agent would send. The
rejection tests check the status code a bad call gets *and* that the round it tried to
poison aggregates to exactly the mean of the good updates.
"""

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from chainfed.coordinator import service as service_module
from chainfed.coordinator import state_store
from chainfed.coordinator.aggregation import WeightedUpdate, aggregate_fedavg
from chainfed.coordinator.chain_state import ChainCoordinator
from chainfed.coordinator.service import ChainFedServicer, ServiceConfig, fit_status, start_server
from chainfed.proto import chainfed_pb2 as pb
from chainfed.proto import chainfed_pb2_grpc as pb_grpc
from chainfed.proto import serde
from chainfed.proto.messages import (
    ChainPhase,
    Registration,
    Task,
    TaskKind,
    UpdateHeader,
    UpdateMetrics,
)
from chainfed.proto.tensor_chunks import (
    ChunkAssembler,
    TensorChunk,
    chunk_data_budget,
    manifest_of,
    tensors_to_chunks,
)

TOKENS = {"tok-a": "a", "tok-b": "b", "shared": ""}
"""Per-agent tokens for a and b, and one shared token valid for any agent id."""

KIB = 1024
CALL_TIMEOUT = 10


# -- client side --------------------------------------------------------------------


def meta(token: str | None) -> tuple:
    return () if token is None else serde.auth_metadata(token)


def register(stub, token: str | None, agent: str, caps) -> str:
    request = serde.registration_to_proto(Registration(agent, token or "", caps))
    reply = stub.Register(request, metadata=meta(token), timeout=CALL_TIMEOUT)
    return serde.register_ack_from_proto(reply).agent_id


def get_task(stub, token: str, agent: str, wait_ms: int = 0) -> Task:
    request = pb.GetTaskRequest(agent_id=agent, wait_ms=wait_ms)
    return serde.task_from_proto(
        stub.GetTask(request, metadata=meta(token), timeout=CALL_TIMEOUT + wait_ms / 1000)
    )


def fetch(stub, token: str, agent: str, task: Task) -> tuple[dict, list[pb.TensorChunk]]:
    """The task's tensors, and the raw messages they came in."""
    request = pb.FetchTensorsRequest(agent_id=agent, round_id=task.round_id)
    messages = list(stub.FetchTensors(request, metadata=meta(token), timeout=CALL_TIMEOUT))
    assembler = ChunkAssembler(task.tensors)
    for message in messages:
        assembler.add(serde.tensor_chunk_from_proto(message))
    return assembler.finish(), messages


def update_parts(
    agent: str, round_id: str, metrics: UpdateMetrics, tensors: dict, chunk_bytes: int = 40
) -> list[pb.UpdatePart]:
    """A SubmitUpdate stream: header, then every tensor cut into ``chunk_bytes`` chunks."""
    header = UpdateHeader(agent, round_id, metrics, tuple(manifest_of(tensors)))
    chunks = tensors_to_chunks(tensors, chunk_bytes)
    return [serde.update_part_to_proto(p) for p in (header, *chunks)]


def submit(stub, token, agent, round_id, metrics, tensors, chunk_bytes=40):
    parts = update_parts(agent, round_id, metrics, tensors, chunk_bytes)
    return stub.SubmitUpdate(iter(parts), metadata=meta(token), timeout=CALL_TIMEOUT)


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


# -- server side --------------------------------------------------------------------


@dataclass
class Running:
    coordinator: ChainCoordinator
    servicer: ChainFedServicer
    port: int
    stub: pb_grpc.ChainFedStub

    def window_state(self) -> dict:
        with self.servicer.lock:
            return dict(self.coordinator.window_state)

    def open_updates(self) -> list[str]:
        with self.servicer.lock:
            r = self.coordinator.open_round
            return sorted(r.updates) if r else []


@pytest.fixture
def serve(tmp_path) -> Iterator:
    """``serve(coordinator, tls=None, **ServiceConfig fields)`` -> Running; stopped after."""
    servers, channels = [], []

    def start(coordinator, *, tls=None, **service) -> Running:
        config = ServiceConfig(tmp_path / f"state{len(servers)}", dict(TOKENS), **service)
        server, servicer, port = start_server(coordinator, config, "127.0.0.1:0", tls=tls)
        servers.append((server, servicer))
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return Running(coordinator, servicer, port, pb_grpc.ChainFedStub(channel))

    start.channels = channels
    yield start
    for channel in channels:
        channel.close()
    for server, servicer in servers:
        servicer.stop()
        server.stop(None)


def fedavg(*updates: tuple[str, UpdateMetrics, dict]) -> dict:
    return aggregate_fedavg([WeightedUpdate(t, m.train_samples, a) for a, m, t in updates])


def assert_tensors_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def two_agents_round_two(kit, serve, **service):
    """a and b registered with their own tokens, round 1 aggregated, round 2 open.

    Returns the running server, round 2's task and the updates a and b will send."""
    run = serve(kit.coordinator(min_agents=2, min_rounds=5, max_rounds=5), **service)
    for agent in ("a", "b"):
        assert register(run.stub, f"tok-{agent}", agent, kit.caps()) == agent
    for seed, agent in enumerate(("a", "b")):
        task = get_task(run.stub, f"tok-{agent}", agent)
        assert (task.kind, task.round_id, task.tensors) == (TaskKind.TRAIN_ROUND, "r1", ())
        m = kit.metrics(train_samples=10 + 20 * seed)
        submit(run.stub, f"tok-{agent}", agent, "r1", m, kit.update(task.window_layers, 0, seed))
    task = get_task(run.stub, "tok-a", "a")
    assert task.kind is TaskKind.TRAIN_ROUND and task.round_id != "r1"
    fetched, _ = fetch(run.stub, "tok-a", "a", task)
    assert_tensors_equal(
        {k.removeprefix("window."): v for k, v in fetched.items()}, run.window_state()
    )
    good = {
        agent: (agent, kit.metrics(train_samples=n), kit.update(task.window_layers, 0, 10 + n))
        for agent, n in (("a", 30), ("b", 10))
    }
    return run, task, good


# -- rejections never poison the round -----------------------------------------------


def poison(tensors: dict) -> dict:
    """Same names and shapes, values far from any honest update."""
    return {k: v * 1000 + 7 for k, v in tensors.items()}


def with_value(tensors: dict, value: float) -> dict:
    bad = {k: v.clone() for k, v in tensors.items()}
    bad["layers.0.q_proj.lora_b"][2, 1] = value
    return bad


OVERSIZE_CHUNK = serde.update_part_to_proto(
    TensorChunk("objective.head.bias", "float32", (25_600,), 0, 102_400, bytes(102_400))
)
"""One ~100 KiB message, past the 64 KiB limit the rejection tests start the server with."""


def oversize_parts(agent, round_id, metrics, tensors):
    """The header, then a chunk message too large for the limit, then the real chunks."""
    header, *chunks = update_parts(agent, round_id, metrics, tensors)
    return [header, OVERSIZE_CHUNK, *chunks]


BAD_UPDATES = {
    # id: (token, agent, round id or None = current, tensors(good) -> bad, status)
    "no token": (None, "b", None, poison, "UNAUTHENTICATED"),
    "wrong token": ("nope", "b", None, poison, "UNAUTHENTICATED"),
    "token of another agent": ("tok-a", "b", None, poison, "UNAUTHENTICATED"),
    "stale round": ("tok-b", "b", "r1", poison, "FAILED_PRECONDITION"),
    "unknown round": ("tok-b", "b", "r77", poison, "FAILED_PRECONDITION"),
    "unregistered agent": ("shared", "ghost", None, poison, "NOT_FOUND"),
    "renamed tensor": (
        "tok-b",
        "b",
        None,
        lambda t: {k.replace("v_proj", "k_proj"): v for k, v in t.items()},
        "INVALID_ARGUMENT",
    ),
    "layer outside the window": (
        "tok-b",
        "b",
        None,
        lambda t: {**t, "layers.3.q_proj.lora_a": torch.zeros(2, 8)},
        "INVALID_ARGUMENT",
    ),
    "wrong shape": (
        "tok-b",
        "b",
        None,
        lambda t: {**t, "objective.head.weight": torch.zeros(4, 8)},
        "INVALID_ARGUMENT",
    ),
    "wrong dtype": (
        "tok-b",
        "b",
        None,
        lambda t: {**t, "objective.head.bias": t["objective.head.bias"].double()},
        "INVALID_ARGUMENT",
    ),
    "nan": ("tok-b", "b", None, lambda t: with_value(t, float("nan")), "INVALID_ARGUMENT"),
    "inf": ("tok-b", "b", None, lambda t: with_value(t, float("inf")), "INVALID_ARGUMENT"),
    "oversize message": ("tok-b", "b", None, "oversize", "RESOURCE_EXHAUSTED"),
}


@pytest.mark.parametrize(
    ("token", "agent", "round_id", "corrupt", "status"),
    list(BAD_UPDATES.values()),
    ids=list(BAD_UPDATES),
)
def test_rejected_update_gets_its_status_and_never_touches_the_aggregate(
    kit, serve, token, agent, round_id, corrupt, status
):
    run, task, good = two_agents_round_two(kit, serve, max_message_bytes=64 * KIB)
    _, metrics, tensors = good["b"]

    def send_bad() -> grpc.RpcError:
        rid = round_id or task.round_id
        if corrupt == "oversize":
            parts = oversize_parts(agent, rid, metrics, poison(tensors))
        else:
            parts = update_parts(agent, rid, metrics, corrupt(tensors))
        return rpc_error(run.stub.SubmitUpdate, iter(parts), metadata=meta(token), timeout=10)

    before_any = send_bad()  # before the first good update of the round ...
    submit(run.stub, "tok-a", "a", task.round_id, *good["a"][1:])
    between = send_bad()  # ... and between the two good ones
    assert run.open_updates() == ["a"]
    submit(run.stub, "tok-b", "b", task.round_id, metrics, tensors)

    for error in (before_any, between):
        assert error.code().name == status, error.details()
    assert run.coordinator.history[-1].participants == ("a", "b")
    assert_tensors_equal(run.window_state(), fedavg(good["a"], good["b"]))


def test_update_whose_call_failed_as_oversize_is_not_recorded(kit, serve, monkeypatch):
    """Whether grpc shows the handler the failure or a clean end of stream is a race
    (about 1 call in 5 ends 'clean'), so batches of concurrent calls are sent until one
    is recorded or five batches are clean; the traced handler says when the server is
    done with each call."""
    finished = threading.Semaphore(0)
    real = ChainFedServicer.SubmitUpdate

    def traced(self, request_iterator, context):
        try:
            return real(self, request_iterator, context)
        finally:
            finished.release()

    monkeypatch.setattr(ChainFedServicer, "SubmitUpdate", traced)
    run, task, good = two_agents_round_two(kit, serve, max_message_bytes=64 * KIB)
    _, metrics, tensors = good["b"]
    parts = update_parts("b", task.round_id, metrics, poison(tensors), chunk_bytes=KIB)
    parts.append(OVERSIZE_CHUNK)  # after a complete, valid update

    def call(_) -> grpc.StatusCode:
        return rpc_error(
            run.stub.SubmitUpdate, iter(parts), metadata=meta("tok-b"), timeout=CALL_TIMEOUT
        ).code()

    with ThreadPoolExecutor(12) as pool:
        for _ in range(5):
            codes = list(pool.map(call, range(12)))
            assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            for _ in codes:
                assert finished.acquire(timeout=CALL_TIMEOUT)
            assert run.open_updates() == []  # every client saw a failure: nothing may count

    for agent in ("a", "b"):
        submit(run.stub, f"tok-{agent}", agent, task.round_id, *good[agent][1:])
    assert_tensors_equal(run.window_state(), fedavg(good["a"], good["b"]))


def test_rejection_messages_name_the_problem(kit, serve):
    run, task, good = two_agents_round_two(kit, serve)
    _, metrics, tensors = good["b"]
    cases = [
        ("r1", tensors, "r1"),
        (task.round_id, with_value(tensors, float("nan")), "layers.0.q_proj.lora_b"),
        (task.round_id, {**tensors, "objective.head.weight": torch.zeros(4, 8)}, "[4, 8]"),
    ]
    for round_id, bad, needle in cases:
        error = rpc_error(submit, run.stub, "tok-b", "b", round_id, metrics, bad)
        assert needle in error.details()
    error = rpc_error(submit, run.stub, "tok-a", "b", task.round_id, metrics, tensors)
    assert "agent b" in error.details()


def test_malformed_update_streams_are_invalid_argument(kit, serve):
    run, task, good = two_agents_round_two(kit, serve)
    _, metrics, tensors = good["b"]
    parts = update_parts("b", task.round_id, metrics, tensors)
    streams = {
        "empty": [],
        "chunk first": parts[1:] + parts[:1],
        "two headers": parts[:1] + parts,
        "missing chunks": parts[:-1],
        "duplicate chunk": parts[:1] + [parts[1]] * 2,
    }
    for what, stream in streams.items():
        error = rpc_error(
            run.stub.SubmitUpdate, iter(stream), metadata=meta("tok-b"), timeout=CALL_TIMEOUT
        )
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (what, error.details())
    assert run.open_updates() == []


def test_register_refusals(kit, serve):
    run = serve(kit.coordinator(min_agents=2))
    caps = kit.caps()

    for token in (None, "nope"):
        error = rpc_error(register, run.stub, token, "a", caps)
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    error = rpc_error(register, run.stub, "tok-a", "b", caps)
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    error = rpc_error(register, run.stub, "tok-a", "a", kit.caps(fingerprint="0" * 64))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "different model" in error.details()
    assert run.coordinator.agents == {}

    assert register(run.stub, "tok-a", "", caps) == "a"  # a per-agent token names its agent
    assert register(run.stub, "shared", "", caps) == "agent-2"
    assert sorted(run.coordinator.agents) == ["a", "agent-2"]


def test_register_refuses_an_agent_that_numbers_other_classes(kit, serve):
    run = serve(kit.coordinator(min_agents=2))
    assert register(run.stub, "tok-a", "a", kit.caps(labels=("neg", "pos"))) == "a"

    error = rpc_error(register, run.stub, "tok-b", "b", kit.caps(labels=("pos", "neg")))

    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "numbers other classes (pos, neg) than the federation (neg, pos)" in error.details()
    assert sorted(run.coordinator.agents) == ["a"]
    assert register(run.stub, "tok-b", "b", kit.caps(labels=("neg", "pos"))) == "b"


def test_wrong_fingerprint_at_register_leaves_the_round_alone(kit, serve):
    run, task, good = two_agents_round_two(kit, serve)
    error = rpc_error(register, run.stub, "shared", "c", kit.caps(fingerprint="0" * 64))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    for agent in ("a", "b"):
        submit(run.stub, f"tok-{agent}", agent, task.round_id, *good[agent][1:])
    assert "c" not in run.coordinator.agents
    assert_tensors_equal(run.window_state(), fedavg(good["a"], good["b"]))


def test_unauthenticated_calls_fail_before_the_body_is_read(kit, serve):
    run = serve(kit.coordinator())
    calls = [
        lambda: run.stub.Register(pb.RegisterRequest(agent_id="a"), timeout=CALL_TIMEOUT),
        lambda: run.stub.ReportProbe(pb.ProbeReport(agent_id="a"), timeout=CALL_TIMEOUT),
    ]
    codes = [rpc_error(call).code() for call in calls]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 2


def test_every_rpc_needs_a_token(kit, serve):
    run = serve(kit.coordinator())
    register(run.stub, "tok-a", "a", kit.caps())
    calls = {
        "GetTask": lambda md: run.stub.GetTask(pb.GetTaskRequest(agent_id="a"), metadata=md),
        "FetchTensors": lambda md: list(
            run.stub.FetchTensors(pb.FetchTensorsRequest(agent_id="a", round_id="r1"), metadata=md)
        ),
        "Status": lambda md: run.stub.Status(pb.StatusRequest(), metadata=md),
    }
    for name, call in calls.items():
        for md in ((), meta("nope"), (("authorization", "tok-a"),)):  # last: no "Bearer "
            assert rpc_error(call, md).code() is grpc.StatusCode.UNAUTHENTICATED, (name, md)
    error = rpc_error(calls["GetTask"], meta("tok-b"))  # b's token for agent a
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED


# -- transfers ------------------------------------------------------------------------


def test_chunked_transfers_stay_under_the_message_limit(kit, serve):
    """Tensors several times larger than one 64 KiB message go up and come back intact."""
    limit = 64 * KIB
    run = serve(kit.coordinator(min_rounds=3, max_rounds=3), max_message_bytes=limit)
    register(run.stub, "tok-a", "a", kit.caps())
    task = get_task(run.stub, "tok-a", "a")
    g = torch.Generator().manual_seed(3)
    big = {
        "layers.0.q_proj.lora_a": torch.randn(8, 4096, generator=g),  # 128 KiB
        "layers.0.q_proj.lora_b": torch.randn(4096, 8, generator=g),
        "objective.head.weight": torch.randn(3, 4096, generator=g).half(),
        "objective.head.bias": torch.randn(3, generator=g).bfloat16(),
    }
    parts = update_parts("a", task.round_id, kit.metrics(), big, chunk_data_budget(limit))
    assert max(p.ByteSize() for p in parts) <= limit
    submit(run.stub, "tok-a", "a", task.round_id, kit.metrics(), big, chunk_data_budget(limit))

    task = get_task(run.stub, "tok-a", "a")
    fetched, messages = fetch(run.stub, "tok-a", "a", task)

    assert max(m.ByteSize() for m in messages) <= limit
    per_tensor = {name: sum(m.name == name for m in messages) for name in fetched}
    assert per_tensor["window.layers.0.q_proj.lora_a"] == 3  # 128 KiB in 60 KiB chunks
    assert_tensors_equal(fetched, {f"window.{k}": v for k, v in big.items()})


@pytest.mark.parametrize("how", ["client iterator raises", "client cancels", "stream ends early"])
def test_partial_upload_leaves_no_trace(kit, serve, how):
    run, task, good = two_agents_round_two(kit, serve)
    parts = update_parts("a", task.round_id, *good["a"][1:])
    assert len(parts) > 4
    pulled, release = threading.Event(), threading.Event()

    def stream():
        yield from parts[:3]
        if how == "client iterator raises":
            raise RuntimeError("agent crashed mid-upload")
        if how == "client cancels":
            pulled.set()
            release.wait(CALL_TIMEOUT)

    if how == "client cancels":
        call = run.stub.SubmitUpdate.future(stream(), metadata=meta("tok-a"))
        assert pulled.wait(CALL_TIMEOUT)
        time.sleep(0.2)  # let the server read what was sent
        call.cancel()
        release.set()
        with pytest.raises(grpc.FutureCancelledError):
            call.result()
    else:
        error = rpc_error(
            run.stub.SubmitUpdate, stream(), metadata=meta("tok-a"), timeout=CALL_TIMEOUT
        )
        assert error.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INVALID_ARGUMENT)

    assert run.open_updates() == []
    submit(run.stub, "tok-a", "a", task.round_id, *good["a"][1:])  # counted, not a duplicate
    submit(run.stub, "tok-b", "b", task.round_id, *good["b"][1:])
    assert_tensors_equal(run.window_state(), fedavg(good["a"], good["b"]))


def test_fetch_for_a_closed_round_is_stale(kit, serve):
    run, task, good = two_agents_round_two(kit, serve)
    stale = Task(TaskKind.TRAIN_ROUND, "r1", 0, (0,), params=task.params)
    error = rpc_error(fetch, run.stub, "tok-a", "a", stale)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION


def test_a_round_fetched_with_and_without_final_adapters_is_cut_once_each_way(
    kit, serve, monkeypatch
):
    # stage 2 of a window-2 chain: layer 0 is final. Agents entering the stage fetch it,
    # the others omit it; interleaved, each answer is still cut into messages only once
    cuts = []
    real_cut = service_module.tensors_to_chunks

    def counted_cut(tensors, budget):
        cuts.append(sorted(tensors))
        return real_cut(tensors, budget)

    monkeypatch.setattr(service_module, "tensors_to_chunks", counted_cut)
    run = serve(kit.coordinator())
    register(run.stub, "tok-a", "a", kit.caps())
    with run.servicer.lock:
        for stage in range(2):
            kit.train_round(run.coordinator, stage * 100, seed=stage)
        run.coordinator.tick(250)
        round_id = run.coordinator.open_round.round_id
        whole = run.coordinator.tensors_for(round_id)
        window_only = run.coordinator.tensors_for(round_id, omit_final=True)
    assert set(window_only) < set(whole)

    for _ in range(3):
        for omit_final, expected in ((False, whole), (True, window_only)):
            request = pb.FetchTensorsRequest(agent_id="a", round_id=round_id, omit_final=omit_final)
            messages = run.stub.FetchTensors(request, metadata=meta("tok-a"), timeout=CALL_TIMEOUT)
            assert {serde.tensor_chunk_from_proto(m).name for m in messages} == set(expected)

    assert cuts == [sorted(whole), sorted(window_only)]


# -- long-poll and status -------------------------------------------------------------


def timed(fn, *args, **kwargs):
    started = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - started


def test_get_task_long_poll_answers_wait_after_the_window(kit, serve):
    run = serve(kit.coordinator(min_agents=2), poll_seconds=1.0)
    register(run.stub, "tok-a", "a", kit.caps())

    task, now = timed(get_task, run.stub, "tok-a", "a", wait_ms=0)
    assert task.kind is TaskKind.WAIT and task.retry_after_ms > 0 and now < 0.5
    task, waited = timed(get_task, run.stub, "tok-a", "a", wait_ms=300)
    assert task.kind is TaskKind.WAIT and 0.28 <= waited < 0.9
    task, capped = timed(get_task, run.stub, "tok-a", "a", wait_ms=60_000)
    assert task.kind is TaskKind.WAIT and 0.95 <= capped < 3.0  # poll_seconds caps it
    error = rpc_error(get_task, run.stub, "shared", "ghost")
    assert error.code() is grpc.StatusCode.NOT_FOUND


def test_get_task_long_poll_does_not_overshoot_wait_ms(kit, serve):
    run = serve(kit.coordinator(min_agents=2), poll_seconds=10)
    register(run.stub, "tok-a", "a", kit.caps())
    task, waited = timed(get_task, run.stub, "tok-a", "a", wait_ms=50)
    assert task.kind is TaskKind.WAIT and waited < 0.2


def test_get_task_long_poll_wakes_when_work_appears(kit, serve):
    run = serve(kit.coordinator(min_agents=2), poll_seconds=30)
    register(run.stub, "tok-a", "a", kit.caps())
    answer = {}

    def poll():
        answer["task"], answer["seconds"] = timed(get_task, run.stub, "tok-a", "a", 20_000)

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.3)
    register(run.stub, "tok-b", "b", kit.caps())  # quorum: the chain starts
    poller.join(CALL_TIMEOUT)

    assert answer["task"].kind is TaskKind.TRAIN_ROUND
    assert 0.25 <= answer["seconds"] < 5.0


def test_get_task_past_the_long_poll_slots_asks_back_after_the_poll_window(kit, serve):
    run = serve(kit.coordinator(min_agents=3), max_workers=5)  # one long-poll slot
    assert run.servicer.config.long_poll_slots == 1
    for token, agent in (("tok-a", "a"), ("tok-b", "b")):
        register(run.stub, token, agent, kit.caps())
    holder = threading.Thread(target=get_task, args=(run.stub, "tok-a", "a", 3_000))
    holder.start()
    time.sleep(0.3)  # a holds the only slot

    task, answered = timed(get_task, run.stub, "tok-b", "b", wait_ms=2_000)
    holder.join(CALL_TIMEOUT)

    assert task.kind is TaskKind.WAIT and answered < 1.0  # no slot: answered at once,
    assert task.retry_after_ms == 2_000  # to come back when its poll would have ended


def test_registrations_arriving_together_share_saves_and_are_saved_when_acknowledged(kit, serve):
    run = serve(kit.coordinator(min_agents=100))
    saves_before = run.servicer.saves_completed
    agents = [f"agent-{k:02d}" for k in range(24)]
    saved_at_ack = {}

    def join(agent: str) -> None:
        register(run.stub, "shared", agent, kit.caps())
        on_disk = state_store.load(run.servicer.config.state_dir, kit.config(min_agents=100))
        saved_at_ack[agent] = agent in on_disk.agents

    threads = [threading.Thread(target=join, args=(agent,)) for agent in agents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CALL_TIMEOUT)

    assert saved_at_ack == dict.fromkeys(agents, True)
    assert run.servicer.saves_completed - saves_before < len(agents) // 2
    state = json.loads((run.servicer.config.state_dir / "state.json").read_text())
    assert not set(agents) & set(state["agents"])  # in the journal: state.json not rewritten


def test_status_snapshot_with_history_limit(kit, serve):
    run = serve(kit.coordinator(min_rounds=5, max_rounds=5))
    register(run.stub, "tok-a", "a", kit.caps())
    ids = []
    for n in range(3):
        task = get_task(run.stub, "tok-a", "a")
        tensors = kit.update(task.window_layers, task.stage_layer, n)
        submit(run.stub, "tok-a", "a", task.round_id, kit.metrics(1.0 - n / 10), tensors)
        ids.append(task.round_id)
    assert get_task(run.stub, "tok-a", "a").round_id not in ids  # round 4 open: stable state

    full = serde.status_snapshot_from_proto(
        run.stub.Status(pb.StatusRequest(), metadata=meta("shared"), timeout=CALL_TIMEOUT)
    )
    last2 = serde.status_snapshot_from_proto(
        run.stub.Status(
            pb.StatusRequest(history_limit=2), metadata=meta("tok-a"), timeout=CALL_TIMEOUT
        )
    )

    with run.servicer.lock:
        expected = run.coordinator.snapshot()
    assert full == expected
    assert [r.round_id for r in full.history] == ids
    assert full.phase is ChainPhase.TRAINING and full.total_rounds == 3
    assert [a.agent_id for a in full.agents] == ["a"] and full.agents[0].rounds_completed == 3
    assert [r.round_id for r in last2.history] == ids[1:] and last2.total_rounds == 3
    assert last2.history[-1].metrics.val_loss == pytest.approx(0.8)
    assert (full.history_omitted, last2.history_omitted) == (0, 1)


@pytest.mark.parametrize("agents", [1, 40, 1000])
def test_fit_status_keeps_the_newest_records_that_fit(agents):
    # records of growing size (more participants each round, as agents join): for every
    # limit, the trimmed reply fits and keeps at most one record fewer than could fit
    history = [
        pb.RoundRecord(
            round_id=f"r{n}",
            participants=[f"agent-{k}" for k in range(n * agents // 30 + 1)],
            update_digests=["0" * 64] * (n * agents // 30 + 1),
        )
        for n in range(30)
    ]
    whole = pb.StatusSnapshot(num_layers=6, history=history)
    for limit in range(whole.ByteSize() - 100 * agents, whole.ByteSize() + 10, 7 * agents):
        reply = pb.StatusSnapshot()
        reply.CopyFrom(whole)

        kept = list(fit_status(reply, limit).history)

        assert reply.ByteSize() <= limit
        assert kept == history[len(history) - len(kept) :]
        assert reply.history_omitted == len(history) - len(kept)
        best = max(
            n
            for n in range(len(history) + 1)
            if pb.StatusSnapshot(
                num_layers=6, history=history[len(history) - n :], history_omitted=30 - n
            ).ByteSize()
            <= limit
        )
        assert best - 1 <= len(kept) <= best


def test_status_leaves_out_the_oldest_rounds_to_fit_the_message_limit(kit, serve):
    # three rounds recorded; a second server on the same coordinator whose message limit
    # is one byte short of the whole reply must send the newest rounds that fit
    coordinator = kit.coordinator(min_rounds=5, max_rounds=5)
    run = serve(coordinator)
    register(run.stub, "tok-a", "a", kit.caps())
    for n in range(3):
        task = get_task(run.stub, "tok-a", "a")
        tensors = kit.update(task.window_layers, task.stage_layer, n)
        submit(run.stub, "tok-a", "a", task.round_id, kit.metrics(1.0 - n / 10), tensors)
    whole = run.stub.Status(pb.StatusRequest(), metadata=meta("shared"), timeout=CALL_TIMEOUT)
    ids = [r.round_id for r in whole.history]
    limit = whole.ByteSize() - 1
    tight = serve(coordinator, max_message_bytes=limit)

    reply = tight.stub.Status(pb.StatusRequest(), metadata=meta("shared"), timeout=CALL_TIMEOUT)

    assert reply.ByteSize() <= limit
    kept = [r.round_id for r in reply.history]
    assert 1 <= len(kept) < len(ids) and kept == ids[-len(kept) :]
    assert reply.history_omitted == len(ids) - len(kept)
    assert serde.status_snapshot_from_proto(reply).total_rounds == 3


# -- TLS ------------------------------------------------------------------------------


def self_signed(directory: Path, name: str) -> tuple[bytes, bytes]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert.read_bytes(), key.read_bytes()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, tuple[bytes, bytes]]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    return {name: self_signed(directory, name) for name in ("server", "stranger")}


def test_tls_round_and_plaintext_refused(kit, serve, certificates):
    cert, key = certificates["server"]
    run = serve(kit.coordinator(), tls=(cert, key))
    channel = grpc.secure_channel(
        f"localhost:{run.port}", grpc.ssl_channel_credentials(root_certificates=cert)
    )
    serve.channels.append(channel)
    stub = pb_grpc.ChainFedStub(channel)

    assert register(stub, "tok-a", "a", kit.caps()) == "a"
    task = get_task(stub, "tok-a", "a")
    assert task.kind is TaskKind.TRAIN_ROUND
    tensors = kit.update(task.window_layers, task.stage_layer, 0)
    reply = submit(stub, "tok-a", "a", task.round_id, kit.metrics(), tensors)
    assert (reply.round_id, reply.tensors) == (task.round_id, len(tensors))
    assert [r.round_id for r in run.coordinator.history] == [task.round_id]
    assert_tensors_equal(run.window_state(), tensors)
    task = get_task(stub, "tok-a", "a")
    fetched, _ = fetch(stub, "tok-a", "a", task)
    assert_tensors_equal({k.removeprefix("window."): v for k, v in fetched.items()}, tensors)

    plaintext = rpc_error(register, run.stub, "tok-b", "b", kit.caps())  # run.stub: insecure
    assert plaintext.code() is grpc.StatusCode.UNAVAILABLE
    untrusting = grpc.secure_channel(
        f"localhost:{run.port}",
        grpc.ssl_channel_credentials(root_certificates=certificates["stranger"][0]),
    )
    serve.channels.append(untrusting)
    error = rpc_error(register, pb_grpc.ChainFedStub(untrusting), "tok-b", "b", kit.caps())
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert sorted(run.coordinator.agents) == ["a"]
