"""Where adapters go: the ``qv`` / ``attention`` / ``all`` target sets.

Prepare: a tiny random BERT and LLaMA checkpoint.
Execute: wrap block 0 with each target set; parse the commands' ``--targets``.
Assert: each set adapts exactly its modules in both families, an unknown name is refused,
and ``qv`` reaches the coordinator's round parameters from ``chainfed simulate``.
"""

from __future__ import annotations

import argparse

import pytest
from torch import nn

from chainfed.agent.app.options import SimulationConfig
from chainfed.agent.app.simulation import coordinator_argv
from chainfed.agent.runtime.lora import LoRAConfig, add_lora
from chainfed.agent.runtime.model import StreamingModel
from chainfed.coordinator.command import add_arguments, coordinator_config
from chainfed.kernels import LoRALinear
from chainfed.proto.messages import ProtocolError, TrainingParams

EXPECTED = {
    "qv": ["q_proj", "v_proj"],
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("targets", ["qv", "attention", "all"])
def test_each_target_set_adapts_exactly_its_modules(tiny_models, family, targets):
    model = StreamingModel(
        tiny_models.checkpoint(family, hidden_size=32, num_hidden_layers=2, vocab_size=64)
    )
    block = model.load_block(0)
    linears = [name for name, m in block.named_children() if isinstance(m, nn.Linear)]

    wrapped = add_lora(block, 0, LoRAConfig(targets=targets))

    expected = EXPECTED.get(targets, linears)
    assert sorted(wrapped) == sorted(expected)
    adapted = [name for name, m in block.named_children() if isinstance(m, LoRALinear)]
    assert sorted(adapted) == sorted(expected)


def test_an_unknown_target_set_is_refused():
    with pytest.raises(ValueError, match="qv, attention, all"):
        LoRAConfig(targets="query")
    with pytest.raises(ProtocolError, match="lora_targets must be one of qv, attention, all"):
        TrainingParams(lora_targets="query")


def test_simulate_targets_reach_the_round_params(minilm_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = SimulationConfig(mode="e2e", targets="qv")
    args = parser.parse_args(["--state-dir", "-", "--token", "-", *coordinator_argv(config, 6)])

    params = coordinator_config(args, StreamingModel(minilm_path).spec()).params

    assert params.lora_targets == "qv"
