"""Accuracy and traffic of federated ``chain`` vs ``e2e`` vs ``topk:K`` under equal rounds.

What runs. For each split (default ``dirichlet:0.5`` — non-IID label skew — and ``iid``)
a federation of ``--agents`` (8) agents on the packaged all-MiniLM-L6-v2 and tweets,
simulated in one process (``chainfed.agent.app.simulation``, in process: the product's
``ChainCoordinator`` and ``FederatedAgent`` round work, no gRPC):

1. ``chain`` — the method: FOAT start layer, DLCT window ``--window``, GPO (``--gpo``,
   proxies by default; ``--gpo-lambda``, the global loss's weight), each stage until
   the federated validation loss converges (``--max-rounds-per-layer`` cap).
   Its number of communication rounds R is what the chain took.
2. ``e2e`` — plain FedLoRA, LoRA on every layer, end-to-end backprop — for exactly R rounds.
3. ``topk:K`` (``--topk``, 2) — plain FedLoRA on the last K layers — for exactly R rounds.

Every run uses the same data, shards, seed, local steps, learning rate, rank and
aggregation (``--aggregation``, fedavg by default; ``ffa`` freezes LoRA A so the mean
of the agents' B is exact); e2e and topk go through the same coordinator as the chain, as one
stage at the last layer whose window covers their layers.

Measured, per run: the federated validation accuracy of every round (sample-weighted over
the agents, each agent scoring the aggregate the round started from); the final
adapters' accuracy on one held-out test set (``--test-rows`` rows of the validation pool
that no agent holds, the same for every run); tensor payload sent + received per agent
per round (the values' bytes; gRPC framing excluded) and in all; each agent's peak memory
(in one process the agents share the process, so the absolute figure includes the others'
resident state; the figure above the idle process is the comparable one).

The three acceptance checks of the issue are evaluated and printed, not asserted:
non-IID chain test accuracy ≥ e2e − 1 point and > topk; chain's bytes per agent per round
≤ 1/L of e2e's.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/accuracy.py               # both splits, 8 agents
    python benchmarks/accuracy.py --splits dirichlet:0.5 --train-rows 4000 --out runs/acc

Outputs in ``--out`` (default ``benchmarks/results/accuracy-<timestamp>``):
``accuracy.json`` (every run: config, per-round history, figures), ``accuracy.md`` (the
table, also printed) and ``accuracy.png`` (accuracy vs round, one panel per split).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from chainfed.agent.app.json_report import write_json
from chainfed.agent.app.options import SimulationConfig, add_device_arguments
from chainfed.agent.app.simulation import SimulationResult, run_simulation
from chainfed.agent.app.simulation_report import pyplot, stage_boundaries
from chainfed.coordinator.config import AGGREGATIONS
from chainfed.proto.units import format_bytes


def run_split(split: str, args: argparse.Namespace, out: Path) -> dict[str, SimulationResult]:
    """chain, then e2e and topk for as many rounds as the chain took."""
    base = SimulationConfig(
        agents=args.agents,
        split=split,
        model=args.model,
        train_rows=args.train_rows,
        val_rows=args.val_rows,
        test_rows=args.test_rows,
        max_len=args.max_len,
        seed=args.seed,
        start_layer=args.start_layer,
        window=args.window,
        gpo=args.gpo,
        gpo_lambda=args.gpo_lambda,
        min_rounds_per_layer=args.min_rounds_per_layer,
        max_rounds_per_layer=args.max_rounds_per_layer,
        local_steps=args.local_steps,
        micro_batch=args.micro_batch,
        lr=args.lr,
        rank=args.rank,
        aggregation=args.aggregation,
        in_process=True,
        device=args.device,
        dtype=args.dtype,
        unified_memory=args.unified_memory,
    )
    results: dict[str, SimulationResult] = {}
    label = split.replace(":", "")
    for mode in ("chain", "e2e", f"topk:{args.topk}"):
        rounds = None if mode == "chain" else results["chain"].rounds
        config = replace(base, mode=mode, rounds=rounds, workdir=out / f"{label}-{mode}")
        started = time.perf_counter()
        results[mode] = run_simulation(config)
        r = results[mode]
        print(
            f"{split:>14} {mode:>7}: {r.rounds} rounds, test accuracy {r.test_metric:.4f}, "
            f"{format_bytes(int(r.bytes_per_agent_round()))} per agent per round, "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
    return results


def row(split: str, mode: str, r: SimulationResult) -> dict[str, Any]:
    """The table's figures of one run."""
    peaks = r.peak_memory_per_agent()
    return {
        "split": split,
        "mode": mode,
        "rounds": r.rounds,
        "start_layer": r.start_layer,
        "trained_layers": sorted({layer for e in r.history for layer in e.window}),
        "test_accuracy": r.test_metric,
        "test_loss": r.test_loss,
        "final_val_accuracy": r.final_val_metric,
        "bytes_per_agent_round": r.bytes_per_agent_round(),
        "bytes_per_agent_total_mean": sum(r.bytes_per_agent().values()) / len(r.agent_samples),
        "peak_memory_max": max(peaks.values()),
        "peak_above_baseline_max": max(r.peak_above_baseline_per_agent().values()),
        "seconds": r.seconds,
    }


