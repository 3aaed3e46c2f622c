"""The coordinator's idea of a round's starting tensors equals what a real agent starts from.

Prepare: a tiny random BERT checkpoint and the agent's own ``ChainTrainer`` built from a
task's ``TrainingParams`` (GPO proxies on, non-default seeds).
Execute: the first stage (everything fresh from the seeds), then a later stage after
loading an aggregate (one adapter new, the rest from the aggregate).
Assert: ``round_start_state`` reproduces the trainer's window state bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chainfed.agent.federation.federated_agent import chain_config_from_params
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.chain import ChainTrainer
from chainfed.agent.training.objectives import ClassifyObjective
from chainfed.coordinator.aggregation import AggregationError
from chainfed.coordinator.round_start import round_start_state, seeded_start
from chainfed.proto.messages import TrainingParams

D, LAYERS, CLASSES = 32, 4, 3
PARAMS = TrainingParams(
    lora_rank=3, lora_alpha=6.0, proxy_rank=2, gpo="proxy", seed=5, lora_seed=7, micro_batch=4
)


@pytest.fixture(scope="module")
def trainer(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> ChainTrainer:
    model_dir = tiny_models.checkpoint("bert", hidden_size=D, num_hidden_layers=LAYERS)
    model = StreamingModel(Path(model_dir))
    objective = ClassifyObjective(D, CLASSES, "mean", seed=PARAMS.seed)  # as FederatedAgent
    return ChainTrainer(
        model,
        objective,
        tiny_models.classify_split(8, 1, CLASSES),
        tiny_models.classify_split(4, 2, CLASSES),
        chain_config_from_params(PARAMS, 2),
        tmp_path_factory.mktemp("work"),
        progress=False,
    )


def _assert_identical(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def test_round_start_matches_a_real_agent_through_two_stages(trainer: ChainTrainer):
    trainer.set_start_layer(1)
    trainer.enter_stage(1, [1])
    fresh = trainer.trainable_state()
    assert any(n.startswith("foresight.") for n in fresh) and "objective.head.weight" in fresh

    _assert_identical(round_start_state(fresh, {}, PARAMS, 1, LAYERS), fresh)

    # an aggregate comes back; the next stage adds layer 2's adapter from the seeds
    g = torch.Generator().manual_seed(0)
    aggregate = {n: t + torch.randn(t.shape, generator=g) * 0.1 for n, t in fresh.items()}
    trainer.load_trainable_state(aggregate)
    trainer.enter_stage(2, [1, 2])
    state = trainer.trainable_state()
    known = {n: aggregate[n] for n in state if n in aggregate}
    assert known and any(n.startswith("layers.2.") for n in state)

    start = round_start_state(state, known, PARAMS, 1, LAYERS)

    _assert_identical(start, state)
    assert all(start[n] is known[n] for n in known)


def test_a_tensor_without_a_known_start_is_refused():
    with pytest.raises(AggregationError, match="objective.extra"):
        seeded_start("objective.extra", torch.zeros(3), PARAMS, 0, LAYERS)
    with pytest.raises(AggregationError, match="foresight.proxies.0.up"):
        # layer 0 is not above the start layer 1: no proxy of it ever existed
        seeded_start("foresight.proxies.0.up", torch.zeros(D, 2), PARAMS, 1, LAYERS)
