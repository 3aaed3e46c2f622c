"""Head-only rounds after the chain, and a total round budget spread over the stages.

Pure state machine, as ``test_chain_state.py``: explicit clocks and hand-made updates of
the fake 4-layer model (``conftest.ChainKit``); persistence through ``state_store``.
"""

from __future__ import annotations

import logging

import pytest
import torch

from chainfed.coordinator import state_store
from chainfed.coordinator.aggregation import WeightedUpdate, aggregate_fedavg
from chainfed.coordinator.chain_state import ChainCoordinator, stage_round_cap
from chainfed.coordinator.update_checks import UpdateRejectedError
from chainfed.proto.adapter_file import load_adapter_file
from chainfed.proto.messages import ChainPhase, ProbeReport, TaskKind, TrainingParams

HEAD = ("objective.head.weight", "objective.head.bias")


def fedavg(sent: dict) -> dict:
    return aggregate_fedavg([WeightedUpdate(t, m.train_samples, a) for a, (m, t) in sent.items()])


def layer_rounds(c: ChainCoordinator) -> list[tuple[int, tuple[int, ...]]]:
    """(stage layer, window) of every training round in the history."""
    return [(r.stage_layer, r.window_layers) for r in c.history if r.round_id.startswith("r")]


def evaluate(kit, c: ChainCoordinator, agents: list[str], now: int) -> None:
    c.tick(now)
    for agent in agents:
        task = c.next_task(agent, now)
        assert task.kind is TaskKind.EVALUATE
        assert c.submit(agent, task.round_id, kit.eval_metrics(), {}, now + 1)
    assert c.phase is ChainPhase.DONE


# -- head rounds ------------------------------------------------------------------------


def test_head_rounds_train_the_head_alone_after_the_last_stage(kit):
    c = kit.coordinator(min_agents=2, head_rounds=2)
    kit.register(c, "a", "b")
    for stage in range(kit.num_layers):
        kit.train_round(c, stage * 100, seed=stage)
    chain_final = {k: v.clone() for k, v in c.final.items()}
    assert c.phase is ChainPhase.TRAINING and c.head_stage
    assert set(c.window_state) == set(HEAD)  # adapters final, the head still trains
    assert {n.split(".")[1] for n in chain_final} == {"0", "1", "2", "3"}

    c.tick(1000)
    task = c.next_task("a", 1000)
    assert task.kind is TaskKind.TRAIN_ROUND and task.window_layers == ()
    assert task.stage_layer == kit.num_layers - 1
    assert c.snapshot(1000).window_layers == ()
    fetched = c.tensors_for(task.round_id)
    assert {n for n in fetched if n.startswith("window.")} == {f"window.{n}" for n in HEAD}

    sent = kit.train_round(c, 1000, seed=10)
    assert all(set(t) == set(HEAD) for _m, t in sent.values())
    assert c.head_stage and c.convergence.rounds == 1
    second = kit.train_round(c, 1100, seed=11)
    assert c.phase is ChainPhase.EVALUATING and not c.head_stage

    want_head = fedavg(second)
    for name in HEAD:
        assert torch.equal(c.final[name.removeprefix("objective.")], want_head[name])
    for name, tensor in chain_final.items():
        if name.startswith("layers."):
            assert torch.equal(c.final[name], tensor), name  # head rounds touch no adapter
    assert layer_rounds(c)[-2:] == [(3, ()), (3, ())]
    evaluate(kit, c, ["a", "b"], 1200)


def test_a_head_round_refuses_adapters_and_a_missing_head(kit):
    c = kit.coordinator(min_agents=1, head_rounds=1)
    kit.register(c, "a")
    for stage in range(kit.num_layers):
        kit.train_round(c, stage * 100, seed=stage)
    c.tick(1000)
    task = c.next_task("a", 1000)
    with_adapter = kit.update([3], 3, seed=5)
    with pytest.raises(UpdateRejectedError) as info:
        c.submit("a", task.round_id, kit.metrics(), with_adapter, 1001)
    assert info.value.code == "invalid_argument" and "layers.3" in str(info.value)
    head_weight_only = {HEAD[0]: kit.update([], 3, seed=5)[HEAD[0]]}
    with pytest.raises(UpdateRejectedError) as info:
        c.submit("a", task.round_id, kit.metrics(), head_weight_only, 1001)
    assert info.value.reason == "wrong_shape"
    assert c.submit("a", task.round_id, kit.metrics(), kit.update([], 3, seed=5), 1002)


