"""benchmarks/load.py end to end at toy scale, and its lost/double-counted check.

The smoke runs are the real thing at 20 agents × 2 rounds (every agent in every round) and
30 agents with 10 sampled per round: a ``chainfed coordinator`` process, two processes of
synthetic agents, real gRPC on localhost. The check is then fed doctored histories to show
that it catches what it claims to catch.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "load.py"
KEYS = {
    "agents",
    "rounds",
    "accepted",
    "aggregated",
    "lost",
    "double_counted",
    "rounds_per_s",
    "p50_ms",
    "p99_ms",
    "coordinator_peak_rss_bytes",
}


@pytest.fixture(scope="module")
def load(benchmark_script):
    return benchmark_script("load")


def test_load_benchmark_smoke(tmp_path):
    out = tmp_path / "load.json"
    argv = [sys.executable, str(BENCHMARK), "--agents", "20", "--rounds", "2", "--json", str(out)]
    argv += ["--processes", "2", "--start-spread", "0.5", "--timeout", "150"]
    argv += ["--workdir", str(tmp_path / "run")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr

    result = json.loads(out.read_text())
    assert KEYS <= set(result)
    assert result["agents"] == 20 and result["rounds"] == 2
    assert result["accepted"] == result["aggregated"] == 40
    assert result["lost"] == result["double_counted"] == result["unexpected"] == 0
    assert result["phase"] == "done" and result["agent_error_count"] == 0
    assert result["rounds_per_s"] > 0 and 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["coordinator_peak_rss_bytes"] > 50 * 2**20  # torch alone is more
    assert result["rpc"]["SubmitUpdate"]["calls"] == 60  # 2 rounds + the evaluation
    assert result["rpc"]["Register"]["calls"] == 20
    state = json.loads((tmp_path / "run" / "state" / "state.json").read_text())
    assert [len(r["participants"]) for r in state["history"]] == [20, 20, 20]  # + evaluation


def test_load_benchmark_samples_agents_per_round_and_for_the_evaluation(tmp_path):
    out = tmp_path / "load.json"
    argv = [sys.executable, str(BENCHMARK), "--agents", "30", "--agents-per-round", "10"]
    argv += [
        "--evaluation-agents",
        "5",
        "--rounds",
        "2",
        "--processes",
        "2",
        "--start-spread",
        "0.5",
        "--timeout",
        "150",
    ]
    argv += ["--json", str(out), "--workdir", str(tmp_path / "run")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr

    result = json.loads(out.read_text())
    assert result["agents"] == 30 and result["agents_per_round"] == 10 and result["rounds"] == 2
    assert result["evaluation_agents"] == 5
    assert result["accepted"] == result["aggregated"] == 20  # only the sampled uploaded
    assert result["lost"] == result["double_counted"] == result["unexpected"] == 0
    assert result["phase"] == "done" and result["agent_error_count"] == 0
    assert result["rpc"]["Register"]["calls"] == 30
    assert result["rpc"]["SubmitUpdate"]["calls"] == 20 + 5  # + the sampled evaluations
    assert result["coordinator_peak_open_files"] >= 30  # a connection per agent
    assert result["coordinator_peak_threads"] > 1
    state = json.loads((tmp_path / "run" / "state" / "state.json").read_text())
    rounds = state["history"]
    assert [len(r["participants"]) for r in rounds] == [10, 10, 5]
    assert len(set(rounds[0]["participants"]) | set(rounds[1]["participants"])) > 10


def test_file_limit_is_raised_for_the_agents_or_refused(load):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        assert load.raise_file_limit(10) == hard or hard == resource.RLIM_INFINITY
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
        if hard != resource.RLIM_INFINITY:
            with pytest.raises(SystemExit, match="file descriptors"):
                load.raise_file_limit(hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_chain_plan_gives_at_least_the_rounds_asked(load):
    for layers in (6, 12, 30):
        for rounds in (1, 2, 5, 20, 37):
            start, per_layer = load.chain_plan(layers, rounds)
            total = (layers - start) * per_layer
            assert 0 <= start < layers and rounds <= total < rounds + per_layer


def record(round_id, pairs):
    return {
        "round_id": round_id,
        "participants": [a for a, _ in pairs],
        "update_digests": [d for _, d in pairs],
    }


def sent(agent, round_id, digest, accepted=True):
    return {"agent_id": agent, "round_id": round_id, "digest": digest, "accepted": accepted}


def test_check_counts_lost_double_counted_and_unexpected_updates(load):
    submissions = [
        sent("a", "r1", "a1"),
        sent("b", "r1", "b1"),
        sent("a", "r2", "a2"),
        sent("b", "r2", "b2"),
        sent("c", "r2", "c2", accepted=False),
    ]
    clean = [record("r1", [("a", "a1"), ("b", "b1")]), record("r2", [("a", "a2"), ("b", "b2")])]
    counts = load.check_updates(clean + [record("eval3", [])], submissions)
    assert counts == {
        "accepted": 4,
        "aggregated": 4,
        "lost": 0,
        "double_counted": 0,
        "unexpected": 0,
        "ambiguous_aggregated": 0,
        "rejected": 1,
        "training_rounds": 2,
    }

    lost = [clean[0], record("r2", [("a", "a2")])]
    assert load.check_updates(lost, submissions)["lost"] == 1
    twice = [*clean, record("r3", [("b", "b1")])]
    assert load.check_updates(twice, submissions)["double_counted"] == 1
    same_round = [clean[0], record("r2", [("a", "a2"), ("b", "b2"), ("b", "b2")])]
    assert load.check_updates(same_round, submissions)["double_counted"] == 1
    foreign = [clean[0], record("r2", [("a", "a2"), ("b", "b2"), ("c", "c2")])]
    assert load.check_updates(foreign, submissions)["unexpected"] == 1
