"""Shared kit for the coordinator tests: a fake model shape and hand-made updates.

The coordinator never loads a model, so these tests describe one by its tensor names
only: ``NUM_LAYERS`` blocks, LoRA rank ``RANK`` on two projections of width ``DIM``, a
``CLASSES``-way head and one GPO proxy per later layer::

    layers.{i}.{q_proj,v_proj}.lora_a      (RANK, DIM)
    layers.{i}.{q_proj,v_proj}.lora_b      (DIM, RANK)
    objective.head.weight / .bias          (CLASSES, DIM) / (CLASSES,)
    foresight.proxies.{j}.down / .up       (RANK, DIM) / (DIM, RANK)   for j > stage layer

Tests take the ``kit`` fixture (pytest's importlib mode leaves no importable helper
module) and drive a ``ChainCoordinator`` with explicit millisecond clocks.
"""

from __future__ import annotations

import pytest
import torch

from chainfed.coordinator.chain_state import ChainCoordinator
from chainfed.coordinator.config import CoordinatorConfig
from chainfed.proto.messages import (
    AgentCapabilities,
    ChainPhase,
    TaskKind,
    TrainingParams,
    UpdateMetrics,
)

NUM_LAYERS = 4
RANK, DIM, CLASSES = 2, 8, 3
MODULES = ("q_proj", "v_proj")
FINGERPRINT = "f" * 64


class ChainKit:
    """Builders for configs, agents, updates and whole rounds of a fake 4-layer model."""

    num_layers = NUM_LAYERS
    fingerprint = FINGERPRINT

    def config(self, **overrides: object) -> CoordinatorConfig:
        """A CoordinatorConfig for the fake model; start at layer 0, window 2 by default."""
        values: dict[str, object] = {
            "num_layers": NUM_LAYERS,
            "model_fingerprint": FINGERPRINT,
            "task": "classify",
            "params": TrainingParams(lora_rank=RANK),
            "start_layer": 0,
            "window": 2,
            "min_rounds": 1,
            "max_rounds": 1,
            "round_deadline_s": 60.0,
        }
        values.update(overrides)
        return CoordinatorConfig(**values)

    def coordinator(self, **overrides: object) -> ChainCoordinator:
        return ChainCoordinator(self.config(**overrides))

    def caps(
        self,
        num_samples: int = 10,
        *,
        memory: int = 0,
        fingerprint: str = FINGERPRINT,
        max_window: int = 0,
        labels: tuple[str, ...] = (),
    ) -> AgentCapabilities:
        return AgentCapabilities(
            "cpu", memory, num_samples, "0.1.0", fingerprint, max_window, labels
        )

    def metrics(
        self, val_loss: float = 1.0, *, train_samples: int = 10, val_samples: int = 5
    ) -> UpdateMetrics:
        return UpdateMetrics(
            train_samples=train_samples,
            val_samples=val_samples,
            steps=3,
            train_loss=val_loss + 0.1,
            val_loss=val_loss,
            val_metric=0.5,
            peak_memory_bytes=1000,
            seconds=0.1,
        )

    def eval_metrics(self, val_loss: float = 0.4, *, val_samples: int = 5) -> UpdateMetrics:
        return UpdateMetrics(10, val_samples, 0, 0.0, val_loss, 0.8, 0, 0.1)

    def update(
        self, window: list[int] | tuple[int, ...], stage_layer: int, seed: int
    ) -> dict[str, torch.Tensor]:
        """What an agent uploads after a round of the stage at ``stage_layer``."""
        g = torch.Generator().manual_seed(seed)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g) * 0.1

        tensors: dict[str, torch.Tensor] = {}
        for i in window:
            for module in MODULES:
                tensors[f"layers.{i}.{module}.lora_a"] = randn(RANK, DIM)
                tensors[f"layers.{i}.{module}.lora_b"] = randn(DIM, RANK)
        tensors["objective.head.weight"] = randn(CLASSES, DIM)
        tensors["objective.head.bias"] = randn(CLASSES)
        for j in range(stage_layer + 1, NUM_LAYERS):
            tensors[f"foresight.proxies.{j}.down"] = randn(RANK, DIM)
            tensors[f"foresight.proxies.{j}.up"] = randn(DIM, RANK)
        return tensors

    def register(self, c: ChainCoordinator, *agents: str, now: int = 0, **caps_kw) -> None:
        for agent in agents:
            c.register(agent, self.caps(**caps_kw), now)
        c.tick(now)

    def train_round(
        self,
        c: ChainCoordinator,
        now: int,
        *,
        losses: dict[str, float] | None = None,
        seed: int = 0,
    ) -> dict[str, tuple[UpdateMetrics, dict[str, torch.Tensor]]]:
        """Every selected agent fetches its task and answers; returns what was sent.

        ``losses`` gives each agent's validation loss (default 1.0 for all)."""
        c.tick(now)
        r = c.open_round
        assert r is not None and c.phase is ChainPhase.TRAINING, c.phase
        sent = {}
        for k, agent in enumerate(sorted(r.participants)):
            task = c.next_task(agent, now)
            assert task.kind is TaskKind.TRAIN_ROUND and task.round_id == r.round_id
            tensors = self.update(task.window_layers, task.stage_layer, seed * 100 + k)
            m = self.metrics((losses or {}).get(agent, 1.0), train_samples=10 * (k + 1))
            assert c.submit(agent, task.round_id, m, tensors, now + 1)
            sent[agent] = (m, tensors)
        return sent


@pytest.fixture
def kit() -> ChainKit:
    return ChainKit()
