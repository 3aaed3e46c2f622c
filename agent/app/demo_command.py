"""``chainfed demo``: the main job — a real federated chain on this machine, and its report.

::

    chainfed coordinator (process) ◄── gRPC, localhost ──► chainfed agent × 4 (processes)
         ▲ Status RPC, polled: one progress line per round
    this process ── then: head-mode baseline (frozen backbone, same rows) ── run folder
                          (lm: the untuned model, the LM head being frozen)

The packaged all-MiniLM-L6-v2 (``--model smollm2``: the packaged SmolLM2-135M-Instruct as
a causal LM) is fine-tuned on the packaged tweets, split over the agents by a Dirichlet
draw over labels (non-IID, fixed seed), as a whole chain: FOAT picks the start layer
(on SmolLM2, the first from which its LM head can read the layers), a DLCT window of 2
climbs the network, GPO proxies give each stage foresight. The defaults are sized to
finish in a few minutes on a 2-core machine. The chain and the baseline are compared on
the validation rows (which the stage rule reads) and on held-out test rows no agent holds
(``--test-rows``), which nothing in the run has seen.

The run folder (``--out``, default ``runs/demo-<time>``) holds ``report.json``,
``report.md``, ``accuracy.png`` (federated validation accuracy per round, stages
marked), ``memory.png`` (measured peak per layer against the measured peak of
end-to-end LoRA training of the same model, micro-batch and sequence length: a few
``chainfed train --mode e2e`` steps in a separate process),
``adapters.safetensors`` (the final adapters and head, for ``chainfed classify`` /
``chainfed export``) and the federation's own folders (coordinator state, agent
workdirs without their prefix caches, logs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from chainfed.agent.app.json_report import write_json
from chainfed.agent.app.options import (
    SimulationConfig,
    add_device_arguments,
    device_argv,
)
from chainfed.agent.app.simulation import SimulationResult, run_simulation
from chainfed.agent.app.simulation_report import (
    MEASURED_AGGREGATE_NOTE,
    plot_accuracy,
    plot_memory,
    round_table,
    stage_table,
    summary_lines,
)
from chainfed.agent.errors import ChainFedError
from chainfed.proto.closed_form_head import CLOSED_FORM_FIT_ROUNDS
from chainfed.proto.units import format_bytes


@dataclass(frozen=True)
class DemoPreset:
    """The demo's federation for one model, sized for a few minutes on 2 CPU cores.

    MiniLM: the Dirichlet(0.5) split of seed 0 gives nearly one class per agent (shards
    96 % class 0, 98 % class 1, 52/42 % classes 2/0, 82 % class 0), so every local step
    pulls toward the agent's own class. ``ffa`` keeps LoRA A frozen at the shared seed
    and averages B, so the aggregate is exactly the mean of the agents' weight changes;
    FedAvg of A and B apart adds cross terms B_j·A_k: its aggregate's loss hovered
    around chance (ln 3) and ended at 1.47, accuracy 0.54, against FFA's 0.79 and 0.65
    (both lr 2e-3). Adam moves a weight about lr per step whatever the gradient, and
    these few rounds are short of progress more than of agreement (lr 1e-3 trailed 2e-3
    at every round), so lr is 3e-3; the head baseline runs at the same lr (its best of
    2e-3, 3e-3, 4e-3: 0.665, 0.673, 0.670).

    Under this skew the head the rounds train is pulled toward each agent's own class,
    so the chain fits its head in closed form from all the agents' rows after its last
    stage (``closed_form_head``); the head baseline ends with the closed-form head of the
    frozen features (a head-only model fitted to convergence), so both end with the head
    of the whole federation's rows on their own features and differ only in what the
    chain adds to the features.

    8,000 training rows (2,000 per agent): with 2,000 the 12 rounds of 20 steps saw each
    agent's rows several times over and the chain ended level with the converged head-only
    model; with 8,000 it ends above it (``benchmarks/README.md``, "Closed-form head"), and
    the fit round, whose features start from the agents' caches, keeps the run to a few
    minutes.

    SmolLM2: FOAT starts the chain where the frozen LM head can read the layers' outputs
    (``first_readable_layer``: layer 24 of 30 on these rows), not where CKA alone would
    (layer 10: 20 stages, about 15 minutes here, and a smaller gain; benchmarks/README.md,
    "FOAT on SmolLM2"). Same ffa as MiniLM, 2 rounds of 20 steps a stage. lr 1e-2, not
    MiniLM's 3e-3: each layer trains in at most 4 rounds of 20 steps, and on these rows
    the larger rate is where the chain's gain over the untuned model comes from
    (benchmarks/README.md, "The chain's learning rate on SmolLM2").
    """

    federation: SimulationConfig
    head_steps_per_round: int
    """``chainfed train --mode head`` baseline: steps per round (same rows and seed)."""


PRESETS = {
    "minilm": DemoPreset(
        SimulationConfig(
            agents=4,
            split="dirichlet:0.5",
            aggregation="ffa",
            model="minilm",
            task="classify",
            train_rows=8000,
            val_rows=600,
            test_rows=600,
            max_len=40,
            window=2,
            gpo="proxy",
            min_rounds_per_layer=1,
            max_rounds_per_layer=3,
            local_steps=20,
            micro_batch=16,
            lr=3e-3,
            closed_form_head="end",
            in_process=False,
        ),
        head_steps_per_round=20,
    ),
    "smollm2": DemoPreset(
        SimulationConfig(
            agents=4,
            split="dirichlet:0.5",
            aggregation="ffa",
            model="smollm2",
            task="lm",
            train_rows=800,
            val_rows=200,
            test_rows=200,
            max_len=48,
            window=2,
            gpo="proxy",
            min_rounds_per_layer=1,
            max_rounds_per_layer=2,
            local_steps=20,
            micro_batch=8,
            lr=1e-2,
            in_process=False,
        ),
        head_steps_per_round=20,
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``chainfed demo`` (none needed)."""
    parser.add_argument(
        "--model",
        choices=tuple(PRESETS),
        default="minilm",
        help="minilm (default: classification) or smollm2 (decoder, lm task; longer)",
    )
    parser.add_argument("--out", type=Path, help="run folder (default: runs/demo-<time>)")
    parser.add_argument("--agents", type=int, help="agent processes (default 4)")
    parser.add_argument("--train-rows", type=int, help="training rows over all agents")
    parser.add_argument("--val-rows", type=int, help="validation rows over all agents")
    parser.add_argument(
        "--test-rows",
        type=int,
        help="held-out rows no agent holds, scored once by the final model and by the "
        "baseline (default: minilm 600, smollm2 200; 0 = none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data split, shards, initialisation")
    parser.add_argument("--local-steps", type=int, help="optimiser steps per agent per round")
    parser.add_argument("--max-rounds-per-layer", type=int, help="round cap of a stage")
    parser.add_argument("--start-layer", type=int, help="first chain layer (default: FOAT)")
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the baseline run (head mode: the frozen backbone; lm: the untuned model)",
    )
    add_device_arguments(parser)


