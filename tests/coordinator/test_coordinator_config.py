"""``chainfed coordinator`` flags -> ``CoordinatorConfig``: what the agents are told to train.

``--aggregation ffa`` keeps one shared, seeded A and averages B, so it must tell every
agent to leave A frozen; otherwise each agent trains its own A and FFA's aggregation
refuses the first round ("differs from agent ..."). Other strategies train A.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

from chainfed.agent.convert.synthetic_checkpoint import write_random_checkpoint
from chainfed.agent.runtime.model import StreamingModel
from chainfed.coordinator.command import add_arguments, coordinator_config
from chainfed.coordinator.config import CoordinatorConfig
from chainfed.proto.errors import ChainFedError

TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "vocab_size": 50,
    "max_position_embeddings": 16,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}


def configured(tmp_path: Path) -> tuple[argparse.ArgumentParser, Callable[..., CoordinatorConfig]]:
    """The coordinator's parser and ``config(*flags)``: the ``CoordinatorConfig`` those
    flags give for a tiny BERT written under ``tmp_path``."""
    spec = StreamingModel(write_random_checkpoint(TINY_BERT, tmp_path / "model")).spec()
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def config(*argv: str) -> CoordinatorConfig:
        return coordinator_config(
            parser.parse_args(["--state-dir", "-", "--token", "-", *argv]), spec
        )

    return parser, config


@pytest.mark.parametrize(
    ("aggregation", "train_a"), [("ffa", False), ("fedavg", True), ("svd", True)]
)
def test_ffa_tells_the_agents_to_keep_a_frozen(tmp_path: Path, aggregation: str, train_a: bool):
    _, configure = configured(tmp_path)

    config = configure("--aggregation", aggregation)

    assert config.aggregation == aggregation
    assert config.params.lora_train_a is train_a


def test_local_epochs_reach_the_agents_and_bad_values_are_named(tmp_path: Path):
    _, configure = configured(tmp_path)

    def params(*argv: str):
        return configure(*argv).params

    assert params().local_epochs == 0.0
    assert params("--local-epochs", "1.5").local_epochs == 1.5
    assert (params().weight_decay, params().lora_dropout) == (0.0, 0.0)
    tuned = params("--weight-decay", "0.01", "--lora-dropout", "0.05")
    assert (tuned.weight_decay, tuned.lora_dropout) == (0.01, 0.05)
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        params("--lora-dropout", "1")
    with pytest.raises(ValueError, match="weight_decay"):
        params("--weight-decay", "-0.1")
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ValueError, match="local_epochs"):
            params("--local-epochs", bad)


def test_round_budget_and_head_rounds_reach_the_config_and_bad_values_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    parser, config = configured(tmp_path)

    plain = config()
    assert (plain.round_budget, plain.head_rounds, plain.max_rounds) == (None, 0, 3)
    # a budget lifts the flat per-stage cap (its share decides) unless one is given
    budget = config("--rounds", "12", "--head-rounds", "2", "--head-local-steps", "50")
    assert (budget.round_budget, budget.head_rounds, budget.max_rounds) == (12, 2, 12)
    assert (budget.head_local_steps, plain.head_local_steps) == (50, None)
    assert config("--rounds", "12", "--max-rounds-per-layer", "4").max_rounds == 4
    with pytest.raises(ValueError, match=r"\(5 needed\)"):
        config("--start-layer", "0", "--rounds", "4", "--head-rounds", "3")
    for flag, bad, says in (
        ("--rounds", "0", "must be >= 1"),
        ("--head-rounds", "-1", "must be >= 0"),
        ("--head-local-steps", "0", "must be >= 1"),
        ("--rounds", "two", "not a whole number"),
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(["--state-dir", "-", flag, bad])
        assert says in capsys.readouterr().err
    text = parser.format_help()
    assert "--rounds" in text and "--head-rounds" in text and "head-only rounds" in text
    assert "--head-local-steps" in text


def test_closed_form_head_reaches_the_config_and_is_refused_where_it_cannot_solve(
    tmp_path: Path,
):
    parser, config = configured(tmp_path)

    assert config().closed_form_head == "off"
    assert config("--closed-form-head").closed_form_head == "end"
    assert config("--closed-form-head", "both").closed_form_head == "both"
    with pytest.raises(ValueError, match="fedavg or ffa"):
        config("--closed-form-head", "--aggregation", "trimmed-mean")
    assert "statistics of their training rows' final features" in " ".join(
        parser.format_help().split()
    )


def test_evaluation_agents_reach_the_config_and_a_negative_count_is_named(tmp_path: Path):
    parser, config = configured(tmp_path)

    assert config().evaluation_agents == 0
    assert config("--evaluation-agents", "100").evaluation_agents == 100
    with pytest.raises(ValueError, match="evaluation agents must be >= 0"):
        config("--evaluation-agents", "-1")
    assert "every active agent" in parser.format_help()


def test_poll_seconds_is_a_positive_number_of_seconds():
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    assert parser.parse_args(["--state-dir", "s"]).poll_seconds == 10.0
    assert parser.parse_args(["--state-dir", "s", "--poll-seconds", "30"]).poll_seconds == 30.0
    for bad in ("0", "-1", "inf", "soon"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--state-dir", "s", "--poll-seconds", bad])


def test_e2e_streamed_reaches_the_agents_only_with_the_e2e_layout(tmp_path: Path):
    parser, configure = configured(tmp_path)

    def params(*argv: str):
        return configure(*argv).params

    assert params("--start-layer", "0", "--window", "2").e2e_streamed is False
    assert params("--start-layer", "0", "--window", "2", "--e2e-streamed").e2e_streamed is True
    for layout in (["--start-layer", "1", "--window", "1"], ["--window", "2"]):
        with pytest.raises(ChainFedError, match="--e2e-streamed needs the e2e layout"):
            params(*layout, "--e2e-streamed")
    assert "one block's weight memory" in " ".join(parser.format_help().split())
