"""benchmarks/memory.py works end to end on tiny random models (a smoke test, not a
measurement: the figures of tiny models say nothing about the real shapes).

Prepare: tiny bert / llama configs (d=32) as ``Shape``s. Execute: the benchmark's own
entry points — each mode in a fresh worker process, or in-process for the slice. Assert:
every stage was measured, the report files exist and state what is measured and what is
extrapolated, and the extrapolation is the stated affine formula.
"""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Tiny tensors gain nothing from intra-op threads, here or in the workers (which
    inherit the environment); on a busy 2-core box the hand-offs cost more than the maths."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def memory(benchmark_script):
    return benchmark_script("memory")


def test_each_mode_runs_in_its_own_process_and_the_report_is_written(memory, tiny_models, tmp_path):
    bert = tiny_models.config("bert", num_hidden_layers=3)
    shape = memory.Shape("tiny-bert", batch=2, seq=8, rank=2, task="classify", hf_config=bert)
    scratch = tmp_path / "scratch" / "not-yet"  # --tmp-dir of a folder still to be made
    options = memory.Options(modes=("chain", "e2e", "e2e-streamed"), tmp_dir=str(scratch))

    report = memory.run_benchmark([shape], options, tmp_path / "out", log=lambda _: None)

    result = report["shapes"][0]
    assert not [r["error"] for r in result["runs"] if "error" in r]
    runs = {r["mode"]: r for r in result["runs"] if r["spec"]["variant"] is None}
    variants = {r["spec"]["variant"]: r for r in result["runs"] if r["spec"]["variant"]}
    assert scratch.is_dir() and not list(scratch.iterdir())  # made, and cleaned after use
    assert [s["layer"] for s in runs["chain"]["stages"]] == [0, 1, 2]
    assert [s["window"] for s in runs["chain"]["stages"]] == [[0], [0, 1], [1, 2]]
    assert [s["window"] for s in runs["e2e"]["stages"]] == [[0, 1, 2]]
    assert [s["window"] for s in runs["e2e-streamed"]["stages"]] == [[0, 1, 2]]
    for run in runs.values():
        assert run["baseline_bytes"] > 0 and run["peak_bytes"] > run["baseline_bytes"]
        assert run["peak_above_baseline"] == max(s["above_baseline"] for s in run["stages"])
    assert result["slice_layers"] is None
    assert result["full_depth"]["chain"]["how"] == "measured"
    assert result["ratio_e2e_chain"] == pytest.approx(
        runs["e2e"]["peak_above_baseline"] / runs["chain"]["peak_above_baseline"]
    )
    # every stage says where its bytes went, and the parts add up to its peak
    for run in result["runs"]:
        for stage in run["stages"]:
            parts = stage["bytes"]
            assert sum(parts.values()) == stage["above_baseline"]
            assert parts["saved_activations"] > 0 and parts["adapter_state"] > 0
    chain_stages, e2e_stage = runs["chain"]["stages"], runs["e2e"]["stages"][0]
    block = memory.model_bytes(bert, "classify", 2)["block"]
    assert e2e_stage["bytes"]["frozen_weights"] >= 3 * block
    assert chain_stages[-1]["bytes"]["frozen_weights"] <= 3 * block  # window 2 + 1 streamed
    assert e2e_stage["bytes"]["cache_batch"] == 0 < chain_stages[0]["bytes"]["cache_batch"]
    # e2e-streamed keeps block inputs only: less saved for backward than e2e
    streamed_stage = runs["e2e-streamed"]["stages"][0]
    assert streamed_stage["bytes"]["saved_activations"] < e2e_stage["bytes"]["saved_activations"]
    assert (
        "| tiny-bert | random, real config | e2e-streamed | 3 layers |"
        in (tmp_path / "out" / "memory.md").read_text()
    )
    # the comparisons ran the chain's first stages with one setting changed
    assert sorted(variants) == ["no prefetch", "no recompute"]
    assert variants["no recompute"]["spec"]["recompute"] is False
    assert variants["no prefetch"]["spec"]["prefetch"] is False
    compared = {c["variant"]: c for c in result["comparisons"]}
    assert compared["no recompute"]["stages"] == [0, 1, 2]
    no_recompute_peak = max(
        s["bytes"]["saved_activations"] for s in variants["no recompute"]["stages"]
    )
    assert no_recompute_peak > max(s["bytes"]["saved_activations"] for s in chain_stages)
    out = tmp_path / "out"
    assert json.loads((out / "memory.json").read_text())["shapes"][0]["shape"] == "tiny-bert"
    table = (out / "memory.md").read_text()
    assert "| tiny-bert | random, real config | chain | 3 layers |" in table
    assert "measured at 3 layers" in table
    assert "## Where the bytes go" in table and "### tiny-bert: every chain stage" in table
    assert "| tiny-bert | no recompute | 0-2 |" in table
    assert (out / "memory.png").read_bytes().startswith(b"\x89PNG")