def _config(args: argparse.Namespace, out: Path) -> SimulationConfig:
    preset = PRESETS[args.model].federation
    changes: dict[str, Any] = {"workdir": out / "federation", "seed": args.seed}
    changes |= {"device": args.device, "dtype": args.dtype, "unified_memory": args.unified_memory}
    changes["weights"] = args.weights
    for name in (
        "agents",
        "train_rows",
        "val_rows",
        "test_rows",
        "local_steps",
        "max_rounds_per_layer",
        "start_layer",
    ):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    return replace(preset, **changes)


def train_in_a_process(config: SimulationConfig, options: list[str], workdir: Path) -> dict:
    """Run ``chainfed train`` on the federation's model, task, length, seed and rank, plus
    ``options``, in a process of its own (the agents' threads each), logged to
    ``workdir/train.log``; its report."""
    argv = [
        *(sys.executable, "-m", "chainfed.agent.cli", "train", "--quiet"),
        *("--model", config.model, "--task", config.task, "--seed", str(config.seed)),
        *("--max-len", str(config.max_len), "--micro-batch", str(config.micro_batch)),
        *("--rank", str(config.rank), "--lr", str(config.lr), "--workdir", str(workdir)),
        *device_argv(config.device, config.dtype, config.unified_memory, config.weights),
        *options,
    ]
    threads = str(config.threads_per_agent)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "train.log", "w") as log:
        status = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if status != 0:
        raise ChainFedError(
            f"chainfed train {' '.join(options)} exited with status {status}; "
            f"see {workdir / 'train.log'}"
        )
    return json.loads((workdir / "report.json").read_text())


