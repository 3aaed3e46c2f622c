"""Client-level DP: the accountant against hand-derived RDP values, the noised mean and
local update against their formulas, and the coordinator's ledger, budget stop, status
and persistence.

The accountant checks derive ε independently of ``dp-accounting``:

* q = 1: the Gaussian mechanism with noise multiplier z has RDP α/(2z²) per round
  (Mironov 2017, Prop. 7), T rounds compose to T·α/(2z²), and (α, ρ)-RDP gives
  (ρ + log(1 − 1/α) − log(δ·α)/(α − 1), δ)-DP (Canonne, Kamath, Steinke 2020, Prop. 12);
  ε is the minimum over the orders.
* q < 1, integer α: the Poisson-subsampled Gaussian has RDP
  log(Σ_k C(α,k) (1−q)^{α−k} q^k exp((k² − k)/(2z²))) / (α − 1)
  (Mironov, Talwar, Zhang 2019, §3.3).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from chainfed.coordinator import state_store
from chainfed.coordinator.dp import (
    DPConfig,
    PrivacyLedger,
    central_dp_mean,
    epsilon_for,
    noise_multiplier_for,
)
from chainfed.coordinator.round_start import round_start_state
from chainfed.coordinator.state_store import StateDirError
from chainfed.proto.adapter_file import load_adapter_file
from chainfed.proto.dp_mechanism import clip_update, local_dp_update, update_norm
from chainfed.proto.messages import ChainPhase, TaskKind, TrainingParams

# dp-accounting's default orders, written out: 1.1 … 10.9, 11 … 63, 128 … 1024
ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


def _epsilon_from_rdp(rdp_of_order, delta: float, orders) -> float:
    return max(
        0.0,
        min(
            rdp_of_order(a) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
            for a in orders
            if a > 1.01
        ),
    )


@pytest.mark.parametrize(
    ("z", "rounds", "delta"), [(1.0, 1, 1e-5), (1.1, 50, 1e-5), (4.0, 1000, 1e-6), (0.7, 10, 1e-3)]
)
def test_accountant_matches_the_closed_form_gaussian(z, rounds, delta):
    want = _epsilon_from_rdp(lambda a: rounds * a / (2 * z * z), delta, ORDERS)
    got = epsilon_for([(z, 1.0, rounds)], delta)
    print(f"z={z} T={rounds} delta={delta}: accountant eps={got:.6f}, closed form eps={want:.6f}")
    assert got == pytest.approx(want, rel=1e-9)
    # the grid of orders costs little: the continuous optimum is at most 2 % lower
    a = np.linspace(1.02, 2000.0, 400_000)
    continuous = (rounds * a / (2 * z * z) + np.log1p(-1 / a) - np.log(delta * a) / (a - 1)).min()
    assert want >= max(continuous, 0.0) >= want / 1.02


@pytest.mark.parametrize(("q", "z", "rounds"), [(0.1, 1.0, 100), (0.5, 2.0, 20), (0.02, 0.8, 500)])
def test_accountant_matches_the_subsampled_gaussian_at_integer_orders(q, z, rounds):
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
    from dp_accounting.rdp import rdp_privacy_accountant

    def rdp(a: int) -> float:
        logs = [
            math.log(math.comb(a, k))
            + (a - k) * math.log1p(-q)
            + k * math.log(q)
            + (k * k - k) / (2 * z * z)
            for k in range(a + 1)
        ]
        top = max(logs)
        return rounds * (top + math.log(math.fsum(math.exp(x - top) for x in logs))) / (a - 1)

    orders = list(range(2, 40))
    want = _epsilon_from_rdp(rdp, 1e-5, orders)
    accountant = rdp_privacy_accountant.RdpAccountant(orders)
    accountant.compose(PoissonSampledDpEvent(q, GaussianDpEvent(z)), rounds)
    got = accountant.get_epsilon(1e-5)
    print(f"q={q} z={z} T={rounds}: accountant eps={got:.6f}, binomial RDP eps={want:.6f}")
    assert got == pytest.approx(want, rel=1e-6)
    # the product's accounting (default orders, fractional ones included) can only be tighter
    assert epsilon_for([(z, q, rounds)], 1e-5) <= want * (1 + 1e-9)


def test_epsilon_grows_with_rounds_and_rate_and_shrinks_with_noise():
    base = epsilon_for([(1.0, 0.2, 10)], 1e-5)
    assert epsilon_for([], 1e-5) == 0.0
    assert epsilon_for([(1.0, 0.2, 20)], 1e-5) > base
    assert epsilon_for([(1.0, 0.4, 10)], 1e-5) > base
    assert epsilon_for([(2.0, 0.2, 10)], 1e-5) < base
    # heterogeneous composition = the sum of the parts' RDP, never less than either part
    mixed = epsilon_for([(1.0, 0.2, 10), (2.0, 1.0, 5)], 1e-5)
    assert mixed > max(base, epsilon_for([(2.0, 1.0, 5)], 1e-5))


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_noise_multiplier_for_reaches_the_target(target):
    z = noise_multiplier_for(target, 0.5, 12, 1e-5)
    assert epsilon_for([(z, 0.5, 12)], 1e-5) <= target
    assert epsilon_for([(z * 0.99, 0.5, 12)], 1e-5) > target


def test_ledger_charges_compose_in_order():
    ledger = PrivacyLedger(1e-5)
    for z, q in [(1.0, 0.5), (1.0, 0.5), (2.0, 0.5), (1.0, 0.5)]:
        ledger.charge(z, q)
    assert ledger.rounds == [(1.0, 0.5, 2), (2.0, 0.5, 1), (1.0, 0.5, 1)]
    assert ledger.epsilon() == epsilon_for(ledger.rounds, 1e-5)
    assert ledger.epsilon_after_next(1.0, 0.5) == epsilon_for([*ledger.rounds, (1.0, 0.5, 1)], 1e-5)
    assert ledger.rounds == [(1.0, 0.5, 2), (2.0, 0.5, 1), (1.0, 0.5, 1)]  # unchanged
    again = PrivacyLedger.from_list(1e-5, ledger.to_list())
    assert again.rounds == ledger.rounds


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": 0.0, "clip": 1.0},
        {"noise_multiplier": 1.0, "clip": -1.0},
        {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1.0},
        {"noise_multiplier": 1.0, "clip": 1.0, "mode": "global"},
        {"noise_multiplier": 1.0, "clip": 1.0, "epsilon_budget": 0.0},
    ],
)
def test_dp_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="dp"):
        DPConfig(**kwargs)


# -- the noised mean and the local update ----------------------------------------------

NAMES = {"layers.0.q_proj.lora_a": (4, 50), "layers.0.q_proj.lora_b": (60, 4), "objective.b": (7,)}


def _tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=torch.float64) * scale for n, s in NAMES.items()}


def _clipped_mean_delta(updates, start, clip):
    out = {}
    for name in NAMES:
        out[name] = sum(
            (u[name] - start[name]) * min(1.0, clip / update_norm(u, start)) for u in updates
        ) / len(updates)
    return out


def test_central_mean_is_the_clipped_mean_plus_noise_of_std_zc_over_n():
    start = _tensors(0)
    updates = [
        {n: start[n] + d for n, d in _tensors(10 + k, scale=0.5 if k else 20.0).items()}
        for k in range(4)
    ]
    config = DPConfig(noise_multiplier=1.5, clip=3.0)
    want = _clipped_mean_delta(updates, start, 3.0)

    got = central_dp_mean(updates, start, config, generator=torch.Generator().manual_seed(1))

    residual = torch.cat([(got[n] - start[n] - want[n]).flatten() for n in NAMES])
    assert residual.numel() == 4 * 50 + 60 * 4 + 7
    assert residual.std().item() == pytest.approx(1.5 * 3.0 / 4, rel=0.1)
    assert abs(residual.mean().item()) < 4 * 1.5 * 3.0 / 4 / math.sqrt(residual.numel())


def test_central_mean_with_frozen_a_keeps_a_and_bounds_each_agent():
    start = _tensors(0)
    updates = [{n: start[n] + d for n, d in _tensors(10 + k, scale=5.0).items()} for k in range(3)]
    config = DPConfig(noise_multiplier=1e-9, clip=0.5)  # noise negligible: the clipped mean

    got = central_dp_mean(updates, start, config, train_a=False)

    assert torch.equal(got["layers.0.q_proj.lora_a"], start["layers.0.q_proj.lora_a"])
    want = _clipped_mean_delta(updates, start, 0.5)
    for name in ("layers.0.q_proj.lora_b", "objective.b"):
        torch.testing.assert_close(got[name] - start[name], want[name], rtol=0, atol=1e-7)
    # one agent moves the result by at most C / n
    moved = central_dp_mean(updates[:2] + [start], start, config, train_a=False)
    shift = math.sqrt(sum(float((got[n] - moved[n]).pow(2).sum()) for n in NAMES))
    assert shift <= 0.5 / 3 + 1e-6


def test_local_update_is_clipped_then_noised_with_std_zc():
    start = _tensors(0)
    update = {n: start[n] + d for n, d in _tensors(3, scale=2.0).items()}
    clipped = clip_update(update, start, 1.0)

    got = local_dp_update(update, start, 1.0, 0.8, generator=torch.Generator().manual_seed(2))

    residual = torch.cat([(got[n] - clipped[n]).flatten() for n in NAMES])
    assert residual.std().item() == pytest.approx(0.8, rel=0.1)
    frozen = local_dp_update(update, start, 1.0, 0.8, train_a=False)
    assert torch.equal(frozen["layers.0.q_proj.lora_a"], clipped["layers.0.q_proj.lora_a"])


# -- the coordinator -------------------------------------------------------------------


def _dp(kit, **overrides):
    values = {"dp_noise_multiplier": 1.2, "dp_clip": 0.5, "min_agents": 2, "window": 1}
    values.update(overrides)
    return kit.coordinator(**values)


def test_coordinator_records_epsilon_per_round_and_in_status(kit):
    c = _dp(kit, agents_per_round=2)
    kit.register(c, "a", "b", "c", "d")
    for stage in range(3):
        kit.train_round(c, stage * 100, seed=stage)

    records = c.history
    for k, record in enumerate(records, 1):
        assert record.dp_epsilon == pytest.approx(epsilon_for([(1.2, 0.5, k)], 1e-5), rel=1e-12)
        assert record.dp_round_epsilon == pytest.approx(epsilon_for([(1.2, 0.5, 1)], 1e-5))
    assert records[0].dp_epsilon < records[1].dp_epsilon < records[2].dp_epsilon
    snapshot = c.snapshot()
    assert snapshot.dp_epsilon == records[-1].dp_epsilon
    assert snapshot.dp_delta == 1e-5 and snapshot.dp_epsilon_budget is None
    assert snapshot.stop_reason == ""


def test_central_dp_aggregate_is_the_noised_clipped_mean_from_the_round_start(kit):
    c = _dp(kit, dp_noise_multiplier=1e-9, dp_clip=0.05)
    kit.register(c, "a", "b")
    c.tick(0)
    start_round = c.open_round
    sent = kit.train_round(c, 0)

    uploads = [sent[a][1] for a in sorted(sent)]
    start = round_start_state(uploads[0], {}, c.config.params, 0, kit.num_layers)
    want = _clipped_mean_delta_any(uploads, start, 0.05)
    assert start_round.round_id == c.history[0].round_id
    got = {**c.window_state, **c.final}  # layer 0 left the window (window 1, one round)
    for name, delta in want.items():
        torch.testing.assert_close(got[name].double(), start[name] + delta, rtol=0, atol=1e-6)


def _clipped_mean_delta_any(updates, start, clip):
    factors = [min(1.0, clip / update_norm(u, start)) for u in updates]
    assert max(factors) < 1  # the kit's updates are far above this clip
    return {
        name: sum(
            (u[name].double() - start[name].double()) * f
            for u, f in zip(updates, factors, strict=True)
        )
        / len(updates)
        for name in updates[0]
    }


def test_clip_norm_bounds_each_update_before_the_strategy(kit):
    c = kit.coordinator(min_agents=2, window=1, clip_norm=0.1, aggregation="median")
    kit.register(c, "a", "b", "c")
    sent = kit.train_round(c, 0)
    uploads = [sent[a][1] for a in sorted(sent)]
    start = round_start_state(uploads[0], {}, c.config.params, 0, kit.num_layers)
    clipped = [clip_update(u, start, 0.1) for u in uploads]
    assert all(update_norm(u, start) > 0.1 for u in uploads)
    got = {**c.window_state, **c.final}
    for name in uploads[0]:
        want = torch.stack([u[name] for u in clipped]).median(dim=0).values
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-7)


def test_budget_stops_the_chain_cleanly_and_survives_a_restart(kit, tmp_path):
    budget = (epsilon_for([(1.2, 1.0, 2)], 1e-5) + epsilon_for([(1.2, 1.0, 3)], 1e-5)) / 2
    c = _dp(kit, dp_epsilon_budget=budget, min_rounds=3, max_rounds=3)  # stage 0 unfinished
    kit.register(c, "a", "b")
    for stage in range(2):
        kit.train_round(c, stage * 100, seed=stage)
    trained = {k: v.clone() for k, v in c.window_state.items()}

    c.tick(300)  # the third round would exceed the budget

    assert c.phase is ChainPhase.EVALUATING and c.open_round.evaluation
    assert "privacy budget" in c.stop_reason and f"{budget:g}" in c.stop_reason
    assert c.snapshot().dp_epsilon <= budget < c.dp_ledger.epsilon_after_next(1.2, 1.0)
    assert c.snapshot().final_layers == (0,)  # what was trained, nothing more
    assert torch.equal(c.final["layers.0.q_proj.lora_b"], trained["layers.0.q_proj.lora_b"])
    assert torch.equal(c.final["head.weight"], trained["objective.head.weight"])
    assert not c.window_state
    for agent in ("a", "b"):
        task = c.next_task(agent, 301)
        assert task.kind is TaskKind.EVALUATE
        c.submit(agent, task.round_id, kit.eval_metrics(), {}, 302)
    assert c.phase is ChainPhase.DONE
    state_store.save(c, tmp_path)

    loaded = state_store.load(tmp_path, c.config)

    assert loaded.dp_ledger.rounds == [(1.2, 1.0, 2)]
    assert loaded.snapshot().dp_epsilon == c.snapshot().dp_epsilon
    assert loaded.stop_reason == c.stop_reason
    final_file = load_adapter_file(tmp_path / state_store.FINAL_FILE)
    assert final_file.info["stop_reason"] == c.stop_reason
    assert final_file.info["dp_epsilon"] == pytest.approx(c.snapshot().dp_epsilon)
    with pytest.raises(StateDirError, match="differential privacy"):
        state_store.load(tmp_path, kit.config(min_agents=2, window=1, max_rounds=3))
    state_file = tmp_path / state_store.STATE_FILE
    state = json.loads(state_file.read_text())
    for rounds in (float("inf"), 2.5):  # inf escaped as an OverflowError; 2.5 was cut to 2
        state["dp_ledger"] = [[1.2, 1.0, rounds]]
        state_file.write_text(json.dumps(state))
        with pytest.raises(StateDirError, match="dp_ledger"):
            state_store.load(tmp_path, c.config)


def test_local_mode_tells_agents_and_charges_every_released_round(kit):
    c = _dp(kit, dp_mode="local", aggregation="median", agents_per_round=2)
    kit.register(c, "a", "b", "c", "d")
    c.tick(0)
    task = c.next_task(c.open_round.participants[0], 0)
    assert task.params.local_dp_clip == 0.5 and task.params.local_dp_noise_multiplier == 1.2
    kit.train_round(c, 0)
    # local DP: no amplification by sampling (the coordinator sees who took part)
    assert c.history[-1].dp_epsilon == pytest.approx(epsilon_for([(1.2, 1.0, 1)], 1e-5))
    plain = kit.coordinator(min_agents=1)
    kit.register(plain, "a")
    assert plain.next_task("a", 0).params == TrainingParams(lora_rank=2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dp_noise_multiplier": 1.0, "dp_clip": 1.0, "aggregation": "median"}, "central DP"),
        ({"dp_noise_multiplier": 1.0}, "both"),
        ({"dp_clip": 1.0}, "both"),
        ({"dp_epsilon_budget": 1.0}, "epsilon budget"),
        ({"clip_norm": 0.0}, "clip norm"),
        ({"trim_fraction": 0.5}, "trim fraction"),
        ({"dp_noise_multiplier": 1.0, "dp_clip": 1.0, "dp_mode": "both"}, "dp mode"),
    ],
)
def test_coordinator_config_rejects_inconsistent_privacy_options(kit, overrides, message):
    with pytest.raises(ValueError, match=message):
        kit.config(**overrides)
