"""What a federated agent reports for a training round (``FederatedAgent.train_update``).

Prepare: a tiny random BERT, one agent with its own train and validation rows, the last
stage of a chain (window [2, 3] of 4 layers), so the head after the window is the
network's output and the streamed whole-network evaluation measures the same model.
Execute: round 1 from the seeded start; round 2 from "the aggregate" (round 1's update).
Assert: round 2's validation figures are those of the fetched aggregate on the agent's
validation rows (measured before the local steps), not of the window it trained.
Also: the agent's RPC retry policy (``_call``) on a fake clock.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from chainfed.agent.federation.federated_agent import (
    AgentConfig,
    FederatedAgent,
    LocalData,
    chain_config_from_params,
)
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.chain import EncodedSplit, evaluate_streaming
from chainfed.agent.training.objectives import ClassifyObjective
from chainfed.proto.adapter_file import load_adapter_file
from chainfed.proto.messages import Task, TaskKind, TrainingParams
from chainfed.proto.seeded_init import initial_lora_a

D, LAYERS, CLASSES = 32, 4, 3
# a large learning rate, so the locally trained window is clearly another model
PARAMS = TrainingParams(
    lr=0.05, local_steps=4, micro_batch=4, gpo="none", lora_rank=4, lora_alpha=8.0, seed=3
)


@pytest.fixture(scope="module")
def model(tiny_models) -> StreamingModel:
    model_dir = tiny_models.checkpoint("bert", hidden_size=D, num_hidden_layers=LAYERS)
    return StreamingModel(Path(model_dir))


def _streamed(model: StreamingModel, state: dict[str, torch.Tensor], val: EncodedSplit):
    """The whole network with ``state``'s adapters and head: the final model's evaluation."""
    objective = ClassifyObjective(D, CLASSES, "mean", seed=PARAMS.seed)
    head = {k.removeprefix("objective.head."): v for k, v in state.items() if "head." in k}
    objective.head.load_state_dict(head)
    adapters = {k: v for k, v in state.items() if k.startswith("layers.")}
    lora = chain_config_from_params(PARAMS, 2).lora
    return evaluate_streaming(model, objective, adapters, lora, val, batch_size=PARAMS.micro_batch)


def test_a_round_reports_the_fetched_aggregate_not_the_locally_trained_window(
    model: StreamingModel, tiny_models, tmp_path: Path
):
    # Prepare
    data = LocalData(
        train=tiny_models.classify_split(24, 1, CLASSES),
        val=tiny_models.classify_split(12, 2, CLASSES),
        task="classify",
        labels=["a", "b", "c"],
    )
    agent = FederatedAgent(AgentConfig("in-process", "", tmp_path), model, data, "fingerprint")
    agent.agent_id = "agent-0"

    def task(round_id: str) -> Task:
        return Task(
            TaskKind.TRAIN_ROUND, round_id, LAYERS - 1, (LAYERS - 2, LAYERS - 1), params=PARAMS
        )

    # Execute: round 1 starts from the seeds (no aggregate yet); round 2 from its result
    _, first_update = agent.train_update(task("r1"), {})
    aggregate = {f"window.{k}": v.clone() for k, v in first_update.items()}
    metrics, second_update = agent.train_update(task("r2"), aggregate)

    # Assert
    fetched = _streamed(model, first_update, data.val)
    trained = _streamed(model, second_update, data.val)
    assert abs(trained.loss - fetched.loss) > 1e-3  # the two models are told apart
    assert metrics.val_loss == pytest.approx(fetched.loss, rel=1e-5, abs=1e-6)
    assert metrics.val_metric == pytest.approx(fetched.metric)
    assert metrics.val_samples == len(data.val) and metrics.steps == PARAMS.local_steps


def test_every_round_starts_from_the_aggregate_with_fresh_optimizer_moments(
    model: StreamingModel, tiny_models, tmp_path: Path
):
    # Prepare: a micro-batch as large as the shard, so every step sees all rows whatever
    # the sampler's state; then an agent that trained round 1 and a fresh one given the
    # same aggregate for round 2 differ only by what the first one remembers
    data = LocalData(
        train=tiny_models.classify_split(8, 1, CLASSES),
        val=tiny_models.classify_split(8, 2, CLASSES),
        task="classify",
        labels=["a", "b", "c"],
    )
    params = replace(PARAMS, micro_batch=8)
    task = [
        Task(TaskKind.TRAIN_ROUND, f"r{i}", LAYERS - 1, (LAYERS - 2, LAYERS - 1), params=params)
        for i in (1, 2)
    ]
    veteran = FederatedAgent(AgentConfig("in-process", "", tmp_path / "v"), model, data, "fp")
    newcomer = FederatedAgent(AgentConfig("in-process", "", tmp_path / "n"), model, data, "fp")

    # Execute
    _, first = veteran.train_update(task[0], {})
    aggregate = {f"window.{k}": 0.5 * v for k, v in first.items()}
    _, veteran_update = veteran.train_update(task[1], aggregate)
    _, newcomer_update = newcomer.train_update(task[1], aggregate)

    # Assert: AdamW moments of round 1 would have moved the veteran elsewhere
    assert veteran_update.keys() == newcomer_update.keys()
    for name, tensor in veteran_update.items():
        assert torch.equal(tensor, newcomer_update[name]), name


def test_an_ffa_agent_sends_b_only_and_rebuilds_a_from_the_seed(
    model: StreamingModel, tiny_models, tmp_path: Path
):
    """A frozen (ffa): updates carry no A; an aggregate, evaluation and final adapters
    without A work as if the seeded A had been sent, and the file written holds that A."""
    params = replace(PARAMS, lora_train_a=False, lora_seed=9)
    data = LocalData(
        train=tiny_models.classify_split(24, 1, CLASSES),
        val=tiny_models.classify_split(12, 2, CLASSES),
        task="classify",
        labels=["a", "b", "c"],
    )
    agent = FederatedAgent(AgentConfig("in-process", "", tmp_path), model, data, "fingerprint")
    agent.agent_id = "agent-0"
    window = (LAYERS - 2, LAYERS - 1)

    _, first = agent.train_update(
        Task(TaskKind.TRAIN_ROUND, "r1", LAYERS - 1, window, params=params), {}
    )
    aggregate = {f"window.{k}": v.clone() for k, v in first.items()}
    _, second = agent.train_update(
        Task(TaskKind.TRAIN_ROUND, "r2", LAYERS - 1, window, params=params), aggregate
    )

    seeded = {}
    for layer in window:
        for module, wrapped in agent.trainer.window_blocks[layer].named_children():
            if hasattr(wrapped, "adapter_params"):
                a = wrapped.lora_a.detach()
                assert torch.equal(a, initial_lora_a(9, layer, module, tuple(a.shape), a.dtype))
                seeded[f"layers.{layer}.{module}.lora_a"] = a.clone()
    assert len(seeded) == 2 * 6
    for update in (first, second):
        assert not [k for k in update if k.endswith(".lora_a")]
        assert {k.replace("lora_a", "lora_b") for k in seeded} <= set(update)
    final = {k: v for k, v in second.items() if k.startswith("layers.")}
    final.update({k.removeprefix("objective."): v for k, v in second.items() if "head." in k})
    evaluate = Task(TaskKind.EVALUATE, "eval", LAYERS - 1, window, params=params)
    without_a = agent.evaluation_metrics(evaluate, final)
    with_a = agent.evaluation_metrics(evaluate, {**final, **seeded})
    assert (without_a.val_loss, without_a.val_metric) == (with_a.val_loss, with_a.val_metric)

    written = load_adapter_file(agent.write_final_adapters(final, params)).tensors
    assert set(written) == set(final) | set(seeded)
    for name, a in seeded.items():
        assert torch.equal(written[name], a), name

    # an agent with no trainer in this process (restarted, or a Flower ClientApp started for
    # the final message) writes the same file, LoRA settings and pooling included
    fresh = FederatedAgent(AgentConfig("in-process", "", tmp_path / "fresh"), model, data, "fp")
    again = load_adapter_file(fresh.write_final_adapters(final, params))
    first_info = load_adapter_file(tmp_path / "final_adapters.safetensors").info
    assert (
        again.info["lora"]
        == first_info["lora"]
        == chain_config_from_params(params, 1).lora.to_dict()
    )
    assert again.info["pooling"] == first_info["pooling"] is not None
    assert all(torch.equal(again.tensors[k], written[k]) for k in written)


def test_a_window_of_every_layer_keeps_its_activations_and_trains_the_same(
    model: StreamingModel, tiny_models, tmp_path: Path
):
    """The coordinator's e2e layout (window = every layer) trains as e2e users run it,
    without recomputing blocks in backward; a chain window still recomputes. Same update
    either way, bit for bit: recompute changes memory, not arithmetic."""
    data = LocalData(
        train=tiny_models.classify_split(16, 1, CLASSES),
        val=tiny_models.classify_split(8, 2, CLASSES),
        task="classify",
        labels=["a", "b", "c"],
    )
    whole = Task(TaskKind.TRAIN_ROUND, "r1", LAYERS - 1, tuple(range(LAYERS)), params=PARAMS)
    part = Task(TaskKind.TRAIN_ROUND, "r1", LAYERS - 1, (LAYERS - 2, LAYERS - 1), params=PARAMS)

    e2e = FederatedAgent(AgentConfig("in-process", "", tmp_path / "e2e"), model, data, "fp")
    _, e2e_update = e2e.train_update(whole, {})
    recomputing = FederatedAgent(AgentConfig("in-process", "", tmp_path / "rc"), model, data, "fp")
    recomputing.ensure_trainer(PARAMS, 2)
    _, recomputed_update = recomputing.train_update(whole, {})
    chain = FederatedAgent(AgentConfig("in-process", "", tmp_path / "chain"), model, data, "fp")
    chain.train_update(part, {})

    assert not e2e.trainer.recomputes
    assert recomputing.trainer.recomputes and chain.trainer.recomputes
    assert e2e_update.keys() == recomputed_update.keys()
    assert len([k for k in e2e_update if k.startswith("layers.0.")]) == 12
    for name, tensor in e2e_update.items():
        assert torch.equal(tensor, recomputed_update[name]), name
