"""benchmarks/dp.py works end to end on a tiny federation (a smoke test, not a measurement).

Prepare: two agents on a few tweets, one layer, one round. Execute: the benchmark's
``main`` at ε = 4 and ε = ∞. Assert: the report files exist; the finite run used the
noise multiplier the accountant calibrates for its rounds and stayed within its ε; the
∞ run used no noise.
"""

from __future__ import annotations

import json
import math

import pytest

from chainfed.coordinator.dp import epsilon_for


@pytest.fixture(scope="module")
def dp_benchmark(benchmark_script):
    return benchmark_script("dp")


def test_dp_benchmark_smoke(dp_benchmark, tmp_path):
    argv = ["--epsilons", "4,inf", "--agents", "2", "--train-rows", "16", "--val-rows", "4"]
    argv += ["--test-rows", "8", "--max-len", "16", "--local-steps", "1", "--micro-batch", "4"]
    argv += ["--rounds-per-layer", "1", "--start-layer", "5", "--out", str(tmp_path)]

    assert dp_benchmark.main(argv) == 0

    report = json.loads((tmp_path / "dp.json").read_text())
    finite, infinite = report["rows"]
    assert finite["target_epsilon"] == 4 and finite["rounds"] == finite["planned_rounds"] == 1
    z = finite["noise_multiplier"]
    assert finite["epsilon_spent"] == pytest.approx(epsilon_for([(z, 1.0, 1)], 1e-5))
    assert finite["epsilon_spent"] <= 4 < epsilon_for([(z * 0.99, 1.0, 1)], 1e-5)
    assert math.isinf(infinite["target_epsilon"]) and infinite["noise_multiplier"] is None
    for row in report["rows"]:
        assert 0 <= row["test_accuracy"] <= 1
    markdown = (tmp_path / "dp.md").read_text()
    assert "| 4 |" in markdown and "| inf |" in markdown
    assert dp_benchmark.parse_epsilons("1, 4,inf") == [1.0, 4.0, math.inf]
    with pytest.raises(Exception, match="epsilons"):
        dp_benchmark.parse_epsilons("0,1")
