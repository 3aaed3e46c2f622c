"""benchmarks/accuracy.py works end to end at tiny sizes (a smoke test, not a measurement).

Prepare: 2 agents, a few rows, one non-IID split, the chain from layer 4, 2 seeds, 2
rounds. Execute: the benchmark's ``main`` (the real simulation, every mode). Assert: every
federated mode ran the same rounds on the layers it trains; its curve is the per-round
test accuracy with bytes and device-seconds cumulative and increasing; the seed means, the
standard errors, the equal-budget readings, the cost to target and the checks are
computed from the per-seed figures of the same report.
"""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout

import pytest
import torch

SPLIT = "dirichlet:0.5"
MODES = ("chain", "e2e", "topk:2")
TARGET = 0.5


@pytest.fixture(scope="module")
def accuracy_benchmark(benchmark_script):
    return benchmark_script("accuracy")


@pytest.fixture(scope="module")
def report(accuracy_benchmark, tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    argv = ["--splits", SPLIT, "--seeds", "0,1", "--rounds", "2", "--agents", "2"]
    argv += ["--train-rows", "40", "--val-rows", "20", "--test-rows", "20", "--max-len", "24"]
    argv += ["--micro-batch", "8", "--start-layer", "4", "--target", str(TARGET)]
    argv += ["--head-fit-epochs", "2", "--targets", "qv", "--weight-decay", "0.01"]
    argv += ["--out", str(out)]
    try:
        with redirect_stdout(io.StringIO()) as printed:
            assert accuracy_benchmark.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    (out / "printed.txt").write_text(printed.getvalue())
    return out, json.loads((out / "accuracy.json").read_text()), argv


def mean_se(values):
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return pytest.approx([mean, math.sqrt(var / len(values))])


def test_every_mode_runs_the_same_rounds_and_its_curve_is_cumulative(report):
    _, data, _ = report
    runs = data["runs"][SPLIT]
    assert set(runs) == set(MODES)
    layers = {"chain": {4, 5}, "e2e": set(range(6)), "topk:2": {4, 5}}
    for mode, seeds in runs.items():
        assert len(seeds) == 2
        for run in seeds:
            curve, history = run["curve"], run["result"]["history"]
            config = run["result"]["config"]
            assert (config["targets"], config["weight_decay"]) == ("qv", 0.01)
            assert len(history) == len(curve["accuracy"]) == 2  # R = 2 for every mode
            assert {layer for e in history for layer in e["window"]} == layers[mode]
            assert curve["accuracy"] == [e["test_metric"] for e in history]
            spent = seconds = 0.0
            for i, e in enumerate(history):
                assert sorted(e["participants"]) == ["agent-0", "agent-1"]
                spent += sum(e["sent_bytes"][a] + e["received_bytes"][a] for a in e["participants"])
                seconds += sum(e["compute_seconds"].values())
                assert curve["bytes"][i] == pytest.approx(spent / 2)
                assert curve["seconds"][i] == pytest.approx(seconds / 2)
            assert 0 < curve["bytes"][0] < curve["bytes"][1]
            assert 0 < curve["seconds"][0] < curve["seconds"][1]


def test_every_run_prints_its_rounds_as_they_close(report):
    out, _, _ = report
    lines = (out / "printed.txt").read_text().splitlines()
    for mode in MODES:
        for seed in (0, 1):
            name = f"{SPLIT} {mode} seed {seed}: "
            rounds = [line for line in lines if line.startswith(name) and " round " in line]
            assert any("val accuracy" in line for line in rounds), (name, lines)
            assert any("global model on the test rows" in line for line in rounds), (name, lines)


def test_seed_means_and_standard_errors_come_from_the_per_seed_figures(report):
    _, data, _ = report
    summary = data["summaries"][SPLIT]
    for mode in MODES:
        curves = [run["curve"] for run in data["runs"][SPLIT][mode]]
        for axis in ("accuracy", "bytes", "seconds"):
            for r in range(2):
                aggregate = summary["curves"][mode][axis]
                values = [c[axis][r] for c in curves]
                assert [aggregate["mean"][r], aggregate["se"][r]] == mean_se(values)
        assert summary["at_rounds"][mode]["2"] == mean_se([c["accuracy"][1] for c in curves])
    heads = [data["head"][seed]["test_accuracy"] for seed in ("0", "1")]
    assert all(0 <= h <= 1 for h in heads)
    fits = [data["head"][seed] for seed in ("0", "1")]
    assert all(f["passes"] % 2 == 0 and isinstance(f["converged"], bool) for f in fits)
    assert summary["head"] == mean_se(heads)
    # a reference mode read at its own budget, seed by seed, is its own accuracy there
    for b in summary["at_budgets"]:
        if b["after"] == "round 2":
            assert b["accuracy"][b["reference"]] == summary["at_rounds"][b["reference"]]["2"]


def test_cost_to_target_follows_the_curves(report):
    _, data, _ = report
    for mode in MODES:
        reached = []
        for run in data["runs"][SPLIT][mode]:
            curve = run["curve"]
            hits = [i for i, a in enumerate(curve["accuracy"]) if a >= TARGET]
            if hits:
                i = hits[0]
                reached.append((i + 1, curve["bytes"][i], curve["seconds"][i]))
        summary = data["summaries"][SPLIT]["to_target"][mode]
        assert (summary["reached"], summary["seeds"]) == (len(reached), 2)
        for k, axis in enumerate(("rounds", "bytes", "seconds")):
            if reached:
                mean = sum(r[k] for r in reached) / len(reached)
                assert summary[axis][0] == pytest.approx(mean)
            else:
                assert summary[axis] is None


def test_checks_follow_from_the_reported_means_and_the_report_is_written(report):
    out, data, _ = report
    at = data["summaries"][SPLIT]["at_rounds"]
    head = data["summaries"][SPLIT]["head"][0]
    by_check = {c["check"]: c["holds"] for c in data["checks"]}
    assert by_check["R=2: chain > topk:2"] == (at["chain"]["2"][0] > at["topk:2"]["2"][0] + 1e-9)
    assert by_check["R=2: chain >= e2e - 1 point"] == (
        at["chain"]["2"][0] >= at["e2e"]["2"][0] - 0.01 - 1e-9
    )
    assert by_check["R=2: chain >= head + 5 points"] == (at["chain"]["2"][0] >= head + 0.05 - 1e-9)
    assert any(c.startswith("at equal device-seconds") for c in by_check)
    assert (out / "accuracy.png").stat().st_size > 0
    markdown = (out / "accuracy.md").read_text()
    assert f"| {SPLIT} | chain | {at['chain']['2'][0]:.4f} ± " in markdown
    assert "## Cost to target" in markdown


def test_the_same_command_reuses_the_saved_runs_and_refuses_other_settings(
    accuracy_benchmark, report, capsys
):
    out, data, argv = report
    capsys.readouterr()

    assert accuracy_benchmark.main(argv) == 0  # nothing runs again

    printed = capsys.readouterr().out
    assert printed.count("reused ") == 2 + 2 * len(MODES)  # 2 head fits, 6 federations
    again = json.loads((out / "accuracy.json").read_text())
    assert again["runs"] == data["runs"] and again["summaries"] == data["summaries"]
    with pytest.raises(SystemExit, match="holds a run with other settings"):
        accuracy_benchmark.main([*argv, "--lr", "0.01"])


def test_mode_lr_gives_only_the_named_mode_its_own_rate(accuracy_benchmark, report, capsys):
    out, _, argv = report
    capsys.readouterr()

    with pytest.raises(SystemExit, match="e2e-s0/run.json holds a run with other settings"):
        accuracy_benchmark.main([*argv, "--mode-lr", "e2e=0.01"])

    printed = capsys.readouterr().out
    assert printed.count("reused ") == 2 + 2  # the head fits and chain's seeds; e2e refused
    args = accuracy_benchmark.parse_args([*argv, "--mode-lr", "e2e=0.01,head=0.02"])
    assert [accuracy_benchmark.learning_rate(m, args) for m in ("chain", "e2e", "head")] == [
        args.lr,
        0.01,
        0.02,
    ]


@pytest.mark.parametrize(
    ("pair", "error"),
    [
        ("topk:3=0.01", "'topk:3' is not one of --modes"),
        ("e2e=0", "e2e=0: the learning rate must be a finite number above 0, got '0'"),
        ("e2e", "e2e: the learning rate must be a finite number above 0, got ''"),
    ],
)
def test_mode_lr_refuses_what_it_cannot_apply(accuracy_benchmark, pair, error):
    with pytest.raises(SystemExit, match=error):
        accuracy_benchmark.parse_args(["--modes", "chain,e2e,topk:2", "--mode-lr", pair])


def test_closed_form_head_gives_every_mode_a_fit_round_first_and_last(accuracy_benchmark, tmp_path):
    out = tmp_path / "closed"
    argv = ["--splits", SPLIT, "--seeds", "0", "--rounds", "1", "--agents", "2"]
    argv += ["--train-rows", "40", "--val-rows", "20", "--test-rows", "20", "--max-len", "24"]
    argv += ["--micro-batch", "8", "--start-layer", "5", "--modes", "chain,e2e"]
    argv += ["--head-fit-epochs", "1", "--closed-form-head", "both", "--out", str(out)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert accuracy_benchmark.main(argv) == 0
    finally:
        torch.set_num_threads(threads)

    data = json.loads((out / "accuracy.json").read_text())
    for mode in ("chain", "e2e"):
        (run,) = data["runs"][SPLIT][mode]
        history = run["result"]["history"]
        assert [e["head_fit"] for e in history] == [True, False, True]  # fit, round, refit
        assert len(run["curve"]["accuracy"]) == 3 and run["curve"]["bytes"][0] > 0
    fits = [data["runs"][SPLIT][m][0]["result"]["history"][0] for m in ("chain", "e2e")]
    assert fits[0]["test_metric"] == fits[1]["test_metric"]  # the same base model and head
    markdown = (out / "accuracy.md").read_text()
    assert "closed-form head fit rounds: first and last" in markdown
    # R = 1 is the training round (the fit before it is not one); the fit after it is its
    # own column, and the checks read both
    summary = data["summaries"][SPLIT]
    for mode in ("chain", "e2e"):
        accuracy = data["runs"][SPLIT][mode][0]["curve"]["accuracy"]
        assert summary["at_rounds"][mode]["1"][0] == accuracy[1]
        assert summary["after_fit"][mode][0] == accuracy[2]
    by_check = {c["check"]: c["holds"] for c in data["checks"]}
    chain, e2e = (summary["after_fit"][m][0] for m in ("chain", "e2e"))
    assert by_check["R=1 + fit: chain >= e2e - 1 point"] == (chain >= e2e - 0.01 - 1e-9)
    assert "R=1: chain >= e2e - 1 point" in by_check
    assert "| R = 1 | R = 1 + fit |" in markdown
    assert "chain after the fit:" not in markdown  # budgets: curves before their final fit
    assert markdown.count(accuracy_benchmark.BEFORE_THE_FIT) == 2


def test_equal_budgets_read_every_curve_before_its_final_fit(accuracy_benchmark):
    Curve = accuracy_benchmark.Curve  # noqa: N806
    fits = [False, False, True]
    chain = Curve([0.60, 0.62, 0.90], [1.0, 2.0, 2.5], [10.0, 20.0, 25.0], fits)
    e2e = Curve([0.65, 0.80, 0.85], [2.0, 4.0, 5.0], [20.0, 40.0, 50.0], fits)
    runs = {"chain": [chain], "e2e": [e2e]}
    summary = accuracy_benchmark.split_summary(runs, None, [2], 0.75)

    found = {c["check"]: c for c in accuracy_benchmark.checks("iid", runs, summary, "topk:2")}
    for axis in ("bytes", "seconds"):
        name = f"at equal {accuracy_benchmark.AXES[axis]}, before the final fit: chain > e2e"
        # the largest budget both unfitted curves cover is the chain's round 2, where e2e
        # has had one round; the chain's fitted 0.90 is not read against e2e's rounds
        assert found[name]["values"].endswith("0.6200 vs 0.6500")
        assert not found[name]["holds"]
    reads = {(b["axis"], b["reference"], b["after"]): b for b in summary["at_budgets"]}
    assert set(reads) == {(a, m, "round 2") for a in ("bytes", "seconds") for m in runs}
    assert reads["bytes", "chain", "round 2"]["accuracy"]["e2e"][0] == 0.65
    assert reads["bytes", "e2e", "round 2"]["accuracy"]["chain"] is None  # past its round 2


def test_a_run_saved_before_curves_recorded_their_fits_reads_them_from_its_history(
    accuracy_benchmark,
):
    history = [{"head_fit": fit} for fit in (True, False, False, True)]
    saved = {"curve": {"accuracy": [0.5, 0.6, 0.7, 0.8], "bytes": [1, 2, 3, 4]}, "result": {}}
    saved["curve"]["seconds"] = [1.0, 2.0, 3.0, 4.0]
    saved["result"]["history"] = history

    curve = accuracy_benchmark.saved_curve(saved)

    assert [curve.after_round(r) for r in (1, 2)] == [1, 2]
    assert curve.ends_in_fit
    saved["curve"]["head_fit"] = [False] * 4  # a newer save's own record wins
    assert not accuracy_benchmark.saved_curve(saved).ends_in_fit


def test_a_setting_added_since_a_run_was_saved_matches_only_at_its_default(accuracy_benchmark):
    same = accuracy_benchmark.same_settings
    saved = {"mode": "chain", "lr": 0.001}
    assert same(saved, {"mode": "chain", "lr": 0.001, "foat_readout_factor": 2.0})
    assert not same(saved, {"mode": "chain", "lr": 0.001, "foat_readout_factor": 3.0})
    assert not same(saved, {"mode": "chain", "lr": 0.001, "not_a_setting": 1})
    assert not same(saved, {"mode": "chain", "lr": 0.002, "foat_readout_factor": 2.0})
    assert not same(saved, {"mode": "chain"})  # a setting dropped


def test_a_half_written_saved_run_is_named_and_left_alone(accuracy_benchmark, tmp_path):
    path = tmp_path / "chain-s0" / "run.json"
    path.parent.mkdir()
    path.write_text('{"settings": {"mode": "chain"}, "figu')

    with pytest.raises(SystemExit, match="chain-s0/run.json is not a saved run .*delete it"):
        accuracy_benchmark.saved_or_run(path, {"mode": "chain"}, lambda: pytest.fail("ran"))

    assert path.read_text() == '{"settings": {"mode": "chain"}, "figu'
