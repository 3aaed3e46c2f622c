"""benchmarks/same_draw.py and reference_fedavg.py: the draws are the ones each loop uses.

Prepare: the packaged corpus. Execute: the reference's draw as ``same_draw`` rebuilds it,
our draw of a seed as ``dump`` writes it, and (slow) one short round of ours on the
reference's draw. Assert: the reference's draw has the shard sizes and label counts its own
run recorded (``shared/peers/flower-fedavg/flower_fedavg_dirichlet.json``: ``shard_rows``,
``shard_label_counts``); ours has the shards and skew that ``chainfed simulate`` gives its
agents, and no test row among them; ours on the reference's draw trains its four clients
on those shards and scores the reference's 2,000 test rows; ``--pooled`` trains one agent on
all 8,000 pool rows.
"""

from __future__ import annotations

import copy
import json

import pytest

from chainfed.agent.app.simulation import load_corpus, split_label_skew
from chainfed.agent.training.partition import shard_of

REFERENCE_SHARD_ROWS = [1960, 1114, 4058, 868]
REFERENCE_LABEL_COUNTS = [[64, 1890, 6], [501, 6, 607], [2737, 483, 838], [34, 805, 29]]


@pytest.fixture(scope="module")
def same_draw(benchmark_script):
    return benchmark_script("same_draw")


def test_the_reference_draw_is_the_one_its_run_recorded(same_draw):
    test, pool, val, parts = same_draw.reference_draw()

    assert (len(test), len(pool), len(val)) == (2000, 8000, 200)
    assert [len(p) for p in parts] == REFERENCE_SHARD_ROWS
    counts = [[sum(1 for j in p if pool[j][1] == c) for c in range(3)] for p in parts]
    assert counts == REFERENCE_LABEL_COUNTS
    assert sorted(j for p in parts for j in p) == list(range(8000))


def test_dump_writes_the_shards_simulate_gives_its_agents(same_draw, tmp_path):
    out = tmp_path / "draw1.json"

    assert same_draw.main(["dump", "--seed", "1", "--json", str(out)]) == 0

    draw = json.loads(out.read_text())
    config = same_draw.protocol(1, 1, 0, None)
    corpus = load_corpus(config)
    assert draw["label_skew"] == pytest.approx(split_label_skew(corpus, config))
    assert sum(len(s) for s in draw["shards"]) == 8000
    assert len(draw["test"]) == 2000
    assert {t for t, _ in draw["test"]}.isdisjoint(t for s in draw["shards"] for t, _ in s)
    first = shard_of(copy.copy(corpus.data), "0/4", config.split, 1).train
    assert [[e.text, e.label] for e in first] == draw["shards"][0]


def test_the_reference_loop_names_a_missing_task_module(benchmark_script, tmp_path):
    reference = benchmark_script("reference_fedavg")

    with pytest.raises(SystemExit, match="task.py is not importable"):
        reference.main([str(tmp_path / "draw.json"), "--json", str(tmp_path / "out.json")])


def test_ours_runs_the_protocol_at_the_lr_it_is_given(same_draw):
    argv = ["ours", "--mode", "chain", "--closed-form-head", "end", "--seed", "2"]
    default = same_draw.ours_config(same_draw.parse_args([*argv, "--json", "o.json"]))
    faster = same_draw.ours_config(
        same_draw.parse_args([*argv, "--lr", "1e-3", "--json", "o.json"])
    )

    assert default.lr == 5e-4
    assert faster.lr == 1e-3
    assert (faster.mode, faster.closed_form_head, faster.seed) == ("chain", "end", 2)
    assert {**vars(faster), "lr": default.lr} == vars(default)


def test_ours_takes_every_simulate_mode_and_names_a_wrong_one(same_draw, capsys):
    argv = ["ours", "--seed", "1", "--json", "o.json", "--mode"]

    assert same_draw.ours_config(same_draw.parse_args([*argv, "topk:2"])).mode == "topk:2"
    with pytest.raises(SystemExit):
        same_draw.parse_args([*argv, "topk:0"])
    assert (
        "mode must be chain, e2e, e2e-streamed or topk:K; got 'topk:0'" in capsys.readouterr().err
    )


def test_pooled_gives_the_protocol_one_agent_and_changes_nothing_else(same_draw):
    argv = ["ours", "--mode", "e2e", "--rounds", "4", "--seed", "1", "--json", "o.json"]
    federated = same_draw.ours_config(same_draw.parse_args(argv))
    pooled = same_draw.ours_config(same_draw.parse_args([*argv, "--pooled"]))

    assert (federated.agents, pooled.agents) == (4, 1)
    assert {**vars(pooled), "agents": 4} == vars(federated)


def test_the_reference_draw_has_no_split_for_other_agent_counts(same_draw):
    config = same_draw.protocol(0, 1, 1, None, agents=3)

    with pytest.raises(ValueError, match="4 clients or 1, not 3"):
        same_draw.run_ours_on_reference_draw(config)


def test_ours_refuses_a_learning_rate_that_is_not_positive(same_draw, capsys):
    with pytest.raises(SystemExit):
        same_draw.parse_args(["ours", "--lr", "0", "--json", "o.json"])

    assert "--lr: must be a finite number above 0, got '0'" in capsys.readouterr().err


@pytest.mark.slow
def test_ours_trains_on_the_reference_shards_and_scores_its_test_rows(same_draw, tmp_path):
    out = tmp_path / "ours.json"
    argv = ["ours", "--rounds", "1", "--local-steps", "1", "--workdir", str(tmp_path / "run")]

    assert same_draw.main([*argv, "--json", str(out)]) == 0

    result = json.loads(out.read_text())
    assert sorted(result["agent_samples"].values()) == sorted(REFERENCE_SHARD_ROWS)
    assert result["label_skew"] == pytest.approx(0.392, abs=5e-4)
    assert 0.0 <= result["test_metric"] <= 1.0
    assert len(result["history"]) == 1


@pytest.mark.slow
def test_pooled_trains_one_agent_on_the_whole_pool(same_draw, tmp_path):
    out = tmp_path / "pooled.json"
    argv = ["ours", "--pooled", "--rounds", "1", "--local-steps", "1"]

    assert same_draw.main([*argv, "--workdir", str(tmp_path / "run"), "--json", str(out)]) == 0

    result = json.loads(out.read_text())
    assert result["agent_samples"] == {"agent-0": 8000}
    assert result["label_skew"] == 0.0
    assert 0.0 <= result["test_metric"] <= 1.0
