"""The closed-form head round (``closed_form_head``): agents' statistics in, the head of
all their rows out, after the chain's last stage (``end``) and also before its first
training round (``both``).

Pure state machine, as ``test_chain_state.py``, with the fake 4-layer model of
``conftest.ChainKit`` (hidden width ``DIM`` 8, 3 classes)."""

from __future__ import annotations

import pytest
import torch

from chainfed.coordinator import chain_state, state_store
from chainfed.coordinator.update_checks import UpdateRejectedError
from chainfed.proto.closed_form_head import HEAD_CROSS, HEAD_GRAM, head_statistics, solve_head
from chainfed.proto.messages import ChainPhase, TaskKind, UpdateMetrics

HEAD = ("objective.head.weight", "objective.head.bias")


def statistics(seed: int, rows: int, dim: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (rows,), generator=g)
    features = torch.randn(rows, dim, generator=g) + labels[:, None]
    return head_statistics(features, labels, 3)


def fit_metrics(rows: int) -> UpdateMetrics:
    return UpdateMetrics(rows, 0, 0, 0.0, 0.0, 0.0, 1000, 0.1)


def fit(c, agents: dict[str, int], now: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Every agent answers the open fit round with statistics of ``agents[a]`` rows."""
    c.tick(now)
    sent = {}
    for k, (agent, rows) in enumerate(agents.items()):
        task = c.next_task(agent, now)
        assert task.kind is TaskKind.FIT_HEAD, task
        sent[agent] = statistics(k, rows)
        assert c.submit(agent, task.round_id, fit_metrics(rows), sent[agent], now + 1)
    return sent


def test_the_first_round_fits_the_head_from_the_weighted_mean_of_the_statistics(kit):
    c = kit.coordinator(min_agents=2, closed_form_head="both")
    kit.register(c, "a", "b")

    task = c.next_task("a", 0)
    assert task.kind is TaskKind.FIT_HEAD and task.round_id.startswith("fit")
    assert task.window_layers == () and task.stage_layer == 0 and task.tensors == ()
    assert c.tensors_for(task.round_id) == {}  # the base model: no adapters yet
    sent = fit(c, {"a": 10, "b": 30})

    mean = {k: (10 * sent["a"][k] + 30 * sent["b"][k]) / 40 for k in (HEAD_GRAM, HEAD_CROSS)}
    weight, bias = solve_head(mean)
    assert set(c.window_state) == set(HEAD)
    torch.testing.assert_close(c.window_state["objective.head.weight"], weight)
    torch.testing.assert_close(c.window_state["objective.head.bias"], bias)
    assert c.phase is ChainPhase.TRAINING and c.trained_rounds() == 0
    assert [r.round_id[:3] for r in c.history] == ["fit"]
    assert c.history[0].metrics.train_samples == 40

    c.tick(10)
    task = c.next_task("a", 10)
    assert task.kind is TaskKind.TRAIN_ROUND and task.window_layers == (0,)
    fetched = c.tensors_for(task.round_id)
    assert torch.equal(fetched["window.objective.head.weight"], weight)
    kit.train_round(c, 10)  # the adapters' shapes come from the first update, as before
    assert c.trained_rounds() == 1 and c.stage_layer == 1


def test_a_fit_round_refuses_anything_but_the_two_statistics(kit):
    c = kit.coordinator(min_agents=2, closed_form_head="both")
    kit.register(c, "a", "b")
    task = c.next_task("a", 0)

    with pytest.raises(UpdateRejectedError, match="must be exactly") as bad:
        c.submit("a", task.round_id, kit.metrics(), kit.update([0], 0, seed=1), 1)
    assert bad.value.reason == "bad_head_statistics"
    broken = {**statistics(0, 10), HEAD_CROSS: torch.full((9, 3), float("inf"))}
    with pytest.raises(UpdateRejectedError, match="finite"):
        c.submit("a", task.round_id, fit_metrics(10), broken, 1)
    with pytest.raises(UpdateRejectedError, match="train_samples > 0"):
        c.submit("a", task.round_id, fit_metrics(0), statistics(0, 10), 1)

    assert c.submit("a", task.round_id, fit_metrics(10), statistics(0, 10), 2)
    with pytest.raises(UpdateRejectedError) as wider:
        c.submit("b", task.round_id, fit_metrics(10), statistics(1, 10, dim=9), 3)
    assert wider.value.reason == "wrong_shape"
    assert c.open_round is not None and c.open_round.head_fit and not c.window_state


def test_statistics_are_not_held_to_the_update_norm_bound(kit):
    c = kit.coordinator(min_agents=1, closed_form_head="both", norm_bound=1e-6)
    kit.register(c, "a")
    fit(c, {"a": 10})
    assert set(c.window_state) == set(HEAD)


def test_a_restarted_coordinator_keeps_the_solved_head_and_does_not_fit_again(kit, tmp_path):
    c = kit.coordinator(min_agents=2, closed_form_head="both")
    kit.register(c, "a", "b")
    fit(c, {"a": 10, "b": 20})
    head = {k: v.clone() for k, v in c.window_state.items()}
    state_store.save(c, tmp_path)

    resumed = state_store.load(tmp_path, c.config)

    assert not resumed.head_fit_pending
    for name in HEAD:
        assert torch.equal(resumed.window_state[name], head[name])
    resumed.tick(100)
    assert resumed.next_task("a", 100).kind is TaskKind.TRAIN_ROUND


def test_a_fit_round_in_flight_is_asked_again_after_a_restart(kit, tmp_path):
    c = kit.coordinator(min_agents=2, closed_form_head="both")
    kit.register(c, "a", "b")
    c.tick(0)
    task = c.next_task("a", 0)
    assert c.submit("a", task.round_id, fit_metrics(10), statistics(0, 10), 1)
    state_store.save(c, tmp_path)  # the round in flight is not in the state

    resumed = state_store.load(tmp_path, c.config)

    assert resumed.head_fit_pending
    resumed.tick(100)
    assert resumed.next_task("b", 100).kind is TaskKind.FIT_HEAD


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"task": "lm"}, "needs the classify task"),
        ({"aggregation": "median"}, "weighted mean"),
        ({"dp_noise_multiplier": 1.0, "dp_clip": 1.0}, "differential privacy"),
    ],
)
def test_settings_that_cannot_solve_the_head_are_refused(kit, overrides, message):
    with pytest.raises(ValueError, match=message):
        kit.config(closed_form_head="both", **overrides)


def test_an_unknown_fit_schedule_is_refused(kit):
    with pytest.raises(ValueError, match="closed_form_head must be one of off, end, both"):
        kit.config(closed_form_head="start")


def test_statistics_that_do_not_solve_are_dropped_and_the_fit_is_asked_again(kit, monkeypatch):
    def singular(_stats):
        raise torch.linalg.LinAlgError("singular")

    c = kit.coordinator(min_agents=1, closed_form_head="both")
    kit.register(c, "a")
    with monkeypatch.context() as patched:
        patched.setattr(chain_state, "solve_head", singular)
        fit(c, {"a": 10})
        assert not c.history and not c.window_state and c.head_fit_pending

    fit(c, {"a": 10}, now=100)  # a new fit round; it solves this time
    assert [r.head_fit for r in c.history] == [True] and set(c.window_state) == set(HEAD)


def chain_to_its_end(kit, c) -> None:
    """The start fit, then one round per stage of the fake model."""
    fit(c, {"a": 10, "b": 30})
    for stage in range(kit.num_layers):
        kit.train_round(c, 100 * (stage + 1), seed=stage)


def test_after_the_last_stage_the_head_is_refitted_on_the_final_features(kit):
    c = kit.coordinator(min_agents=2, closed_form_head="both")
    kit.register(c, "a", "b")
    chain_to_its_end(kit, c)
    assert c.phase is ChainPhase.TRAINING and c.head_refit and c.head_fit_pending
    adapters = {k: v.clone() for k, v in c.final.items()}

    c.tick(1000)
    task = c.next_task("a", 1000)
    assert task.kind is TaskKind.FIT_HEAD and task.stage_layer == kit.num_layers - 1
    assert {s.name for s in task.tensors} == set(adapters)  # every final adapter, no head
    assert c.trained_rounds() == kit.num_layers
    sent = fit(c, {"a": 10, "b": 30}, now=1000)

    mean = {k: (10 * sent["a"][k] + 30 * sent["b"][k]) / 40 for k in (HEAD_GRAM, HEAD_CROSS)}
    weight, bias = solve_head(mean)
    assert c.phase is ChainPhase.EVALUATING and not c.head_refit
    torch.testing.assert_close(c.final["head.weight"], weight)
    torch.testing.assert_close(c.final["head.bias"], bias)
    assert all(torch.equal(c.final[k], v) for k, v in adapters.items())
    assert [r.head_fit for r in c.history] == [True] + [False] * kit.num_layers + [True]


def test_end_fits_only_after_the_last_stage(kit):
    c = kit.coordinator(min_agents=2, closed_form_head="end")
    kit.register(c, "a", "b")
    assert not c.head_fit_pending
    c.tick(0)
    assert c.next_task("a", 0).kind is TaskKind.TRAIN_ROUND  # no fit before the chain
    for stage in range(kit.num_layers):
        kit.train_round(c, 100 * (stage + 1), seed=stage)
    assert c.head_refit and c.head_fit_pending

    sent = fit(c, {"a": 10, "b": 30}, now=1000)

    mean = {k: (10 * sent["a"][k] + 30 * sent["b"][k]) / 40 for k in (HEAD_GRAM, HEAD_CROSS)}
    weight, _ = solve_head(mean)
    assert c.phase is ChainPhase.EVALUATING
    torch.testing.assert_close(c.final["head.weight"], weight)
    assert [r.head_fit for r in c.history] == [False] * kit.num_layers + [True]


def test_head_rounds_start_from_the_refitted_head(kit):
    c = kit.coordinator(min_agents=2, closed_form_head="both", head_rounds=1)
    kit.register(c, "a", "b")
    chain_to_its_end(kit, c)
    fit(c, {"a": 10, "b": 30}, now=1000)

    assert c.phase is ChainPhase.TRAINING and c.head_stage and set(c.window_state) == set(HEAD)
    c.tick(1100)
    task = c.next_task("a", 1100)
    assert task.kind is TaskKind.TRAIN_ROUND and task.window_layers == ()
    fetched = c.tensors_for(task.round_id)
    assert torch.equal(fetched["window.objective.head.bias"], c.window_state[HEAD[1]])


def test_a_budget_the_stages_left_is_not_spent_on_head_rounds_after_the_fit(kit, caplog):
    """R = 10 over 4 one-round stages: 6 rounds left, which go to the head without a
    closed-form head (``test_head_and_budget``) and stay unspent with one."""
    caplog.set_level("INFO", logger="chainfed.coordinator")
    c = kit.coordinator(min_agents=2, closed_form_head="end", round_budget=10, max_rounds=1)
    kit.register(c, "a", "b")
    for stage in range(kit.num_layers):
        kit.train_round(c, 100 * (stage + 1), seed=stage)

    fit(c, {"a": 10, "b": 30}, now=1000)

    assert c.phase is ChainPhase.EVALUATING and not c.head_stage
    assert c.trained_rounds() == kit.num_layers
    assert "6 rounds of the budget unspent" in caplog.text


def test_head_rounds_asked_for_still_run_after_the_fit_under_a_budget(kit, caplog):
    """R = 10: 4 one-round stages and the 2 head rounds asked for leave 4 unspent."""
    caplog.set_level("INFO", logger="chainfed.coordinator")
    c = kit.coordinator(
        min_agents=2, closed_form_head="end", round_budget=10, max_rounds=1, head_rounds=2
    )
    kit.register(c, "a", "b")
    for stage in range(kit.num_layers):
        kit.train_round(c, 100 * (stage + 1), seed=stage)
    fit(c, {"a": 10, "b": 30}, now=1000)

    assert c.head_stage and c.convergence.max_rounds == 2
    for k in range(2):
        kit.train_round(c, 1100 + 100 * k, seed=10 + k)
    assert c.phase is ChainPhase.EVALUATING and c.trained_rounds() == kit.num_layers + 2
    assert "4 rounds of the budget unspent (6 of 10 trained)" in caplog.text


def test_a_refit_due_at_a_restart_is_asked_for_again(kit, tmp_path):
    c = kit.coordinator(min_agents=2, closed_form_head="both")
    kit.register(c, "a", "b")
    chain_to_its_end(kit, c)
    state_store.save(c, tmp_path)

    resumed = state_store.load(tmp_path, c.config)

    assert resumed.head_refit and resumed.head_fit_pending
    resumed.tick(2000)
    assert resumed.next_task("b", 2000).kind is TaskKind.FIT_HEAD
    fit(resumed, {"a": 10, "b": 30}, now=2000)
    assert resumed.phase is ChainPhase.EVALUATING
    state_store.save(resumed, tmp_path)
    assert not state_store.load(tmp_path, c.config).head_refit
