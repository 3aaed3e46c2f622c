"""The status page's HTML, rendered on the server from one ``StatusSnapshot``.

One self-contained document (no script, no external file): the chain position, the
agents, validation accuracy against rounds as inline SVG with the stage boundaries
marked, the peak memory per layer, ε under differential privacy, and the round
history, newest first. It reloads itself every ``REFRESH_S`` seconds (a meta refresh;
the browser re-sends its credentials). Every value from the chain is HTML-escaped.

Elements a test or a script may look for carry ids: ``phase``, ``stage-layer``,
``window``, ``agents-registered``, ``agents-active``, ``rounds-total``, ``accuracy-chart``,
``dp-epsilon``.
"""

from __future__ import annotations

import time
from html import escape

from chainfed.proto.messages import RoundRecord, StatusSnapshot
from chainfed.proto.units import format_bytes

REFRESH_S = 5
"""Seconds between the page's reloads."""
HISTORY_ROWS = 200
"""Newest rounds listed in the history table (the chart shows every round)."""

_WIDTH, _HEIGHT = 720, 260
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 16, 16, 40
_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:60em}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse}td,th{padding:.15em .7em;border-bottom:1px solid #ddd;
text-align:left}td.n,th.n{text-align:right}dl{display:grid;grid-template-columns:auto 1fr;
gap:.1em 1em;margin:0}dt{color:#666}dd{margin:0;font-weight:600}.inactive{color:#b00}
.muted{color:#777}svg text{font-size:11px;fill:#444}
"""


def render_page(s: StatusSnapshot, *, now_ms: int | None = None) -> str:
    """The whole page for snapshot ``s`` (``now_ms``: the clock the "last seen" column
    counts from; default now)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="refresh" content="{REFRESH_S}">',
        "<title>ChainFed coordinator</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>ChainFed coordinator</h1>",
        _position(s),
        _agents(s, now_ms),
        "<h2>Validation accuracy against rounds</h2>",
        accuracy_chart(s.history),
        _memory(s.history),
        _history(s),
        f"<p class=muted>Reloads every {REFRESH_S} s.</p></body></html>",
    ]
    return "\n".join(parts)


def _position(s: StatusSnapshot) -> str:
    def item(label: str, ident: str, value: object) -> str:
        return f"<dt>{label}</dt><dd id={ident}>{escape(str(value))}</dd>"

    items = [
        item("phase", "phase", s.phase.value),
        item("layers", "num-layers", s.num_layers),
        item("start layer", "start-layer", _or_dash(s.start_layer)),
        item("current layer", "stage-layer", _or_dash(s.stage_layer)),
        item("window", "window", _layers(s.window_layers)),
        item("final layers", "final-layers", _layers(s.final_layers)),
        item("round", "round", s.round_id or "-"),
        item("rounds", "rounds-total", f"{s.stage_rounds} in this stage, {s.total_rounds} total"),
    ]
    if s.dp_epsilon is not None:
        budget = "" if s.dp_epsilon_budget is None else f" of {s.dp_epsilon_budget:g}"
        items.append(
            item("ε spent", "dp-epsilon", f"{s.dp_epsilon:.4g}{budget} (δ {s.dp_delta:g})")
        )
    if s.stop_reason:
        items.append(item("stopped early", "stop-reason", s.stop_reason))
    return "<h2>Chain</h2><dl>" + "".join(items) + "</dl>"


def _agents(s: StatusSnapshot, now_ms: int) -> str:
    active = sum(not a.inactive for a in s.agents)
    rows = []
    for a in s.agents:
        c = a.capabilities
        state = "<span class=inactive>inactive</span>" if a.inactive else "active"
        rows.append(
            f"<tr><td>{escape(a.agent_id)}</td><td>{escape(c.device)}</td>"
            f"<td class=n>{c.num_samples}</td><td>{state}</td>"
            f"<td class=n>{a.rounds_completed}</td>"
            f"<td class=n>{max(0, now_ms - a.last_seen_unix_ms) / 1000:.0f} s ago</td></tr>"
        )
    return (
        f"<h2>Agents: <span id=agents-registered>{len(s.agents)}</span> registered, "
        f"<span id=agents-active>{active}</span> active</h2>"
        "<table><tr><th>agent</th><th>device</th><th class=n>samples</th><th>state</th>"
        "<th class=n>rounds</th><th class=n>last seen</th></tr>" + "".join(rows) + "</table>"
    )


def accuracy_chart(history: tuple[RoundRecord, ...]) -> str:
    """Inline SVG: the federated validation metric of every round (x: round number in
    the chain, y: the metric), a dashed line where the stage layer changes, labelled with
    the new layer. Empty rounds history: a note instead."""
    history = tuple(r for r in history if not r.head_fit)  # nothing validated there
    if not history:
        return "<p id=accuracy-chart class=muted>No round finished yet.</p>"
    values = [r.metrics.val_metric for r in history]
    low, high = min(values), max(values)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM

    def x(i: int) -> float:
        return _LEFT + (plot_w * i / (len(history) - 1) if len(history) > 1 else plot_w / 2)

    def y(v: float) -> float:
        return _TOP + plot_h * (high - v) / (high - low)

    marks = []
    for i in range(1, len(history)):
        if history[i].stage_layer != history[i - 1].stage_layer:
            bx = (x(i - 1) + x(i)) / 2
            label = "eval" if history[i].round_id.startswith("eval") else history[i].stage_layer
            marks.append(
                f'<line x1="{bx:.1f}" y1="{_TOP}" x2="{bx:.1f}" y2="{_TOP + plot_h}" '
                'stroke="#999" stroke-dasharray="4 3"/>'
                f'<text x="{bx + 3:.1f}" y="{_TOP + 10}">layer {escape(str(label))}</text>'
            )
    points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
    dots = "".join(
        f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="#1f6feb">'
        f"<title>{escape(r.round_id)}: {v:.4f}</title></circle>"
        for i, (r, v) in enumerate(zip(history, values, strict=True))
    )
    axes = (
        f'<line x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{_LEFT + plot_w}" y2="{_TOP + plot_h}" '
        'stroke="#444"/>'
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + plot_h}" stroke="#444"/>'
        f'<text x="{_LEFT - 6}" y="{_TOP + 4}" text-anchor="end">{high:.3g}</text>'
        f'<text x="{_LEFT - 6}" y="{_TOP + plot_h}" text-anchor="end">{low:.3g}</text>'
        f'<text x="{_LEFT}" y="{_HEIGHT - 18}">round 1</text>'
        f'<text x="{_LEFT + plot_w}" y="{_HEIGHT - 18}" text-anchor="end">'
        f"round {len(history)}</text>"
        f'<text x="{_LEFT + plot_w / 2}" y="{_HEIGHT - 4}" text-anchor="middle">'
        "validation metric (accuracy for classification) per round</text>"
    )
    return (
        f'<svg id=accuracy-chart width="{_WIDTH}" height="{_HEIGHT}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" '
        'aria-label="validation accuracy against rounds">'
        f'{axes}{"".join(marks)}<polyline points="{points}" fill="none" stroke="#1f6feb" '
        f'stroke-width="2"/>{dots}</svg>'
    )


