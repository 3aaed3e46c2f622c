"""Byzantine agents against the aggregation strategies, on real MiniLM + tweets.

Prepare: an in-process federation (``chainfed.agent.app.simulation``: the product's
``ChainCoordinator`` and ``FederatedAgent`` round work) of iid shards; 20 % of the agents
are attackers whose ``update_hook`` replaces every upload by a multiple of it (here ×−10:
scaled and sign-flipped) while the honest agents train normally.
Execute: the clean federation (fedavg, nobody attacks) and the attacked one under
fedavg, trimmed-mean and median, same data, seed and schedule.
Assert: on the held-out test rows, trimmed-mean and median stay within 2 accuracy points
of the clean run; fedavg loses more than that.

The agents share one workdir, so the prefix caches below the chain are computed once.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from chainfed.agent.app.options import SimulationConfig
from chainfed.agent.app.simulation import run_simulation

FEDERATION = SimulationConfig(
    agents=5,
    split="iid",
    train_rows=500,
    val_rows=100,
    test_rows=800,
    max_len=32,
    seed=0,
    start_layer=4,
    window=2,
    gpo="none",
    min_rounds_per_layer=1,
    max_rounds_per_layer=2,
    local_steps=10,
    micro_batch=16,
    lr=3e-3,
    in_process=True,
)
"""One attacker (agent-4) of five; layers 4-5 of six, two rounds per stage."""


def _attack(factors: dict[str, float]):
    def hook(agent_id: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        factor = factors.get(agent_id)
        return tensors if factor is None else {n: t * factor for n, t in tensors.items()}

    return hook


def _accuracies(config: SimulationConfig, attackers: dict[str, float], workdir: Path):
    runs = {"clean": ("fedavg", {})}
    for strategy in ("fedavg", "trimmed-mean", "median"):
        runs[f"{strategy} attacked"] = (strategy, attackers)
    accuracy = {}
    for name, (strategy, factors) in runs.items():
        run = replace(config, aggregation=strategy, workdir=workdir)
        accuracy[name] = run_simulation(run, update_hook=_attack(factors)).test_metric
    print("test accuracy:", {k: round(v, 4) for k, v in accuracy.items()})
    return accuracy


def _assert_robust(accuracy: dict[str, float]) -> None:
    clean = accuracy["clean"]
    assert abs(accuracy["trimmed-mean attacked"] - clean) <= 0.02, accuracy
    assert abs(accuracy["median attacked"] - clean) <= 0.02, accuracy
    assert accuracy["fedavg attacked"] < clean - 0.02, accuracy


@pytest.mark.slow
def test_robust_strategies_withstand_a_scaled_attacker(tmp_path):
    """Four federations of five agents: minutes on 2 CPU cores, hence slow-only."""
    _assert_robust(_accuracies(FEDERATION, {"agent-4": -10.0}, tmp_path))
