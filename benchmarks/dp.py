"""Accuracy vs privacy: client-level DP-FedAvg of the chain at ε ∈ {1, 4, 8, ∞}.

What runs. One federation per target ε — ``--agents`` agents on the packaged
all-MiniLM-L6-v2 and tweets (iid shards), simulated in one process
(``chainfed.agent.app.simulation``: the product's ``ChainCoordinator`` and
``FederatedAgent`` round work) — with the same data, seed and schedule: the chain from
``--start-layer`` to the last layer, exactly ``--rounds-per-layer`` rounds per stage, so
the number of rounds R is known before training. For a finite ε the noise multiplier z
is the smallest that keeps ε(R rounds) ≤ ε at ``--delta`` for the sampling rate
q = ``--agents-per-round`` / ``--agents`` (``chainfed.coordinator.dp.noise_multiplier_for``:
the coordinator's own RDP accountant); the coordinator gets ``--dp-noise-multiplier z
--dp-clip C --dp-mode MODE --dp-epsilon-budget ε``. ε = ∞ is the same federation with the
same clipping (``--clip-norm C``) and no noise.

Measured, per run: the final adapters' accuracy on one held-out test set (``--test-rows``
rows no agent holds, the same for every run), the coordinator's evaluation-round
accuracy, z, the rounds run and the ε they spent (the accountant over the rounds the
coordinator aggregated).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/dp.py                      # ~10 min on 2 CPU cores
    python benchmarks/dp.py --epsilons 1,8,inf --agents 20 --out runs/dp

Outputs in ``--out`` (default ``benchmarks/results/dp-<timestamp>``): ``dp.json`` (every
run: options, z, ε, accuracy, per-round validation accuracy), ``dp.md`` (the table, also
printed) and ``dp.png`` (test accuracy vs ε) when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from chainfed.agent.app.options import SimulationConfig, add_device_arguments
from chainfed.agent.app.simulation import run_simulation
from chainfed.agent.convert.assets import resolve_model
from chainfed.agent.runtime.model import StreamingModel
from chainfed.coordinator.dp import epsilon_for, noise_multiplier_for


def parse_epsilons(text: str) -> list[float]:
    """``1,4,8,inf`` -> [1.0, 4.0, 8.0, inf]; every value > 0."""
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"epsilons must be > 0, got {text!r}")
    return values


def federation(args: argparse.Namespace, workdir: Path) -> SimulationConfig:
    """The federation every ε runs (only the coordinator's DP options differ)."""
    return SimulationConfig(
        agents=args.agents,
        agents_per_round=args.agents_per_round,
        split=args.split,
        model=args.model,
        train_rows=args.train_rows,
        val_rows=args.val_rows,
        test_rows=args.test_rows,
        max_len=args.max_len,
        seed=args.seed,
        start_layer=args.start_layer,
        window=args.window,
        gpo=args.gpo,
        min_rounds_per_layer=args.rounds_per_layer,
        max_rounds_per_layer=args.rounds_per_layer,
        local_steps=args.local_steps,
        micro_batch=args.micro_batch,
        lr=args.lr,
        rank=args.rank,
        device=args.device,
        dtype=args.dtype,
        unified_memory=args.unified_memory,
        in_process=True,
        workdir=workdir,
    )


def run_epsilon(
    epsilon: float, args: argparse.Namespace, num_layers: int, out: Path
) -> dict[str, Any]:
    """One federation at target ``epsilon`` (inf: clipping only); its table row."""
    rounds = (num_layers - args.start_layer) * args.rounds_per_layer
    q = args.agents_per_round / args.agents if args.agents_per_round else 1.0
    accounted_q = q if args.mode == "central" else 1.0
    if math.isinf(epsilon):
        z = None
        options: dict[str, Any] = {"clip_norm": args.clip}
    else:
        z = noise_multiplier_for(epsilon, accounted_q, rounds, args.delta)
        options = {
            "dp_noise_multiplier": z,
            "dp_clip": args.clip,
            "dp_delta": args.delta,
            "dp_mode": args.mode,
            "dp_epsilon_budget": epsilon,
        }
    # one workdir for every run: the agents' prefix caches below the chain are shared
    config = replace(federation(args, out / "work"), coordinator_options=options)
    result = run_simulation(config)
    spent = None if z is None else epsilon_for([(z, accounted_q, result.rounds)], args.delta)
    print(
        f"epsilon {epsilon:g}: z {z if z is None else round(z, 4)}, {result.rounds} rounds, "
        f"spent {spent if spent is None else round(spent, 4)}, "
        f"test accuracy {result.test_metric:.4f}",
        flush=True,
    )
    return {
        "target_epsilon": epsilon,
        "noise_multiplier": z,
        "sampling_rate": accounted_q,
        "planned_rounds": rounds,
        "rounds": result.rounds,
        "epsilon_spent": spent,
        "test_accuracy": result.test_metric,
        "test_loss": result.test_loss,
        "final_val_accuracy": result.final_val_metric,
        "val_accuracy_per_round": [e.val_metric for e in result.history],
        "seconds": result.seconds,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| target ε | noise multiplier z | rounds | ε spent | test accuracy | final val accuracy "
        "| seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        z = "— (clipping only)" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.4g}"
        spent = "∞" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.3f}"
        lines.append(
            f"| {r['target_epsilon']:g} | {z} | {r['rounds']} | {spent} "
            f"| {r['test_accuracy']:.4f} | {r['final_val_accuracy']:.4f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Test accuracy vs ε (∞ drawn as a dashed line); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    finite = [r for r in rows if not math.isinf(r["target_epsilon"])]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(
        [r["target_epsilon"] for r in finite],
        [r["test_accuracy"] for r in finite],
        marker="o",
        label="DP-FedAvg",
    )
    for r in rows:
        if math.isinf(r["target_epsilon"]):
            ax.axhline(r["test_accuracy"], linestyle="--", color="gray", label="ε = ∞ (no noise)")
    ax.set_xscale("log")
    ax.set_xlabel("ε (δ fixed)")
    ax.set_ylabel("held-out test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Accuracy vs epsilon of client-level DP-FedAvg on MiniLM + tweets."
    )
    parser.add_argument("--epsilons", type=parse_epsilons, default=parse_epsilons("1,4,8,inf"))
    parser.add_argument("--mode", choices=("central", "local"), default="central")
    parser.add_argument("--clip", type=float, default=0.5, help="C: L2 bound of each update")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--agents", type=int, default=60)
    parser.add_argument("--agents-per-round", type=int, default=0, help="0 = all (q = 1)")
    parser.add_argument("--split", default="iid")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--train-rows", type=int, default=1800, help="training rows in all")
    parser.add_argument("--val-rows", type=int, default=300, help="validation rows in all")
    parser.add_argument("--test-rows", type=int, default=600, help="held-out test rows")
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-layer", type=int, default=5, help="first chain layer")
    parser.add_argument("--window", type=int, default=1, help="DLCT window Q")
    parser.add_argument("--gpo", default="none")
    parser.add_argument("--rounds-per-layer", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=1)
    add_device_arguments(parser, per_agent=True)
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/dp-<time>")
    args = parser.parse_args(argv)
    args.num_layers = StreamingModel(resolve_model(args.model, progress=False)).num_layers
    if not 0 <= args.start_layer < args.num_layers:
        parser.error(f"--start-layer must be in 0..{args.num_layers - 1}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path("benchmarks/results") / time.strftime("dp-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = [run_epsilon(e, args, args.num_layers, out) for e in args.epsilons]
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    )
    command = " ".join(["python", "benchmarks/dp.py", *(sys.argv[1:] if argv is None else argv)])
    report = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    (out / "dp.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    png = plot(rows, out / "dp.png")
    q = args.agents_per_round / args.agents if args.agents_per_round else 1.0
    markdown = "\n".join(
        [
            "# Accuracy vs ε: client-level DP-FedAvg of the chain (MiniLM + tweets)",
            "",
            f"`{command}` — {report['date']} — {machine}; {report['seconds']:.0f} s",
            "",
            f"{args.agents} agents ({args.split}), sampling rate q = {q:g}, {args.mode} noise, "
            f"clip C = {args.clip:g}, δ = {args.delta:g}; layers {args.start_layer}.."
            f"{args.num_layers - 1}, {args.rounds_per_layer} rounds per layer.",
            "",
            table(rows),
            *([] if png is None else ["", "![accuracy vs epsilon](dp.png)"]),
        ]
    )
    (out / "dp.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nwrote {out / 'dp.json'}, {out / 'dp.md'}" + ("" if png is None else f", {png}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
