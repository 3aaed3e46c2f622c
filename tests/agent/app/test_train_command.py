"""``chainfed train`` end to end: the packaged MiniLM on the packaged tweets (a subprocess,
the real console script), its report, table and adapter file, and ``--eval-only``
reproducing the final figures bit for bit; an LM smoke run on a tiny random LLaMA with a
word-level tokenizer (in-process).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from chainfed.agent.app import train_command
from chainfed.agent.app.options import SimulationConfig, chain_config_from_args, data_config
from chainfed.agent.app.simulation import load_rows
from chainfed.agent.app.train_command import add_arguments, stage_table
from chainfed.agent.cli import main
from chainfed.agent.convert.synthetic_checkpoint import write_random_checkpoint
from chainfed.agent.errors import ChainFedError
from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.chain import evaluate_streaming, pooled_features_streaming
from chainfed.agent.training.data import DataConfig, load_dataset
from chainfed.agent.training.objectives import build_objective
from chainfed.agent.training.tokenize import encode_split, label_token_ids
from chainfed.proto.adapter_file import load_adapter_file
from chainfed.proto.closed_form_head import head_statistics, solve_head

# The issue's tiny run, plus --max-len 32 to keep it quick on two cores.
TINY_RUN = ["--train-rows", "200", "--val-rows", "100", "--steps-per-round", "5"]
TINY_RUN += ["--max-rounds", "1", "--max-len", "32", "--quiet"]
REPORT_KEYS = {"mode", "model", "task", "start_layer", "stages", "final", "adapters"}
STAGE_KEYS = {"layer", "window", "steps", "train_loss", "val_loss", "val_metric"}
STAGE_KEYS |= {"peak_mem_bytes", "baseline_mem_bytes", "seconds"}
FINAL_LINE = re.compile(r"^final: val metric \S+, val loss \S+$", re.MULTILINE)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One real ``chainfed train`` (FOAT start, Q=2, proxy GPO): (workdir, stdout)."""
    workdir = tmp_path_factory.mktemp("minilm") / "run"
    result = subprocess.run(
        ["chainfed", "train", *TINY_RUN, "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # tiny batches: threads only contend
    )
    assert result.returncode == 0, result.stderr
    return workdir, result.stdout


def test_report_has_the_issue_keys(minilm_run, minilm_path):
    workdir, _ = minilm_run
    report = json.loads((workdir / "report.json").read_text())

    assert REPORT_KEYS <= report.keys()
    assert (report["mode"], report["task"]) == ("chain", "classify")
    assert Path(report["model"]) == minilm_path
    assert set(report["final"]) == {"val_metric", "val_loss"}
    assert Path(report["adapters"]).is_file()
    stages = report["stages"]
    s = report["start_layer"]
    assert [stage["layer"] for stage in stages] == list(range(s, 6))
    for stage in stages:
        assert STAGE_KEYS <= stage.keys()
        assert stage["window"] == list(range(max(s, stage["layer"] - 1), stage["layer"] + 1))
        assert stage["steps"] == 5
        assert 0.0 <= stage["val_metric"] <= 1.0
        assert stage["peak_mem_bytes"] >= stage["baseline_mem_bytes"] > 0
    # FOAT chose the start: the first layer whose score is below 0.8
    assert report["foat_scores"] and len(report["foat_scores"]) == 6
    assert s == next((i for i, x in enumerate(report["foat_scores"]) if x < 0.8), 5)


def test_final_figures_are_the_last_stage_figures(minilm_run):
    """The last stage's window output is the whole network, and the trainer evaluates in
    batches of 16 × 4 = 64 like the final streamed evaluation: the figures are equal."""
    workdir, _ = minilm_run
    report = json.loads((workdir / "report.json").read_text())
    last = report["stages"][-1]
    assert report["final"] == {"val_metric": last["val_metric"], "val_loss": last["val_loss"]}


def test_stdout_has_the_stage_table_and_the_final_line(minilm_run):
    workdir, out = minilm_run
    report = json.loads((workdir / "report.json").read_text())
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| layer | window |"))
    assert lines[header + 1].startswith("|---:|")
    rows = lines[header + 2 : header + 2 + len(report["stages"])]
    assert lines[header : header + 2 + len(rows)] == stage_table(report["stages"]).splitlines()
    for row, stage in zip(rows, report["stages"], strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == str(stage["layer"])
        assert cells[1] == f"{stage['window'][0]}-{stage['window'][-1]}"
    final = report["final"]
    assert f"final: val metric {final['val_metric']:.4f}, val loss {final['val_loss']:.6f}" in out


def test_adapter_file_holds_the_chain_and_the_head(minilm_run):
    workdir, _ = minilm_run
    report = json.loads((workdir / "report.json").read_text())
    saved = load_adapter_file(Path(report["adapters"]))

    layers = {int(name.split(".")[1]) for name in saved.adapters()}
    assert layers == set(range(report["start_layer"], 6))
    assert set(saved.head()) == {"weight", "bias"}
    assert saved.head()["weight"].shape == (3, 384)
    assert saved.info["task"] == "classify"
    assert saved.info["labels"] == ["negative", "neutral", "positive"]
    assert saved.info["pooling"] == "mean"
    assert saved.info["lora"]["rank"] == 8


def test_eval_only_reproduces_the_final_figures_bit_for_bit(minilm_run, tmp_path, capsys):
    workdir, out = minilm_run
    report = json.loads((workdir / "report.json").read_text())
    again = tmp_path / "eval.json"

    status = main(
        [
            "train",
            *TINY_RUN,
            "--eval-only",
            "--adapters",
            report["adapters"],
            "--report",
            str(again),
        ]
    )

    assert status == 0
    assert FINAL_LINE.findall(capsys.readouterr().out) == FINAL_LINE.findall(out)
    assert json.loads(again.read_text())["final"] == report["final"]  # exact floats


def test_eval_only_refuses_adapters_of_another_model(minilm_run, minilm_path, tmp_path, capsys):
    """A tiny random BERT with MiniLM's vocabulary and tokenizer: same tokens, other
    weights. The adapter file's model fingerprint does not match: exit 2, one line."""
    workdir, _ = minilm_run
    other = write_random_checkpoint(
        {
            "model_type": "bert",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "vocab_size": 30522,
            "max_position_embeddings": 64,
        },
        tmp_path / "other",
    )
    (other / "tokenizer.json").write_bytes((minilm_path / "tokenizer.json").read_bytes())

    adapters = str(workdir / "adapters.safetensors")
    status = main(
        ["train", *TINY_RUN, "--model", str(other), "--eval-only", "--adapters", adapters]
    )

    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different model" in err


def test_closed_form_head_ends_with_the_head_of_the_training_rows(
    minilm_path, tmp_path, capsys, monkeypatch
):
    # head mode moves the head at lr 1e-2; the head saved must still be the one solved from
    # the pooled features of the very rows `chainfed train` trains on (frozen backbone:
    # the base model's), fitted after training (end) and, with both, also before it
    rows = ["--train-rows", "60", "--val-rows", "30", "--max-len", "24", "--micro-batch", "8"]
    steps = ["--steps-per-round", "2", "--baseline-rounds", "1", "--lr", "1e-2"]
    argv = ["train", "--mode", "head", *rows, *steps, "--quiet"]
    fits: list[str] = []
    solve = train_command.set_closed_form_head
    monkeypatch.setattr(
        train_command, "set_closed_form_head", lambda *a: fits.append("fit") or solve(*a)
    )
    model = StreamingModel(minilm_path)
    data = load_dataset(data_config(None, "classify", train_rows=60, val_rows=30, seed=0))
    train = encode_split(model, data.train, "classify", 24)
    objective = build_objective(model, "classify", num_labels=len(data.labels))
    features = pooled_features_streaming(model, objective, {}, LoRAConfig(), train, batch_size=8)
    weight, bias = solve_head(head_statistics(features, train.labels, len(data.labels)))

    for schedule, flag, count in (("end", [], 1), ("both", ["both"], 2), ("off", ["off"], 0)):
        fits.clear()
        workdir = tmp_path / schedule
        closed = ["--closed-form-head", *flag] if schedule != "off" else []
        assert main([*argv, *closed, "--workdir", str(workdir)]) == 0

        report = json.loads((workdir / "report.json").read_text())
        assert report["closed_form_head"] == schedule and len(fits) == count
        saved = load_adapter_file(Path(report["adapters"])).head()
        if schedule == "off":  # the trained head is not the solved one
            assert not torch.allclose(saved["weight"], weight, rtol=1e-5, atol=1e-6)
            continue
        torch.testing.assert_close(saved["weight"], weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(saved["bias"], bias, rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert main([*argv, "--closed-form-head", "--task", "lm", "--model", "smollm2"]) != 0
    printed = capsys.readouterr()
    assert "--closed-form-head fits a classification head: it needs --task classify" in printed.err
    assert "computing on" not in printed.out  # refused before the model is opened
    assert main([*argv, "--closed-form-head", "--head-refit-epochs", "2"]) != 0
    assert "give one of them" in capsys.readouterr().err


def test_stage_table_formats_a_head_stage():
    stage = {
        "layer": 5,
        "window": [],
        "rounds": 2,
        "steps": 10,
        "train_loss": 0.5,
        "val_loss": 0.25,
        "val_metric": 0.875,
        "peak_mem_bytes": 3 << 20,
        "baseline_mem_bytes": 1 << 20,
        "seconds": 1.25,
    }
    lines = stage_table([stage]).splitlines()
    assert len(lines) == 3
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == [
        "5",
        "-",
        "2",
        "10",
        "0.5000",
        "0.2500",
        "0.8750",
        "3 MiB",
        "2 MiB",
        "1.2",
    ]


# -- LM smoke: tiny random LLaMA + word-level tokenizer ---------------------------------

WORDS = "the a flight was late early great awful crew seat food service car drives phone".split()
LABELS = ("good", "bad")


@pytest.fixture(scope="module")
def lm_assets(word_llama, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model folder with tokenizer.json, CSV of text,label rows)."""
    root = tmp_path_factory.mktemp("lm")
    model_dir = word_llama(["Text", "Label", ":", *LABELS, *WORDS])
    generator = torch.Generator().manual_seed(0)
    data = root / "tweets.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for _ in range(60):
            picks = torch.randint(0, len(WORDS), (6,), generator=generator).tolist()
            label = LABELS[int(torch.randint(0, 2, (1,), generator=generator))]
            writer.writerow([" ".join(WORDS[i] for i in picks), label])
    return model_dir, data


def test_lm_train_and_eval_only_on_a_tiny_llama(lm_assets, tmp_path, capsys):
    model_dir, data = lm_assets
    common = ["--model", str(model_dir), "--data", str(data), "--task", "lm"]
    common += ["--label-field", "label", "--train-rows", "40", "--val-rows", "6"]
    common += ["--max-len", "16", "--quiet"]
    workdir = tmp_path / "run"

    status = main(
        ["train", *common, "--start-layer", "2", "--micro-batch", "4", "--steps-per-round", "2"]
        + ["--max-rounds", "1", "--memory-budget", "1GiB", "--workdir", str(workdir)]
    )

    assert status == 0
    out = capsys.readouterr().out
    assert "memory budget 1GiB: micro-batch 4 × accumulation 1, window 2, gpo proxy" in out
    report = json.loads((workdir / "report.json").read_text())
    assert (report["task"], report["start_layer"]) == ("lm", 2)
    assert [s["window"] for s in report["stages"]] == [[2], [2, 3]]
    assert torch.isfinite(torch.tensor(report["final"]["val_loss"]))
    saved = load_adapter_file(Path(report["adapters"]))
    assert saved.head() == {}  # the LM head is the model's own, frozen
    assert saved.info["label_token_ids"] == [6, 5]  # "bad" < "good": sorted label names

    status = main(["train", *common, "--eval-only", "--adapters", report["adapters"]])
    assert status == 0
    assert FINAL_LINE.findall(capsys.readouterr().out) == FINAL_LINE.findall(out)


def test_lm_train_with_int8_frozen_weights_on_a_tiny_llama(lm_assets, tmp_path, capsys):
    """``--weights int8`` reaches the model: the cache appears next to it, the report says
    int8, and ``--eval-only --weights int8`` reproduces the final figures bit for bit."""
    model_dir, data = lm_assets
    common = ["--model", str(model_dir), "--data", str(data), "--task", "lm", "--weights"]
    common += ["int8", "--label-field", "label", "--train-rows", "40", "--val-rows", "6"]
    common += ["--max-len", "16", "--quiet"]
    workdir = tmp_path / "run"

    status = main(
        ["train", *common, "--start-layer", "2", "--micro-batch", "4", "--steps-per-round", "2"]
        + ["--max-rounds", "1", "--workdir", str(workdir)]
    )

    assert status == 0
    out = capsys.readouterr().out
    assert "computing on cpu float32, int8 frozen weights" in out
    assert (model_dir / "chainfed-int8.safetensors").is_file()
    report = json.loads((workdir / "report.json").read_text())
    assert report["weights"] == "int8" and torch.isfinite(torch.tensor(report["final"]["val_loss"]))
    status = main(["train", *common, "--eval-only", "--adapters", report["adapters"]])
    assert status == 0
    assert FINAL_LINE.findall(capsys.readouterr().out) == FINAL_LINE.findall(out)


def _refuse(constant: str):
    raise ValueError(f"{constant} is not JSON")


def test_lm_head_mode_report_is_strict_json(lm_assets, tmp_path):
    model_dir, data = lm_assets
    workdir = tmp_path / "head"
    status = main(
        ["train", "--model", str(model_dir), "--data", str(data), "--task", "lm"]
        + ["--label-field", "label", "--train-rows", "20", "--val-rows", "6", "--quiet"]
        + ["--mode", "head", "--workdir", str(workdir)]
    )
    assert status == 0
    json.loads((workdir / "report.json").read_text(), parse_constant=_refuse)


def test_lm_label_tokens_of_a_label_the_rows_lack_come_from_the_template(lm_assets):
    # an agent's shard under label skew may hold no "good" row: its answer token is the
    # response template rendered with the name, the same token a "good" row gives
    model_dir, data = lm_assets
    model = StreamingModel(model_dir)
    config = DataConfig(path=data, task="lm", label_field="label")
    rows = load_dataset(replace(config, train_rows=40, val_rows=6)).train
    bad_only = [ex for ex in rows if ex.label == 0]
    assert bad_only and len(bad_only) < len(rows)

    assert label_token_ids(model, bad_only, ["bad", "good"], config) == label_token_ids(
        model, rows, ["bad", "good"], config
    )
    with pytest.raises(ChainFedError, match=r"labels \['good'\] never occur"):
        label_token_ids(model, bad_only, ["bad", "good"])
    reads_text = replace(config, response_template=" {label} ({text})")
    with pytest.raises(ChainFedError, match="reads more than the label"):
        label_token_ids(model, bad_only, ["bad", "good"], reads_text)


@pytest.mark.parametrize(("value", "expected"), [(None, 0), ("2", 2)])
def test_head_refit_epochs_reach_the_chain_config(value, expected):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--model", "minilm"] + ([] if value is None else ["--head-refit-epochs", value])
    assert chain_config_from_args(parser.parse_args(argv)).head_refit_epochs == expected


def test_negative_head_refit_epochs_are_named():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "minilm", "--head-refit-epochs", "-1"])
    with pytest.raises(ChainFedError, match="head_refit_epochs must be >= 0"):
        chain_config_from_args(args)


@pytest.mark.parametrize(("flags", "expected"), [([], True), (["--no-recompute"], False)])
def test_recompute_is_on_unless_turned_off(flags, expected):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "minilm", *flags])
    assert chain_config_from_args(args).recompute is expected


@pytest.mark.parametrize(("flags", "expected"), [([], 1), (["--recompute-chunks", "4"], 4)])
def test_recompute_chunks_reach_the_chain_config(flags, expected):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "minilm", *flags])
    assert chain_config_from_args(args).recompute_chunks == expected


def test_zero_recompute_chunks_are_named():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "minilm", "--recompute-chunks", "0"])
    with pytest.raises(ChainFedError, match="recompute_chunks must be >= 1"):
        chain_config_from_args(args)


def test_labels_number_the_classes_as_given(tmp_path):
    # --labels fixes the head's row order (sorted names would put negative first): what a
    # federation's agents need to agree on, recorded in the adapter file
    workdir = tmp_path / "run"
    argv = ["train", "--mode", "head", "--labels", "positive, negative,neutral", *TINY_RUN]
    assert main([*argv, "--baseline-rounds", "1", "--workdir", str(workdir)]) == 0

    report = json.loads((workdir / "report.json").read_text())
    assert load_adapter_file(Path(report["adapters"])).info["labels"] == [
        "positive",
        "negative",
        "neutral",
    ]


@pytest.mark.parametrize("value", ["a,,b", "a,b,a", ""])
def test_malformed_labels_are_named(value, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "minilm", "--labels", value])
    assert "distinct, non-empty class names separated by commas" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], {"patience": 1, "tolerance": 0.01, "foat_threshold": 0.8, "foat_readout_factor": 2}),
        (["--patience", "2", "--tolerance", "0.05"], {"patience": 2, "tolerance": 0.05}),
        (
            ["--foat-threshold", "0.6", "--foat-readout-factor", "3"],
            {"foat_threshold": 0.6, "foat_readout_factor": 3.0},
        ),
    ],
)
def test_the_stage_rule_and_foat_settings_reach_the_chain_config(flags, expected):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = chain_config_from_args(parser.parse_args(["--model", "minilm", *flags]))
    assert {name: getattr(config, name) for name in expected} == expected


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--patience", "0"], "patience must be >= 1"),
        (["--tolerance", "1"], r"tolerance must"),
        (["--foat-readout-factor", "0.5"], "foat_readout_factor must be a finite number >= 1"),
        (["--foat-threshold", "nan"], "foat_threshold must be a finite number"),
    ],
)
def test_a_stage_rule_or_foat_setting_that_cannot_judge_is_named(flags, message):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ChainFedError, match=message):
        chain_config_from_args(parser.parse_args(["--model", "minilm", *flags]))


def test_test_rows_are_the_simulations_held_out_rows_scored_by_the_final_model(
    minilm_path, tmp_path, capsys
):
    # a federation and its one-device baseline score the same held-out rows (the demo's
    # held-out line compares them), which no validation or training row repeats
    _, held_out = load_rows(SimulationConfig(train_rows=60, val_rows=30, test_rows=20, seed=2))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    rows = ["--train-rows", "60", "--val-rows", "30", "--test-rows", "20", "--seed", "2"]
    inputs = train_command._inputs(parser.parse_args([*rows, "--max-len", "24"]))
    model = inputs.model
    assert torch.equal(
        inputs.test.input_ids, encode_split(model, held_out, "classify", 24).input_ids
    )
    assert len(inputs.val) == 30 and len(inputs.train) == 60
    texts = {e.text for e in held_out}
    assert not texts & {e.text for e in inputs.data.val + inputs.data.train}

    workdir = tmp_path / "head"
    argv = ["train", "--mode", "head", *rows, "--max-len", "24", "--micro-batch", "8"]
    argv += ["--steps-per-round", "2", "--baseline-rounds", "1", "--quiet"]
    assert main([*argv, "--workdir", str(workdir)]) == 0
    final = json.loads((workdir / "report.json").read_text())["final"]
    objective = build_objective(model, "classify", num_labels=len(inputs.data.labels))
    saved = load_adapter_file(workdir / "adapters.safetensors")
    objective.head.load_state_dict(saved.head())
    test = evaluate_streaming(model, objective, {}, LoRAConfig(), inputs.test, batch_size=8)
    assert (final["test_metric"], final["test_loss"]) == pytest.approx((test.metric, test.loss))
    out = capsys.readouterr().out
    assert f"final: test metric {test.metric:.4f}, test loss" in out


def test_test_rows_need_the_validation_rows_they_follow(capsys):
    assert main(["train", "--test-rows", "10", "--train-rows", "20", "--quiet"]) == 2
    assert "--test-rows needs --val-rows" in capsys.readouterr().err
    assert main(["train", "--test-rows", "-5", "--val-rows", "20", "--quiet"]) == 2
    assert "--test-rows must be >= 0, got -5" in capsys.readouterr().err