def _sliced_llama(memory, tiny_models, **extra):
    """An 8-layer llama shape whose weights are written for a slice only (CPU)."""
    return memory.Shape(
        "tiny-llama",
        batch=2,
        seq=8,
        rank=2,
        task="lm",
        hf_config=tiny_models.config("llama", num_hidden_layers=8),
        slice_on_cpu=True,
        **extra,
    )


def test_a_sliced_shape_measures_chain_at_full_depth_and_extrapolates_e2e(
    memory, tiny_models, tmp_path, monkeypatch
):
    monkeypatch.setattr(memory, "run_isolated", memory.measure)  # in-process: faster
    shape = _sliced_llama(memory, tiny_models, paper_ratio=4.5)
    options = memory.Options(layers=4, device="cpu", compare=())

    result = memory.bench_shape(shape, options, tmp_path, log=lambda _: None)

    assert result.slice_layers == 4 and result.full_layers == 8
    weights = next(tmp_path.glob("tiny-llama-weights-*"))
    assert json.loads((weights / "config.json").read_text())["num_hidden_layers"] == 4
    runs = {(r["mode"], r["layers"]): r for r in result.runs}
    assert sorted(runs) == [("chain", 8), ("e2e", 2), ("e2e", 4), ("topk", 4)]
    chain = runs["chain", 8]
    assert [s["layer"] for s in chain["stages"]] == [0, 1, 2, 3]
    assert result.full_depth["chain"] == {
        "peak_above_baseline": chain["peak_above_baseline"],
        "how": "first_stages",
    }
    e2e = result.full_depth["e2e"]
    p2, p4 = runs["e2e", 2]["peak_above_baseline"], runs["e2e", 4]["peak_above_baseline"]
    assert e2e["how"] == "extrapolated"
    assert e2e["peak_above_baseline"] == round(p4 + (8 - 4) * (p4 - p2) / 2)
    assert result.full_depth["topk"]["how"] == "depth_independent"
    report = {
        "machine": memory.machine_info(options),
        "options": memory.asdict(options),
        "seconds": 1.0,
        "shapes": [memory.asdict(result)],
    }
    table = memory.markdown(report)
    assert "e2e extrapolated from 2 and 4 layers to 8; chain measured on the 8-layer" in table
    assert "P(8) = P(4) + (8 − 4) · (P(4) − P(2)) / 2" in table
    assert "| tiny-llama | random, real config | chain | 8 layers, stages 0-3 |" in table


def test_extrapolation_is_the_line_through_both_depths(memory):
    assert memory.extrapolate({2: 300, 4: 500}, 32) == (3300, 100.0)
    assert memory.extrapolate({4: 500, 2: 500}, 32) == (500, 0.0)


def test_int8_weights_run_on_the_slice_with_the_cache_built_before_the_workers(
    memory, tiny_models, tmp_path, monkeypatch
):
    """``--weights int8``: every depth's folder gets its int8 cache in the parent (the
    one-time quantisation is in no run's figures) and each run's blocks are int8."""
    monkeypatch.setattr(memory, "run_isolated", memory.measure)  # in-process: faster
    loaded: list[str] = []
    load_block = memory.StreamingModel.load_block

    def record(model, index):
        block = load_block(model, index)
        loaded.append(type(block.q_proj).__name__)
        return block

    monkeypatch.setattr(memory.StreamingModel, "load_block", record)
    shape = _sliced_llama(memory, tiny_models)
    options = memory.Options(modes=("chain", "e2e"), layers=4, device="cpu", weights="int8")

    result = memory.bench_shape(shape, options, tmp_path, log=lambda _: None)

    assert not [r["error"] for r in result.runs if "error" in r]
    assert {r["spec"]["weights"] for r in result.runs} == {"int8"}
    for depth in (2, 4, 8):
        assert (tmp_path / f"tiny-llama-L{depth}" / "chainfed-int8.safetensors").is_file()
    assert loaded and set(loaded) == {"Int8Linear"}
    assert "int8 frozen weights" in memory.markdown(
        {
            "machine": memory.machine_info(options),
            "options": memory.asdict(options),
            "seconds": 1.0,
            "shapes": [memory.asdict(result)],
        }
    )