def test_head_rounds_take_their_own_step_count_and_chain_rounds_keep_theirs(kit):
    params = TrainingParams(lora_rank=2, local_steps=7, local_epochs=1.0)
    c = kit.coordinator(min_agents=1, head_rounds=1, head_local_steps=300, params=params)
    kit.register(c, "a")
    c.tick(0)
    assert c.next_task("a", 0).params == params
    for stage in range(kit.num_layers):
        kit.train_round(c, stage * 100, seed=stage)
    c.tick(1000)
    head = c.next_task("a", 1000)
    assert head.window_layers == () and head.params.local_steps == 300
    assert head.params.local_epochs == 0.0 and head.params.lr == params.lr
    assert c.snapshot(1000).params == params  # what status shows: the run's settings
    with pytest.raises(ValueError, match="head local steps must be >= 1"):
        kit.config(head_local_steps=0)


def test_without_head_rounds_the_chain_evaluates_right_after_the_last_stage(kit):
    c = kit.coordinator(min_agents=1)
    kit.register(c, "a")
    for stage in range(kit.num_layers):
        kit.train_round(c, stage * 100, seed=stage)
    assert c.phase is ChainPhase.EVALUATING and not c.head_stage
    assert {"head.weight", "head.bias"} <= set(c.final)


def test_a_restart_mid_head_stage_neither_loses_nor_repeats_a_round(kit, tmp_path):
    """Saved after head round 1 with head round 2 in flight: the resumed coordinator runs
    exactly one more head round, under a new id, and ends with the same result as a run
    never interrupted."""

    def run(interrupt: bool) -> ChainCoordinator:
        c = kit.coordinator(min_agents=2, head_rounds=2)
        kit.register(c, "a", "b")
        for stage in range(kit.num_layers):
            kit.train_round(c, stage * 100, seed=stage)
        kit.train_round(c, 1000, seed=10)
        if interrupt:
            c.tick(1100)
            lost = c.open_round.round_id
            task = c.next_task("a", 1100)
            assert c.submit("a", task.round_id, kit.metrics(), kit.update([], 3, 99), 1101)
            state_store.save(c, tmp_path)  # the round in flight is not in the state
            c = state_store.load(tmp_path, c.config)
            assert c.head_stage and c.convergence.rounds == 1 and c.open_round is None
            c.tick(1200)
            assert c.open_round.round_id != lost
        kit.train_round(c, 1200, seed=11)
        assert c.phase is ChainPhase.EVALUATING
        return c

    whole, resumed = run(False), run(True)
    assert layer_rounds(resumed) == layer_rounds(whole)
    ids = [r.round_id for r in resumed.history]
    assert len(set(ids)) == len(ids)
    assert sorted(resumed.final) == sorted(whole.final)
    for name, tensor in whole.final.items():
        assert torch.equal(resumed.final[name], tensor), name
    evaluate(kit, resumed, ["a", "b"], 2000)
    state_store.save(resumed, tmp_path)
    written = load_adapter_file(tmp_path / state_store.FINAL_FILE).tensors
    assert torch.equal(written["head.weight"], whole.final["head.weight"])


def test_a_state_saved_before_head_stages_existed_loads(kit, tmp_path):
    c = kit.coordinator(min_agents=1)
    kit.register(c, "a")
    kit.train_round(c, 0)
    state_store.save(c, tmp_path)
    path = tmp_path / state_store.STATE_FILE
    text = path.read_text()
    assert '"head_stage": false' in text
    path.write_text(text.replace(', "head_stage": false', ""))
    assert state_store.load(tmp_path, c.config).head_stage is False
    path.write_text(text.replace('"head_stage": false', '"head_stage": 1'))
    with pytest.raises(state_store.StateDirError, match="head_stage"):
        state_store.load(tmp_path, c.config)