def peak_memory_per_layer(history: tuple[RoundRecord, ...]) -> dict[int, int]:
    """Stage layer -> the highest peak memory an agent reported in its training rounds
    (evaluation rounds excluded: they train no layer)."""
    peaks: dict[int, int] = {}
    for r in history:
        if not r.round_id.startswith("eval"):
            peaks[r.stage_layer] = max(peaks.get(r.stage_layer, 0), r.metrics.peak_memory_bytes)
    return peaks


def _memory(history: tuple[RoundRecord, ...]) -> str:
    rows = "".join(
        f"<tr><td class=n>{layer}</td><td class=n>{format_bytes(peak) if peak else '-'}</td></tr>"
        for layer, peak in sorted(peak_memory_per_layer(history).items())
    )
    return (
        "<h2>Peak memory per layer</h2><table><tr><th class=n>layer</th>"
        f"<th class=n>highest agent peak</th></tr>{rows}</table>"
    )


def _history(s: StatusSnapshot) -> str:
    dp = any(r.dp_epsilon is not None for r in s.history)
    rows = []
    for r in reversed(s.history[-HISTORY_ROWS:]):
        m = r.metrics
        epsilon = f"<td class=n>{_or_dash(r.dp_epsilon, '.4g')}</td>" if dp else ""
        losses = (
            "<td class=n>-</td>" * 3
            if r.head_fit
            else f"<td class=n>{m.train_loss:.4f}</td><td class=n>{m.val_loss:.4f}</td>"
            f"<td class=n>{m.val_metric:.4f}</td>"
        )
        window = "head fit" if r.head_fit else _layers(r.window_layers)
        rows.append(
            f"<tr><td>{escape(r.round_id)}</td><td class=n>{r.stage_layer}</td>"
            f"<td>{window}</td><td class=n>{len(r.participants)}</td>"
            f"<td class=n>{len(r.dropped)}</td>{losses}{epsilon}</tr>"
        )
    older = len(s.history) - min(len(s.history), HISTORY_ROWS) + s.history_omitted
    note = f"<p class=muted>{older} older rounds not shown.</p>" if older else ""
    return (
        "<h2>Rounds</h2><table><tr><th>round</th><th class=n>layer</th><th>window</th>"
        "<th class=n>agents</th><th class=n>dropped</th><th class=n>train loss</th>"
        "<th class=n>val loss</th><th class=n>val metric</th>"
        + ("<th class=n>ε</th>" if dp else "")
        + "</tr>"
        + "".join(rows)
        + f"</table>{note}"
    )


def _layers(layers: tuple[int, ...]) -> str:
    return ", ".join(map(str, layers)) if layers else "-"


def _or_dash(value: float | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)