def head_baseline(config: SimulationConfig, steps_per_round: int, workdir: Path) -> dict:
    """``chainfed train --mode head`` (frozen backbone, head only) on the federation's
    rows, all on one device: the bar the chain has to clear. When the federation fits its
    head in closed form, so does the baseline after its rounds (the ridge head of the frozen
    features: the converged head-only model), so both get the same head treatment. Its
    report."""
    rows = ["--train-rows", str(config.train_rows), "--val-rows", str(config.val_rows)]
    rows += ["--test-rows", str(config.test_rows)]
    steps = ["--steps-per-round", str(steps_per_round)]
    head = [] if config.closed_form_head == "off" else ["--closed-form-head"]
    return train_in_a_process(config, ["--mode", "head", *rows, *steps, *head], workdir)


BASELINES = {
    "classify": "head mode (frozen backbone, head only)",
    "lm": "the untuned model (head mode: the LM head is the model's own and frozen, so "
    "nothing trains)",
}
"""What the demo's ``chainfed train --mode head`` run is, per task, in the report's words."""


def baseline_line(task: str, chain_metric: float, baseline_metric: float) -> str:
    """The report's comparison of the chain's final validation accuracy with the baseline
    run's (``BASELINES``), on the same rows."""
    return (
        f"{BASELINES[task]} on the same rows: validation accuracy {baseline_metric:.4f} "
        f"({chain_metric - baseline_metric:+.4f} for the chain)"
    )


def held_out_line(task: str, rows: int, chain_metric: float, baseline_metric: float | None) -> str:
    """The final model's accuracy on the held-out test rows, and the baseline run's on the
    same rows when it ran: the figure no stage rule or rate choice has seen."""
    line = f"held-out test accuracy ({rows} rows no agent holds): chain {chain_metric:.4f}"
    if baseline_metric is None:
        return line
    baseline = BASELINES[task].split(" (")[0]  # its name, without the explanation
    gain = chain_metric - baseline_metric
    return f"{line}, {baseline} {baseline_metric:.4f} ({gain:+.4f} for the chain)"


E2E_STEPS = 3
"""Optimiser steps of the end-to-end memory measurement: the peak is reached in the first
step (every layer's weights, adapters and saved activations at once); later ones repeat it."""


def measure_e2e_peak(config: SimulationConfig, workdir: Path) -> int:
    """Peak memory above the idle process of end-to-end LoRA training (every layer, full
    backprop) of the federation's model at its micro-batch, sequence length, rank and
    threads per agent: ``E2E_STEPS`` steps of ``chainfed train --mode e2e``, measured by
    the same meter as the agents' rounds."""
    rows = ["--train-rows", str(config.micro_batch * E2E_STEPS)]
    rows += ["--val-rows", str(config.micro_batch)]
    steps = ["--steps-per-round", str(E2E_STEPS), "--baseline-rounds", "1"]
    stages = train_in_a_process(config, ["--mode", "e2e", *rows, *steps], workdir)["stages"]
    return max(s["peak_mem_bytes"] - s["baseline_mem_bytes"] for s in stages)


def remove_prefix_caches(out: Path) -> int:
    """Delete the prefix caches that the demo's processes left under ``out`` (the agents',
    the baseline's, the memory measurement's); the bytes freed. They hold the hidden states
    of every training row (about 1 GB at the preset's 8,000 rows) and serve only a restart
    in the same workdir, which a demo never makes."""
    caches = [p for p in (*out.glob("*/cache"), *out.glob("federation/*/cache")) if p.is_dir()]
    freed = sum(f.stat().st_size for cache in caches for f in cache.rglob("*") if f.is_file())
    for cache in caches:
        shutil.rmtree(cache)
    return freed


def comparison_lines(
    config: SimulationConfig, result: SimulationResult, head: dict | None
) -> list[str]:
    """The chain against the baseline run on the validation rows (when it ran) and on the
    held-out test rows (when there are any): what the demo prints and report.md lists."""
    lines = []
    if head is not None:
        lines.append(
            baseline_line(config.task, result.final_val_metric, head["final"]["val_metric"])
        )
    if result.test_metric is not None:
        baseline_test = None if head is None else head["final"]["test_metric"]
        lines.append(
            held_out_line(config.task, config.test_rows, result.test_metric, baseline_test)
        )
    return lines


