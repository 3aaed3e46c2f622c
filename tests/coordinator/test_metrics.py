"""The metrics' exposition from known snapshots and events (a real run's scrape is in
``test_operations.py``): the gauges follow the snapshot, layer gauges are absent outside
training, ε appears only under differential privacy, counters count what they are told."""

from __future__ import annotations

from prometheus_client import generate_latest

from chainfed.coordinator.metrics import CoordinatorMetrics
from chainfed.proto.messages import AgentCapabilities, AgentStatus, ChainPhase, StatusSnapshot


def samples(metrics: CoordinatorMetrics) -> dict[str, float]:
    lines = generate_latest(metrics.registry).decode().splitlines()
    return {
        name: float(value)
        for name, _, value in (line.rpartition(" ") for line in lines if not line.startswith("#"))
    }


def agents(*inactive: bool) -> tuple[AgentStatus, ...]:
    caps = AgentCapabilities("cpu", 0, 10, "0.1.0", "f" * 64)
    return tuple(AgentStatus(f"a{k}", caps, 0, 0, inactive=i) for k, i in enumerate(inactive))


def test_gauges_follow_the_snapshot_and_epsilon_shows_only_under_dp():
    training = StatusSnapshot(
        ChainPhase.TRAINING,
        num_layers=6,
        stage_layer=4,
        window_layers=(3, 4),
        final_layers=(2,),
        total_rounds=7,
        agents=agents(False, True, False),
        dp_epsilon=1.25,
    )
    m = samples(CoordinatorMetrics(lambda: training))
    assert m["chainfed_agents_registered"] == 3 and m["chainfed_agents_active"] == 2
    assert m["chainfed_stage_layer"] == 4 and m["chainfed_window_first_layer"] == 3
    assert m["chainfed_window_size"] == 2 and m["chainfed_final_layers"] == 1
    assert m["chainfed_rounds_completed"] == 7 and m["chainfed_dp_epsilon"] == 1.25
    assert m['chainfed_phase{phase="training"}'] == 1
    assert sum(v for k, v in m.items() if k.startswith("chainfed_phase{")) == 1

    done = StatusSnapshot(ChainPhase.DONE, num_layers=6, final_layers=(2, 3, 4, 5))
    m = samples(CoordinatorMetrics(lambda: done))
    assert not {"chainfed_stage_layer", "chainfed_window_size", "chainfed_dp_epsilon"} & set(m)
    assert m['chainfed_phase{phase="done"}'] == 1 and m["chainfed_final_layers"] == 4


def test_counters_count_rounds_and_rejections_by_reason():
    metrics = CoordinatorMetrics(lambda: StatusSnapshot(ChainPhase.WAITING_FOR_AGENTS, 2))
    for _ in range(3):
        metrics.round_opened()
    metrics.round_closed("aggregated", 0.02)
    metrics.round_closed("rerun", 0.0)
    metrics.round_closed("evaluated", 0.0)
    metrics.update_rejected("not_finite")
    metrics.update_rejected("not_finite")
    metrics.update_rejected("stale_round")
    m = samples(metrics)
    assert m["chainfed_rounds_opened_total"] == 3
    assert m["chainfed_rounds_aggregated_total"] == 1 and m["chainfed_rounds_rerun_total"] == 1
    assert m["chainfed_aggregation_seconds_count"] == 1
    assert m["chainfed_aggregation_seconds_sum"] == 0.02
    assert m['chainfed_updates_rejected_total{reason="not_finite"}'] == 2
    assert m['chainfed_updates_rejected_total{reason="stale_round"}'] == 1
