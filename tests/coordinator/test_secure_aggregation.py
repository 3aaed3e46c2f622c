"""The coordinator under secure aggregation: which settings are refused, and a round closed
by the survivors' secure mean (``ChainCoordinator.submit_secure_mean``) instead of their
individual updates.

The mean here is computed by hand (``aggregate_fedavg`` of the survivors' updates), as a
secure sum would give it up to its quantisation; the Flower tests
(``tests/agent/app/test_flower_secagg.py``) run the real SecAgg+ protocol.
"""

import pytest
import torch

from chainfed.coordinator.aggregation import WeightedUpdate, aggregate_fedavg
from chainfed.coordinator.secure_aggregation import (
    SecureAggregationError,
    check_secure_aggregation,
)
from chainfed.coordinator.update_checks import UpdateRejectedError
from chainfed.proto.messages import ChainPhase, TrainingParams


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"aggregation": "median"}, "aggregation 'median': it takes the coordinate-wise median"),
        ({"aggregation": "trimmed-mean"}, "aggregation 'trimmed-mean': it sorts"),
        ({"aggregation": "svd"}, "aggregation 'svd': it averages the products"),
        ({"norm_bound": 1.0}, "norm bound: it measures each update's own change"),
        ({"clip_norm": 1.0}, "clip norm"),
        ({"dp_noise_multiplier": 1.0, "dp_clip": 1.0}, "central DP"),
    ],
)
def test_settings_that_need_each_update_are_refused_by_name(kit, overrides, named):
    with pytest.raises(SecureAggregationError, match="sees only the sum|shows the server") as info:
        check_secure_aggregation(kit.config(**overrides))

    assert named in str(info.value)


def test_weighted_means_and_local_dp_pass(kit):
    check_secure_aggregation(kit.config(aggregation="fedavg"))
    check_secure_aggregation(
        kit.config(
            aggregation="ffa",
            params=TrainingParams(lora_rank=2, lora_train_a=False),
            lora_in_features={"q_proj": 8, "v_proj": 8},
        )
    )
    check_secure_aggregation(
        kit.config(dp_noise_multiplier=1.0, dp_clip=1.0, dp_mode="local", min_agents=1)
    )


def _updates(kit, c, agents):
    r = c.open_round
    return {
        agent: (
            kit.metrics(val_loss=1.0 + k, train_samples=10 * (k + 1)),
            kit.update(r.window, 0, k),
        )
        for k, agent in enumerate(agents)
    }


def test_a_secure_mean_closes_the_round_like_the_survivors_updates(kit):
    # Prepare: the same round twice; "c" drops out of both
    plain, secure = kit.coordinator(min_agents=2), kit.coordinator(min_agents=2)
    for c in (plain, secure):
        kit.register(c, "a", "b", "c")
    sent = _updates(kit, plain, ["a", "b"])
    mean = aggregate_fedavg([WeightedUpdate(t, m.train_samples, a) for a, (m, t) in sent.items()])

    # Execute
    for agent, (m, t) in sent.items():
        plain.submit(agent, plain.open_round.round_id, m, t, 5)
    plain.tick(60_000)
    secure.submit_secure_mean(
        secure.open_round.round_id, {a: m for a, (m, _) in sent.items()}, mean, 5
    )

    # Assert: same aggregate, metrics and stage move; "c" dropped at once, no digests
    got, want = secure.history[-1], plain.history[-1]
    assert (
        (got.participants, got.dropped)
        == (want.participants, want.dropped)
        == (
            ("a", "b"),
            ("c",),
        )
    )
    assert got.metrics == want.metrics and got.update_digests == ()
    assert secure.stage_layer == plain.stage_layer == 1
    assert sorted(secure.final) == sorted(plain.final)
    for name, tensor in plain.final.items():
        assert torch.equal(secure.final[name], tensor), name
    for name, tensor in plain.window_state.items():
        assert torch.equal(secure.window_state[name], tensor), name


def test_a_secure_mean_below_the_quorum_reruns_the_round(kit):
    c = kit.coordinator(min_agents=2)
    kit.register(c, "a", "b", "c")
    first = c.open_round.round_id
    (m, t) = _updates(kit, c, ["a"])["a"]

    c.submit_secure_mean(first, {"a": m}, t, 5)
    c.tick(6)

    assert not c.history and c.window_state == {}
    assert c.phase is ChainPhase.TRAINING and c.open_round.round_id != first


def test_a_bad_secure_mean_is_rejected_whole_and_the_round_stays_open(kit):
    c = kit.coordinator(min_agents=2)
    kit.register(c, "a", "b", "c")
    r = c.open_round
    sent = _updates(kit, c, ["a", "b"])
    metrics = {a: m for a, (m, _) in sent.items()}
    mean = dict(sent["a"][1])
    mean["objective.head.bias"] = torch.full_like(mean["objective.head.bias"], float("nan"))

    with pytest.raises(UpdateRejectedError, match="NaN"):
        c.submit_secure_mean(r.round_id, metrics, mean, 5)
    with pytest.raises(UpdateRejectedError, match="'x' is not registered"):
        c.submit_secure_mean(r.round_id, {**metrics, "x": sent["a"][0]}, sent["a"][1], 5)
    with pytest.raises(UpdateRejectedError, match="not open"):
        c.submit_secure_mean("r999", metrics, sent["a"][1], 5)

    assert c.open_round is r and not r.updates and not c.history


def test_the_coordinator_refuses_a_secure_mean_for_a_robust_rule(kit):
    c = kit.coordinator(min_agents=2, aggregation="median")
    kit.register(c, "a", "b")
    sent = _updates(kit, c, ["a", "b"])

    with pytest.raises(SecureAggregationError, match="'median'"):
        c.submit_secure_mean(c.open_round.round_id, {a: m for a, (m, _) in sent.items()}, {}, 5)