# -- the round budget -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "stages", "head", "lo", "hi", "cap"),
    [
        (12, 4, 0, 1, 12, 3),  # an equal share
        (14, 4, 2, 1, 14, 3),  # the head's reserve comes off first
        (11, 3, 0, 1, 11, 3),  # rounded down: what is left over flows on
        (6, 1, 2, 1, 6, 4),  # the last stage: everything but the head's reserve
        (3, 4, 2, 1, 3, 1),  # never below the minimum guard
        (40, 2, 0, 1, 5, 5),  # nor above the maximum guard
    ],
)
def test_stage_round_cap(left, stages, head, lo, hi, cap):
    assert stage_round_cap(left, stages, head_rounds=head, min_rounds=lo, max_rounds=hi) == cap


def test_a_budget_flows_from_a_stage_that_plateaus_to_the_stages_above_and_the_head(kit):
    """R = 16 over 4 stages and 2 head rounds. Stage 0's loss is flat: it plateaus at its
    second round (of a share of 3). Later losses keep falling, so each stage runs its
    share of what is left: 12 // 3 = 4, 8 // 2 = 4, then all 4 but the head's 2."""
    c = kit.coordinator(min_agents=1, round_budget=16, head_rounds=2, max_rounds=16)
    kit.register(c, "a")
    now, loss = 0, 1.0
    while c.phase is ChainPhase.TRAINING:
        if c.stage_layer != 0 or c.head_stage:
            loss *= 0.9
        kit.train_round(c, now, losses={"a": loss})
        now += 100
    per_stage = [s for s, _w in layer_rounds(c)]
    assert [per_stage.count(layer) for layer in range(3)] == [2, 4, 4]
    windows = [w for _s, w in layer_rounds(c)]
    assert windows.count(()) == 2 and len(windows) == 16
    assert c.trained_rounds() == 16 and c.phase is ChainPhase.EVALUATING


def test_rounds_a_plateaued_last_stage_leaves_go_to_the_head(kit):
    """Every loss flat: each stage stops at its second round, and the head, reserved 1,
    takes the 16 - 8 = 8 rounds left unless it plateaus too — it does, after 2."""
    c = kit.coordinator(min_agents=1, round_budget=16, head_rounds=1, max_rounds=16)
    kit.register(c, "a")
    now = 0
    while c.phase is ChainPhase.TRAINING:
        if c.head_stage:
            assert c.convergence.min_rounds == 1 and c.convergence.max_rounds == 8
        kit.train_round(c, now)
        now += 100
    per_stage = [s for s, w in layer_rounds(c) if w]
    assert [per_stage.count(layer) for layer in range(4)] == [2, 2, 2, 2]
    assert [w for _s, w in layer_rounds(c)].count(()) == 2


def test_without_a_budget_stages_keep_their_flat_cap(kit):
    c = kit.coordinator(min_agents=1, max_rounds=2, min_rounds=2)
    kit.register(c, "a")
    now, loss = 0, 1.0
    while c.phase is ChainPhase.TRAINING:
        loss *= 0.5
        kit.train_round(c, now, losses={"a": loss})
        now += 100
    assert [s for s, _w in layer_rounds(c)] == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"round_budget": 0}, "round budget must be >= 1"),
        ({"round_budget": 5, "head_rounds": 2}, r"\(6 needed\)"),
        ({"round_budget": 7, "min_rounds": 2, "max_rounds": 3}, r"\(8 needed\)"),
        ({"head_rounds": -1}, "head rounds must be >= 0"),
    ],
)
def test_a_budget_too_small_for_the_stages_is_refused(kit, overrides, message):
    with pytest.raises(ValueError, match=message):
        kit.config(**overrides)


def test_under_foat_a_short_budget_is_a_warning_and_every_stage_runs_its_minimum(kit, caplog):
    caplog.set_level(logging.WARNING, logger="chainfed.coordinator")
    c = kit.coordinator(min_agents=1, start_layer=None, round_budget=2)
    kit.register(c, "a")
    c.report_probe(ProbeReport("a", c.probe_id, (0.9, 0.5, 0.4, 0.3), 10))
    c.tick(10)
    assert c.start_layer == 1 and "short of the 3" in caplog.text
    now = 20
    while c.phase is ChainPhase.TRAINING:
        kit.train_round(c, now, losses={"a": 1.0 / (now + 1)})
        now += 100
    assert [s for s, _w in layer_rounds(c)] == [1, 2, 3]