def checks(rows: list[dict[str, Any]], num_layers: int, topk: str) -> list[dict[str, Any]]:
    """The issue's acceptance checks, per split (non-IID: the accuracy ones)."""
    out = []
    for split in dict.fromkeys(r["split"] for r in rows):
        by = {r["mode"]: r for r in rows if r["split"] == split}
        chain, e2e, top = by["chain"], by["e2e"], by[topk]
        if split != "iid":
            out.append(
                {
                    "split": split,
                    "check": "chain test accuracy >= e2e - 1 point",
                    "values": f"{chain['test_accuracy']:.4f} vs {e2e['test_accuracy'] - 0.01:.4f}",
                    "holds": chain["test_accuracy"] >= e2e["test_accuracy"] - 0.01,
                }
            )
            out.append(
                {
                    "split": split,
                    "check": f"chain test accuracy > {topk}",
                    "values": f"{chain['test_accuracy']:.4f} vs {top['test_accuracy']:.4f}",
                    "holds": chain["test_accuracy"] > top["test_accuracy"],
                }
            )
        limit = e2e["bytes_per_agent_round"] / num_layers
        out.append(
            {
                "split": split,
                "check": f"chain bytes per agent per round <= e2e / L (L={num_layers})",
                "values": f"{format_bytes(int(chain['bytes_per_agent_round']))} vs "
                f"{format_bytes(int(limit))}",
                "holds": chain["bytes_per_agent_round"] <= limit,
            }
        )
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| split | mode | rounds | layers trained | test acc | final val acc | bytes / agent / "
        "round | bytes / agent, all rounds | peak mem (max agent) | above idle | seconds |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        layers = r["trained_layers"]
        lines.append(
            f"| {r['split']} | {r['mode']} | {r['rounds']} | {layers[0]}-{layers[-1]} "
            f"| {r['test_accuracy']:.4f} | {r['final_val_accuracy']:.4f} "
            f"| {format_bytes(int(r['bytes_per_agent_round']))} "
            f"| {format_bytes(int(r['bytes_per_agent_total_mean']))} "
            f"| {format_bytes(r['peak_memory_max'])} "
            f"| {format_bytes(r['peak_above_baseline_max'])} "
            f"| {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(runs: dict[str, dict[str, SimulationResult]], path: Path) -> Path:
    """Validation accuracy vs round, one panel per split; chain stages marked; each run's
    held-out test accuracy as a marker after its last round."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), squeeze=False)
    for ax, (split, results) in zip(axes[0], runs.items(), strict=True):
        for mode, r in results.items():
            xs = list(range(1, r.rounds + 1))
            (line,) = ax.plot(xs, [e.val_metric for e in r.history], marker="o", label=mode)
            ax.plot(
                [r.rounds + 0.5],
                [r.test_metric],
                marker="*",
                markersize=12,
                color=line.get_color(),
                linestyle="none",
                label=f"{mode}: test {r.test_metric:.3f}",
            )
            if mode == "chain":
                for x, label in stage_boundaries(r):
                    ax.axvline(x, color=line.get_color(), linestyle=":", alpha=0.5)
                    ax.annotate(
                        label,
                        (x, 0.02),
                        xycoords=("data", "axes fraction"),
                        fontsize=7,
                        color=line.get_color(),
                    )
        ax.set_title(f"{split}: {next(iter(results.values())).config['agents']} agents")
        ax.set_xlabel("communication round")
        ax.set_ylabel("federated validation accuracy (star: held-out test)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Federated chain vs e2e vs topk under equal communication rounds "
        "(accuracy, bytes, memory).",
    )
    parser.add_argument("--splits", default="dirichlet:0.5,iid", help="comma-separated splits")
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--train-rows", type=int, default=1600, help="training rows in all")
    parser.add_argument("--val-rows", type=int, default=800, help="validation rows in all")
    parser.add_argument("--test-rows", type=int, default=1000, help="held-out test rows")
    parser.add_argument("--max-len", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-layer", type=int, help="chain start layer (default: FOAT)")
    parser.add_argument("--window", type=int, default=2, help="DLCT window Q")
    parser.add_argument(
        "--gpo", default="proxy", help="chain's GPO: proxy | exact:K | exact:all | none"
    )
    parser.add_argument(
        "--gpo-lambda", type=float, help="chain's global-loss weight (default: bert 0.1)"
    )
    parser.add_argument("--topk", type=int, default=2, help="K of the topk baseline")
    parser.add_argument("--min-rounds-per-layer", type=int, default=1)
    parser.add_argument("--max-rounds-per-layer", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, every mode")
    parser.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default="fedavg",
        help="the coordinator's aggregation, every mode (default: %(default)s)",
    )
    parser.add_argument("--rank", type=int, default=8)
    add_device_arguments(parser, per_agent=True)
    parser.add_argument(
        "--out", type=Path, help="output folder (default: benchmarks/results/accuracy-<time>)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path("benchmarks/results") / time.strftime("accuracy-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs = {split: run_split(split, args, out) for split in args.splits.split(",")}
    rows = [row(split, mode, r) for split, results in runs.items() for mode, r in results.items()]
    num_layers = next(iter(next(iter(runs.values())).values())).num_layers
    verdicts = checks(rows, num_layers, f"topk:{args.topk}")
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )
    command = " ".join(["python", "benchmarks/accuracy.py", *(argv or sys.argv[1:])])
    report = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "num_layers": num_layers,
        "rows": rows,
        "checks": verdicts,
        "runs": {
            split: {mode: r.to_dict() for mode, r in results.items()}
            for split, results in runs.items()
        },
        "seconds": time.perf_counter() - started,
    }
    write_json(out / "accuracy.json", report)
    plot(runs, out / "accuracy.png")
    check_lines = [
        f"* {c['split']}: {c['check']}: {c['values']} — {'holds' if c['holds'] else 'FAILS'}"
        for c in verdicts
    ]
    markdown = "\n".join(
        [
            "# Federated accuracy: chain vs e2e vs topk, equal rounds",
            "",
            f"`{command}` — {report['date']} — {machine}; {report['seconds']:.0f} s",
            "",
            f"{args.agents} agents, {args.train_rows} training rows in all, aggregation "
            f"{args.aggregation}, lr {args.lr}, {args.local_steps} local steps of micro-batch "
            f"{args.micro_batch} per round, LoRA rank {args.rank}, window {args.window}, "
            f"GPO {args.gpo} (lambda {args.gpo_lambda or 'the family default'}).",
            "",
            table(rows),
            "",
            *check_lines,
            "",
            "![accuracy](accuracy.png)",
        ]
    )
    (out / "accuracy.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nwrote {out / 'accuracy.json'}, {out / 'accuracy.md'}, {out / 'accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
