"""benchmarks/accuracy.py works end to end at tiny sizes (a smoke test, not a measurement).

Prepare: 2 agents, a few rows, one non-IID split, the chain from layer 4. Execute: the
benchmark's ``main``. Assert: chain, e2e and topk ran for the same number of rounds on
the layers each trains, the files exist, and the printed checks are computed from the
reported figures.
"""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def accuracy_benchmark(benchmark_script):
    return benchmark_script("accuracy")


def test_accuracy_benchmark_tiny(accuracy_benchmark, tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    argv = ["--splits", "dirichlet:0.5", "--agents", "2", "--train-rows", "40"]
    argv += ["--val-rows", "20", "--test-rows", "20", "--max-len", "24", "--local-steps", "2"]
    argv += ["--micro-batch", "8", "--start-layer", "4", "--max-rounds-per-layer", "1"]
    argv += ["--gpo", "exact:all", "--gpo-lambda", "2", "--out", str(tmp_path)]
    try:
        assert accuracy_benchmark.main(argv) == 0
    finally:
        torch.set_num_threads(threads)

    report = json.loads((tmp_path / "accuracy.json").read_text())
    rows = {r["mode"]: r for r in report["rows"]}
    assert set(rows) == {"chain", "e2e", "topk:2"}
    chain_config = report["runs"]["dirichlet:0.5"]["chain"]["config"]
    assert (chain_config["gpo"], chain_config["gpo_lambda"]) == ("exact:all", 2.0)
    assert rows["chain"]["rounds"] == rows["e2e"]["rounds"] == rows["topk:2"]["rounds"] == 2
    assert rows["chain"]["trained_layers"] == [4, 5]
    assert rows["e2e"]["trained_layers"] == list(range(6))
    assert rows["topk:2"]["trained_layers"] == [4, 5]
    assert rows["e2e"]["bytes_per_agent_round"] > rows["topk:2"]["bytes_per_agent_round"] > 0
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows.values())
    # the verdicts follow from the figures in the same report
    by_check = {c["check"]: c["holds"] for c in report["checks"]}
    assert by_check["chain test accuracy > topk:2"] == (
        rows["chain"]["test_accuracy"] > rows["topk:2"]["test_accuracy"]
    )
    assert by_check["chain bytes per agent per round <= e2e / L (L=6)"] == (
        rows["chain"]["bytes_per_agent_round"] <= rows["e2e"]["bytes_per_agent_round"] / 6
    )
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    markdown = (tmp_path / "accuracy.md").read_text()
    assert "| dirichlet:0.5 | chain | 2 |" in markdown
    assert markdown in capsys.readouterr().out
