"""Tables, plots and files of a simulated federation (``chainfed simulate``, ``chainfed demo``).

Everything here is derived from a ``SimulationResult``; nothing is measured. Plots use
matplotlib's non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chainfed.agent.app.simulation import SimulationResult
from chainfed.proto.units import format_bytes

MEASURED_AGGREGATE_NOTE = (
    "Validation figures of a round are those of the aggregate it started from (agents "
    "validate what they fetch, before their local steps), read by the head right after the "
    "window: below the last layer they are not the whole model's (on a decoder, its own LM "
    "head reads the window's output directly). A layer's are its last round's, so what a "
    "stage hands on is measured by the next stage's first round, the last stage's by the "
    "final evaluation, the one figure of the whole model."
)
"""Says which model the per-round and per-layer validation figures belong to."""


def window_text(window: list[int]) -> str:
    """``3-4`` for a window of layers 3 and 4; ``head`` for a head round's empty one."""
    return f"{window[0]}-{window[-1]}" if window else "head"


def stage_table(result: SimulationResult) -> str:
    """Markdown: per stage layer, its rounds, last federated validation figures and the
    largest per-agent memory peak (absolute and above the agent's idle process).
    ``MEASURED_AGGREGATE_NOTE`` says which model those figures are of."""
    lines = [
        "| layer | window | rounds | val loss | val accuracy | peak memory | above baseline |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in result.stages():
        window, val = window_text(s["window"]), f"{s['val_loss']:.4f} | {s['val_metric']:.4f}"
        if s["fit"]:
            window, val = "head fit", "— | —"
        lines.append(
            f"| {s['layer']} | {window} | {s['rounds']} | {val} "
            f"| {format_bytes(s['peak_memory_bytes'])} "
            f"| {format_bytes(s['above_baseline_bytes'])} |"
        )
    return "\n".join(lines)


def round_table(result: SimulationResult) -> str:
    """Markdown: every training round with its agents, losses and mean traffic per agent."""
    lines = [
        "| round | layer | window | agents | dropped | train loss | val loss | val accuracy "
        "| sent / agent | received / agent |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in result.history:
        n = max(len(e.sent_bytes), 1)
        window = "head fit" if e.head_fit else window_text(e.window)
        losses = f"{e.train_loss:.4f} | {e.val_loss:.4f} | {e.val_metric:.4f}"
        if e.head_fit:
            losses = "— | — | —"
        lines.append(
            f"| {e.round_id} | {e.stage_layer} | {window} "
            f"| {len(e.participants)} | {len(e.dropped)} | {losses} "
            f"| {format_bytes(sum(e.sent_bytes.values()) // n)} "
            f"| {format_bytes(sum(e.received_bytes.values()) // n)} |"
        )
    return "\n".join(lines)


def summary_lines(result: SimulationResult) -> list[str]:
    """A few lines: rounds, final figures, traffic and memory per agent."""
    lines = [
        f"rounds: {result.rounds} (start layer {result.start_layer} of {result.num_layers})",
        "training rows per agent: "
        + ", ".join(f"{a} {n}" for a, n in result.agent_samples.items())
        + ("" if result.label_skew is None else f"; label skew {result.label_skew:.3f}"),
        f"final validation (every agent's validation rows): accuracy "
        f"{result.final_val_metric:.4f}, loss {result.final_val_loss:.4f}",
    ]
    if result.test_metric is not None:
        lines.append(
            f"held-out test: accuracy {result.test_metric:.4f}, loss {result.test_loss:.4f}"
        )
    traffic = result.bytes_per_agent()
    peaks = result.peak_memory_per_agent()
    lines.append(
        f"traffic per agent per round (sent + received tensors): "
        f"{format_bytes(int(result.bytes_per_agent_round()))}; per agent in all: "
        + ", ".join(f"{a} {format_bytes(b)}" for a, b in traffic.items())
    )
    lines.append(
        "peak memory per agent: " + ", ".join(f"{a} {format_bytes(b)}" for a, b in peaks.items())
    )
    lines.append(f"wall time: {result.seconds:.1f} s")
    return lines


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stage_boundaries(result: SimulationResult) -> list[tuple[float, str]]:
    """(x, label) where a new stage begins, x between its first round and the one before;
    the label is ``L{layer}``, or ``head`` for the head rounds after the chain."""
    out = []
    for i, entry in enumerate(result.history):
        before = result.history[i - 1] if i else None
        if (
            before is None
            or entry.stage_layer != before.stage_layer
            or bool(entry.window) != bool(before.window)
            or entry.head_fit != before.head_fit
        ):
            label = f"L{entry.stage_layer}" if entry.window else "head"
            out.append((i + 0.5, "fit" if entry.head_fit else label))
    return out


def _label_stages(ax: Any, boundaries: list[tuple[float, str]], rounds: int) -> None:
    """Name each stage's layer on a second x axis along the top, centred over its
    rounds: tick labels are laid out with the figure, so none is cut at the edge."""
    ends = [x for x, _ in boundaries[1:]] + [rounds + 0.5]
    centres = [(x + end) / 2 for (x, _), end in zip(boundaries, ends, strict=True)]
    top = ax.secondary_xaxis("top")
    top.set_xticks(centres, labels=[label for _, label in boundaries])
    top.tick_params(length=0, labelsize=7)
    top.set_xlabel("stage layer", fontsize=8)


def plot_accuracy(
    curves: dict[str, SimulationResult],
    path: Path,
    *,
    title: str,
    baselines: dict[str, float] | None = None,
) -> Path:
    """Validation accuracy per round, one line per run: each round's federated figure (see
    ``MEASURED_AGGREGATE_NOTE``), with the head right after the window. The stages of a
    chain run (one with several stage layers) are marked by dotted lines, and the first
    such run's layers are named along the top; ``baselines`` are flat lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labelled = False
    for label, result in curves.items():
        validated = [(i, e) for i, e in enumerate(result.history, 1) if not e.head_fit]
        xs, ys = [i for i, _ in validated], [e.val_metric for _, e in validated]
        (line,) = ax.plot(xs, ys, marker="o", label=label)
        boundaries = stage_boundaries(result)
        if len(boundaries) > 1:
            for x, _label in boundaries:
                ax.axvline(x, color=line.get_color(), linestyle=":", alpha=0.6)
            if not labelled:
                _label_stages(ax, boundaries, result.rounds)
                labelled = True
    styles = iter(["--", "-.", (0, (1, 1)), (0, (5, 1))])
    for label, value in (baselines or {}).items():
        ax.axhline(value, color="grey", linestyle=next(styles), label=label)
    ax.set_xlabel("communication round")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_memory(result: SimulationResult, path: Path, *, e2e_bytes: int, e2e_label: str) -> Path:
    """Measured peak per stage layer (largest agent, above its idle process) as bars and
    a measured end-to-end peak (``e2e_bytes``, described by ``e2e_label``) as a line."""
    plt = pyplot()
    stages = result.stages()
    mib = 1 << 20
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar(
        ["head fit" if s["fit"] else "head" if s["head"] else str(s["layer"]) for s in stages],
        [s["above_baseline_bytes"] / mib for s in stages],
        label="chain, measured (largest agent, above its idle process)",
    )
    ax.axhline(e2e_bytes / mib, color="tab:red", linestyle="--", label=e2e_label)
    ax.set_xlabel("stage layer")
    ax.set_ylabel("peak memory above idle process (MiB)")
    ax.set_title("Peak training memory per layer: chain vs end-to-end")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