def _markdown(
    config: SimulationConfig,
    result: SimulationResult,
    comparisons: list[str],
    e2e_bytes: int,
    seconds: float,
) -> str:
    lines = [
        "# chainfed demo",
        f"{config.agents} agent processes + a coordinator over gRPC on localhost; model "
        f"`{config.model}`, task `{config.task}`; {config.train_rows} training and "
        f"{config.val_rows} validation rows split `{config.split}` (seed {config.seed}); "
        f"DLCT window {config.window}, GPO `{config.gpo}`, FOAT start layer "
        f"{result.start_layer}, aggregation `{config.aggregation}`, learning rate "
        f"{config.lr:g}; {config.local_steps} local steps per round, at most "
        f"{config.max_rounds_per_layer} rounds per layer"
        + (
            "."
            if config.closed_form_head == "off"
            else "; the task head fitted in closed form (chain: "
            f"{CLOSED_FORM_FIT_ROUNDS[config.closed_form_head]}; head mode: last)."
        ),
        "",
        "\n".join(f"* {line}" for line in summary_lines(result)),
    ]
    lines += [f"* {line}" for line in comparisons]
    lines += [
        f"* peak memory above the idle process: heaviest chain stage "
        f"{format_bytes(max(s['above_baseline_bytes'] for s in result.stages()))} (measured), "
        f"end-to-end {format_bytes(e2e_bytes)} (measured: {E2E_STEPS} steps of "
        "`chainfed train --mode e2e` at the same micro-batch and length, one process)",
        f"* demo wall time: {seconds:.0f} s",
        "",
        "## Per layer",
        "",
        stage_table(result),
        "",
        MEASURED_AGGREGATE_NOTE,
        "",
        "## Rounds",
        "",
        round_table(result),
        "",
        "![accuracy](accuracy.png)",
        "",
        "![memory](memory.png)",
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Run the federation and the baseline, write the run folder, print the table."""
    started = time.perf_counter()
    out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    config = _config(args, out)
    print(
        f"chainfed demo: a coordinator and {config.agents} agents on localhost (gRPC), "
        f"{config.model} on {config.train_rows} tweets split {config.split}; run folder {out}",
        flush=True,
    )
    result = run_simulation(config, progress=lambda line: print(line, flush=True))
    head = None
    if not args.no_baseline:
        print(f"baseline: {BASELINES[config.task]}, same rows, one device ...", flush=True)
        head = head_baseline(config, PRESETS[args.model].head_steps_per_round, out / "head")
    print("end-to-end memory measurement (a few e2e steps, one process) ...", flush=True)
    e2e_bytes = measure_e2e_peak(config, out / "e2e-memory")
    adapters = shutil.copyfile(result.adapters, out / "adapters.safetensors")
    freed = remove_prefix_caches(out)
    baselines = {BASELINES[config.task]: head["final"]["val_metric"]} if head else {}
    plot_accuracy(
        {"chain (federated validation of the aggregate each round started from)": result},
        out / "accuracy.png",
        title=f"chainfed demo: {config.model}, {config.agents} agents, {config.split}",
        baselines=baselines | {"chain, final model": result.final_val_metric},
    )
    plot_memory(
        result,
        out / "memory.png",
        e2e_bytes=e2e_bytes,
        e2e_label=f"e2e, measured ({E2E_STEPS} steps, same micro-batch and length)",
    )
    seconds = time.perf_counter() - started
    report = {
        "federation": result.to_dict(),
        "head_baseline": None if head is None else head["final"],
        "memory": {
            "chain_heaviest_stage_bytes": max(s["above_baseline_bytes"] for s in result.stages()),
            "e2e_bytes": e2e_bytes,
            "e2e_steps": E2E_STEPS,
        },
        "adapters": str(adapters),
        "seconds": seconds,
    }
    write_json(out / "report.json", report)
    comparisons = comparison_lines(config, result, head)
    (out / "report.md").write_text(_markdown(config, result, comparisons, e2e_bytes, seconds))
    print()
    print(stage_table(result))
    print(MEASURED_AGGREGATE_NOTE)
    print()
    print(
        f"final validation accuracy (every agent's validation rows): {result.final_val_metric:.4f}"
    )
    for line in comparisons:
        print(line)
    print(f"removed the prefix caches of the run folder's processes ({format_bytes(freed)})")
    print(f"run folder: {out} (report.md, report.json, accuracy.png, memory.png, adapters)")
    print(f"done in {seconds:.0f} s")
    return 0
