"""``chainfed train``, ``simulate`` and ``coordinator`` take the local training options
(``chainfed.proto.local_training_options``) under the same names, and each value reaches
what trains: the ``ChainConfig`` of ``train``, and through ``simulate``'s coordinator
command line the coordinator's options."""

from __future__ import annotations

import argparse

import pytest

from chainfed.agent.app.options import (
    add_simulation_arguments,
    chain_config_from_args,
    simulation_config_from_args,
)
from chainfed.agent.app.simulation import coordinator_argv
from chainfed.agent.app.train_command import add_arguments as add_train_arguments
from chainfed.agent.cli import build_parser
from chainfed.coordinator.command import add_arguments as add_coordinator_arguments
from chainfed.proto.local_training_options import (
    LocalTrainingDefaults,
    add_local_training_arguments,
)

VALUES = {
    "lr": 0.002,
    "weight_decay": 0.01,
    "micro_batch": 8,
    "grad_accum": 2,
    "rank": 4,
    "alpha": 8.0,
    "targets": "qv",
    "lora_dropout": 0.1,
    "backbone_dropout": 0.05,
}
FLAGS = [x for name, v in VALUES.items() for x in (f"--{name.replace('_', '-')}", str(v))]


def parser_of(add) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser


def options_of(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    """The local training options ``parser`` declares: flags -> (dest, type, choices, help
    without its default)."""
    return {
        tuple(a.option_strings): (a.dest, a.type, a.choices, a.help.split(" (default")[0])
        for a in parser._actions
        if a.dest in VALUES
    }


def test_every_command_declares_the_same_options():
    shared = options_of(parser_of(add_local_training_arguments))
    assert len(shared) == len(VALUES)
    for add in (add_train_arguments, add_simulation_arguments, add_coordinator_arguments):
        assert options_of(parser_of(add)) == shared


def test_train_values_reach_the_chain_config():
    parser = parser_of(add_train_arguments)
    config = chain_config_from_args(parser.parse_args(["--model", "minilm", *FLAGS]))
    lora = config.lora
    assert (config.lr, config.weight_decay, config.micro_batch, config.grad_accum) == (
        0.002,
        0.01,
        8,
        2,
    )
    assert (lora.rank, lora.alpha, lora.targets, lora.dropout) == (4, 8.0, "qv", 0.1)
    assert config.backbone_dropout == 0.05


def test_simulate_values_reach_the_coordinator(tmp_path):
    args = build_parser(only="simulate").parse_args(["simulate", *FLAGS])
    config = simulation_config_from_args(args, tmp_path)
    assert {name: getattr(config, name) for name in VALUES} == VALUES
    coordinator = parser_of(add_coordinator_arguments).parse_args(
        ["--state-dir", "-", *coordinator_argv(config, 6)]
    )
    assert {name: getattr(coordinator, name) for name in VALUES} == VALUES


@pytest.mark.parametrize("name", sorted(VALUES))
def test_each_command_keeps_its_own_default(name):
    defaults = LocalTrainingDefaults(lr=5e-4, micro_batch=32)
    parser = argparse.ArgumentParser()
    add_local_training_arguments(parser, defaults)
    assert getattr(parser.parse_args([]), name) == getattr(defaults, name)


@pytest.mark.parametrize("value", ["0", "-1e-3", "nan", "inf", "fast"])
def test_every_command_refuses_a_learning_rate_that_is_not_above_zero(value, capsys):
    for add in (add_train_arguments, add_simulation_arguments, add_coordinator_arguments):
        with pytest.raises(SystemExit):
            parser_of(add).parse_args([f"--lr={value}"])
        error = capsys.readouterr().err
        assert f"argument --lr: must be a finite number above 0, got {value!r}" in error
