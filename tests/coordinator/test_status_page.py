"""The status page's pieces: where the token is read from, what the HTML and JSON hold.

The page in a real browser during a real run is ``test_operations.py``'s; these pin the
details a browser would not show: a hostile agent id is escaped, a malformed header is
no token, a non-finite figure is JSON null, the chart marks every stage boundary.
"""

from __future__ import annotations

import base64
import json
import math
import urllib.error
import urllib.request

import pytest

from chainfed.coordinator.status_html import accuracy_chart, peak_memory_per_layer, render_page
from chainfed.coordinator.status_page import StatusPage, snapshot_to_json, token_from_authorization
from chainfed.proto.messages import (
    AgentCapabilities,
    AgentStatus,
    ChainPhase,
    RoundRecord,
    StatusSnapshot,
    UpdateMetrics,
)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    "header, token",
    [
        ("Bearer s3cret", "s3cret"),
        ("bearer   s3cret ", "s3cret"),
        (basic("anyone", "s3cret"), "s3cret"),
        (basic("", "pa:ss"), "pa:ss"),
        (basic("user", ""), None),
        ("Basic not-base64!", None),
        ("Bearer", None),
        ("Token s3cret", None),
        ("", None),
        (None, None),
    ],
)
def test_the_token_comes_from_the_authorization_header(header, token):
    assert token_from_authorization(header) == token


def record(round_id: str, layer: int, metric: float, peak: int = 0) -> RoundRecord:
    metrics = UpdateMetrics(10, 5, 1, 0.5, 0.4, metric, peak, 0.1)
    return RoundRecord(round_id, layer, (layer,), ("a",), (), metrics, 0, ("d",))


def snapshot(**overrides) -> StatusSnapshot:
    caps = AgentCapabilities("cpu", 0, 10, "0.1.0", "f" * 64)
    values = dict(
        phase=ChainPhase.TRAINING,
        num_layers=4,
        start_layer=1,
        stage_layer=2,
        window_layers=(1, 2),
        agents=(
            AgentStatus("<script>alert(1)</script>", caps, 0, 1),
            AgentStatus("b", caps, 0, 1, inactive=True),
        ),
        history=(
            record("r1", 1, 0.5, 3 << 20),
            record("r2", 1, 0.6, 5 << 20),
            record("r3", 2, 0.7, 4 << 20),
            record("eval4", 3, 0.8),
        ),
    )
    values.update(overrides)
    return StatusSnapshot(**values)


def test_the_page_shows_position_and_agents_and_escapes_what_agents_sent():
    page = render_page(snapshot(), now_ms=2_000)
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<dd id=stage-layer>2</dd>" in page and "<dd id=window>1, 2</dd>" in page
    assert "<span id=agents-registered>2</span>" in page
    assert "<span id=agents-active>1</span>" in page
    assert "<span class=inactive>inactive</span>" in page
    assert '<meta http-equiv="refresh"' in page


def test_the_chart_marks_each_stage_boundary_and_memory_is_per_layer():
    history = snapshot().history
    chart = accuracy_chart(history)
    assert chart.count("<circle") == 4
    assert chart.count('stroke-dasharray="4 3"') == 2  # 1 -> 2, and the evaluation
    assert ">layer 2</text>" in chart and ">layer eval</text>" in chart
    assert peak_memory_per_layer(history) == {1: 5 << 20, 2: 4 << 20}
    assert "No round finished yet" in accuracy_chart(())


def test_json_holds_the_snapshot_with_non_finite_figures_as_null():
    data = snapshot_to_json(snapshot(dp_epsilon=math.inf))
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text)["dp_epsilon"] is None
    assert data["phase"] == "training" and data["stage_layer"] == 2
    assert [a["inactive"] for a in data["agents"]] == [False, True]


def test_every_path_refuses_without_a_valid_token_over_a_real_socket():
    page = StatusPage(snapshot, {"good-token": "", "agent-token": "agent-7"})
    base = f"http://127.0.0.1:{page.port}"

    def get(path: str, header: str | None) -> int:
        request = urllib.request.Request(base + path)
        if header:
            request.add_header("Authorization", header)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            assert header is None or exc.code != 401 or "WWW-Authenticate" in exc.headers
            return exc.code

    try:
        for path in ("/", "/status.json", "/nothing-here"):
            assert get(path, None) == 401
            assert get(path, "Bearer bad-token") == 401
            assert get(path, basic("x", "bad-token")) == 401
        assert get("/", "Bearer good-token") == 200
        assert get("/status.json", basic("me", "agent-token")) == 200  # any of the tokens
        assert get("/nothing-here", "Bearer good-token") == 404
    finally:
        page.close()


def test_the_closed_form_head_round_is_shown_without_validation_figures():
    fit = RoundRecord("fit1", 1, (), ("a",), (), UpdateMetrics(10, 0, 0, 0, 0, 0, 1, 0.1), 0)
    history = (fit, *snapshot().history)

    chart = accuracy_chart(history)
    page = render_page(snapshot(history=history), now_ms=2_000)

    assert fit.head_fit and not history[1].head_fit
    assert chart == accuracy_chart(history[1:])  # nothing validated: no point at 0
    row = "<tr><td>fit1</td><td class=n>1</td><td>head fit</td><td class=n>1</td>"
    assert row + "<td class=n>0</td>" + "<td class=n>-</td>" * 3 + "</tr>" in page
