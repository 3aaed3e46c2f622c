"""``chainfed simulate``: a whole federation on this machine, every knob exposed.

A thin command over ``chainfed.agent.app.simulation``: options become a ``SimulationConfig``,
the run prints one progress line per round, and ``OUT/report.json``, ``OUT/report.md``
and ``OUT/accuracy.png`` are written.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from chainfed.agent.app.json_report import write_json
from chainfed.agent.app.options import add_simulation_arguments, simulation_config_from_args
from chainfed.agent.app.simulation import run_simulation
from chainfed.agent.app.simulation_report import (
    MEASURED_AGGREGATE_NOTE,
    plot_accuracy,
    round_table,
    stage_table,
    summary_lines,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``chainfed simulate``: a federation's, and where the report goes."""
    add_simulation_arguments(parser)
    o = parser.add_argument_group("output")
    o.add_argument("--out", type=Path, help="run folder (default: runs/simulate-<time>)")
    o.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    """Simulate, print the tables, write the report files."""
    out = args.out or Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S")
    config = simulation_config_from_args(args, out)
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
