"""The coordinator as a service people operate, over real sockets and real processes.

A real ``python -m chainfed.coordinator --model-spec`` process (the packaged MiniLM's
spec: start layer 3, window 2, ``ROUNDS_PER_LAYER`` rounds per layer) serves synthetic
agents (``chainfed.coordinator.testing.synthetic_agent``: real gRPC clients uploading
seeded noise of MiniLM's adapter shapes), one process per agent so that one can be
killed for good. Checked:

* health (``grpc.health.v1``): SERVING after start-up, NOT_SERVING seen on a ``Watch``
  stream as soon as a shutdown starts; NOT_SERVING (and ChainFed UNAVAILABLE) while the
  state is loading;
* metrics, scraped during a run of three agents: rounds aggregated, updates accepted,
  a NaN update counted as rejected with reason ``not_finite``;
* SIGTERM in the middle of a round: exit 0 within 10 s, the state on disk whole, a
  restart finishes the chain and every aggregated update digest is one an agent had
  accepted, none twice, no round aggregated in part;
* an agent killed for good stops delaying rounds after ``--agent-timeout``, and
  ``chainfed status`` shows it inactive;
* the status page in a real headless Chromium (Debian's ``chromium``, driven over its
  DevTools pipe, so the token travels in a header and never on a command line): it
  shows the current layer and the agent count; without the token page and JSON refuse.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chainfed.agent.runtime.model import StreamingModel
from chainfed.coordinator.__main__ import build_parser
from chainfed.coordinator.chain_state import ChainCoordinator
from chainfed.coordinator.config import CoordinatorConfig
from chainfed.coordinator.service import CoordinatorServer, ServiceConfig
from chainfed.coordinator.testing.synthetic_agent import AdapterLayout
from chainfed.proto.auth_token import write_token_file
from chainfed.proto.client import CoordinatorClient, CoordinatorError
from chainfed.proto.messages import (
    AgentCapabilities,
    Registration,
    TaskKind,
    TrainingParams,
    UpdateMetrics,
)

TOKEN = "ops-token"
START_LAYER, NUM_LAYERS = 3, 6
ROUNDS_PER_LAYER = 4
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def round_number(round_id: str) -> int:
    return int(round_id.lstrip("abcdefghijklmnopqrstuvwxyz"))


class Service:
    """One coordinator process (restartable on its port and state dir) and its agents."""

    def __init__(self, root: Path, spec: Path, layout: Path, fingerprint: str) -> None:
        self.root, self.spec, self.layout, self.fingerprint = root, spec, layout, fingerprint
        self.port = free_port()
        self.state_dir = root / "state"
        self.token_file = write_token_file(root / "token", TOKEN)
        self.processes: list[subprocess.Popen] = []
        self.swarms: dict[str, tuple[subprocess.Popen, Path]] = {}
        (root / "logs").mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        with open(self.root / "logs" / f"{name}.log", "ab") as out:
            process = subprocess.Popen(argv, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def coordinator(
        self, *flags: str, rounds_per_layer: int = ROUNDS_PER_LAYER, exit_after_done: float = 2
    ) -> subprocess.Popen:
        return self._spawn(
            "coordinator",
            [
                *(sys.executable, "-m", "chainfed.coordinator", "--model-spec", str(self.spec)),
                *("--state-dir", str(self.state_dir), "--host", "127.0.0.1"),
                *("--port", str(self.port), "--token-file", str(self.token_file)),
                *("--start-layer", str(START_LAYER), "--window", "2", "--gpo", "none"),
                *("--min-rounds-per-layer", str(rounds_per_layer)),
                *("--max-rounds-per-layer", str(rounds_per_layer)),
                *("--exit-after-done", str(exit_after_done), "--verbose", *flags),
            ],
        )

    def agents(self, *ids: str, train_seconds: float = 0.2) -> subprocess.Popen:
        """Synthetic agents ``ids`` as threads of one process (one TCP connection each)."""
        name = ",".join(ids)
        report = self.root / f"{name}.json"
        process = self._spawn(
            name,
            [
                *(sys.executable, "-m", "chainfed.coordinator.testing.synthetic_agent"),
                *("--coordinator", self.address, "--token-file", str(self.token_file)),
                *("--fingerprint", self.fingerprint, "--layout", str(self.layout)),
                *("--agent-ids", name, "--poll-ms", "1000", "--give-up-after", "60"),
                *("--timeout", "120", "--json", str(report), "--max-backoff", "0.5"),
                *("--train-seconds", str(train_seconds)),
            ],
        )
        self.swarms[name] = (process, report)
        return process

    def state(self) -> dict | None:
        try:
            return json.loads((self.state_dir / "state.json").read_text())
        except (OSError, ValueError):
            return None

    def history(self) -> list[dict]:
        return (self.state() or {}).get("history", [])

    def wait_for(self, probe: Callable[[], object], timeout: float, what: str) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = probe()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}\n{self.report()}")

    def health(self, service: str = "") -> int:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def serving(self) -> bool:
        try:
            return self.health() == SERVING
        except grpc.RpcError:
            return False

    def report(self) -> str:
        return "\n".join(
            f"===== {p.name} =====\n{p.read_text(errors='replace')[-5000:]}"
            for p in sorted((self.root / "logs").glob("*.log"))
        )

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def assets(minilm_path, tmp_path_factory, benchmark_script) -> tuple[Path, Path, str]:
    """(spec file, adapter layout file, fingerprint) of the packaged MiniLM."""
    folder = tmp_path_factory.mktemp("assets")
    spec = StreamingModel(minilm_path).spec()
    layout = benchmark_script("load").adapter_layout(minilm_path)
    (folder / "layout.json").write_text(json.dumps(layout.to_dict()))
    return spec.write(folder / "spec.json"), folder / "layout.json", spec.fingerprint


@pytest.fixture
def service(assets, tmp_path) -> Service:
    s = Service(tmp_path, *assets)
    yield s
    s.close()


def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as {sample name with labels: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


# -- health --------------------------------------------------------------------------------


def test_health_is_not_serving_while_the_state_loads(tmp_path: Path):
    """In process, over a real socket: the port answers before a chain is attached."""
    config = ServiceConfig(tmp_path / "state", {TOKEN: ""})
    server = CoordinatorServer(config, "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def check(service: str) -> int:
                request = health_pb2.HealthCheckRequest(service=service)
                return health.Check(request, timeout=5).status

            client = CoordinatorClient(f"127.0.0.1:{server.port}", TOKEN)
            assert check("") == check("chainfed.v1.ChainFed") == NOT_SERVING
            with pytest.raises(CoordinatorError) as refused:
                client.status()
            assert refused.value.code is grpc.StatusCode.UNAVAILABLE
            assert "loading its state" in refused.value.details

            chain = CoordinatorConfig(
                num_layers=4, model_fingerprint="f" * 64, task="classify", params=TrainingParams()
            )
            server.attach(ChainCoordinator(chain))
            assert check("") == NOT_SERVING  # until the other endpoints listen too
            server.report_serving()
            assert check("") == check("chainfed.v1.ChainFed") == SERVING
            assert client.status().num_layers == 4
            client.close()
    finally:
        server.shutdown(1.0)
    assert (tmp_path / "state" / "state.json").is_file()  # attach saved the chain


def test_health_serving_after_start_then_not_serving_on_sigint(service: Service):
    coordinator = service.coordinator()
    service.wait_for(service.serving, 60, "SERVING")
    assert service.health("chainfed.v1.ChainFed") == SERVING
    seen: list[int] = []
    watching = threading.Event()

    def watch() -> None:
        with grpc.insecure_channel(service.address) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=30
            )
            try:
                for answer in stream:
                    seen.append(answer.status)
                    watching.set()
            except grpc.RpcError:
                pass  # the server went away: the stream ends

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert watching.wait(10), service.report()
    started = time.monotonic()
    coordinator.send_signal(signal.SIGINT)
    assert coordinator.wait(timeout=10) == 0, service.report()
    elapsed = time.monotonic() - started
    watcher.join(10)
    assert seen[0] == SERVING and seen[-1] == NOT_SERVING, seen
    assert elapsed < 10
    assert "coordinator stopped: state saved" in service.report()


# -- metrics -------------------------------------------------------------------------------


def _submit_nan_then_good(service: Service, agent_id: str) -> tuple[str, str]:
    """As agent ``agent_id``: register, take the first round, upload an update with a NaN,
    then the proper one. Returns (what the refusal said, the round)."""
    layout = AdapterLayout.from_dict(json.loads(service.layout.read_text()))
    client = CoordinatorClient(service.address, TOKEN)
    caps = AgentCapabilities("synthetic", 0, 100, "0.1.0", service.fingerprint)
    client.register(Registration(agent_id, TOKEN, caps))
    deadline = time.monotonic() + 60
    while True:
        task = client.get_task(agent_id, 1000)
        if task.kind is TaskKind.TRAIN_ROUND:
            break
        assert time.monotonic() < deadline, service.report()
    client.fetch(agent_id, task.round_id, task.tensors)
    tensors = layout.update(task.window_layers, seed=7)
    metrics = UpdateMetrics(100, 25, 1, 0.5, 0.5, 0.5, 0, 0.0)
    poisoned = dict(tensors)
    name = next(iter(poisoned))
    poisoned[name] = poisoned[name].clone()
    poisoned[name].view(-1)[0] = torch.nan
    with pytest.raises(CoordinatorError) as refused:
        client.submit(agent_id, task.round_id, metrics, poisoned)
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    client.submit(agent_id, task.round_id, metrics, tensors)
    client.close()
    return refused.value.details, task.round_id


def test_metrics_move_during_a_run_of_three_agents(service: Service):
    metrics_port = free_port()
    coordinator = service.coordinator(
        *("--min-agents", "4", "--agent-timeout", "2", "--round-deadline", "30"),
        *("--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"),
    )
    service.wait_for(service.serving, 60, "SERVING")
    idle = scrape(metrics_port)
    assert idle["chainfed_agents_registered"] == 0
    assert idle["chainfed_rounds_aggregated_total"] == 0
    assert idle['chainfed_phase{phase="waiting_for_agents"}'] == 1
    service.agents("a", "b", "c")
    # the fourth agent of the quorum is this test: one bad update, then a good one
    detail, first_round = _submit_nan_then_good(service, "poisoner")
    assert "NaN" in detail
    service.wait_for(lambda: len(service.history()) >= 2, 60, "two rounds")
    m = scrape(metrics_port)
    assert m["chainfed_rounds_aggregated_total"] >= 2
    assert m["chainfed_rounds_opened_total"] >= m["chainfed_rounds_aggregated_total"]
    assert m["chainfed_updates_accepted_total"] >= 3 + 1
    assert m['chainfed_updates_rejected_total{reason="not_finite"}'] == 1
    assert m["chainfed_agents_registered"] == 4
    assert m["chainfed_received_bytes_total"] > 0 and m["chainfed_sent_bytes_total"] > 0
    assert m["chainfed_aggregation_seconds_count"] == m["chainfed_rounds_aggregated_total"]
    assert m["chainfed_state_save_seconds_count"] >= 2
    assert m['chainfed_phase{phase="training"}'] == 1
    assert START_LAYER <= m["chainfed_stage_layer"] < NUM_LAYERS
    stage = int(m["chainfed_stage_layer"])  # window 2, clipped at the start layer
    assert m["chainfed_window_size"] == min(2, stage - START_LAYER + 1)
    assert m["chainfed_window_first_layer"] == stage - m["chainfed_window_size"] + 1
    first = service.history()[0]
    assert first["round_id"] == first_round and "poisoner" in first["participants"]
    # the poisoner went quiet: after --agent-timeout it is inactive and the chain goes on
    service.wait_for(
        lambda: scrape(metrics_port)["chainfed_agents_active"] == 3, 30, "3 active agents"
    )
    assert coordinator.wait(timeout=90) == 0, service.report()


# -- graceful shutdown -------------------------------------------------------------------------


def disk_state(service: Service) -> dict:
    """The state on disk, checked whole: state.json parses, names a tensors file that is
    there and loads, round ids unique and in order, every aggregated round with one digest
    per participant."""
    from safetensors import safe_open

    state = json.loads((service.state_dir / "state.json").read_text())
    tensors_file = service.state_dir / state["tensors_file"]
    with safe_open(str(tensors_file), framework="pt") as f:
        final = {n: f.get_tensor(n).numpy().tobytes() for n in f.keys() if "final." in n}
    ids = [r["round_id"] for r in state["history"]]
    assert len(ids) == len(set(ids)) and ids == sorted(ids, key=round_number), ids
    for record in state["history"]:
        if not record["round_id"].startswith("eval"):
            assert len(record["update_digests"]) == len(record["participants"]), record
    return {"state": state, "final": final}


def test_sigterm_mid_round_exits_0_within_10s_and_a_restart_loses_nothing(service: Service):
    flags = ("--min-agents", "3", "--round-deadline", "30")
    coordinator = service.coordinator(*flags, rounds_per_layer=2)
    service.agents("a", "b", "c", train_seconds=0.4)
    service.wait_for(lambda: len(service.history()) >= 2, 90, "two rounds")
    # mid-round: a round is open and agents are training or uploading in it
    started = time.monotonic()
    coordinator.send_signal(signal.SIGTERM)
    rc = coordinator.wait(timeout=30)
    elapsed = time.monotonic() - started
    assert rc == 0 and elapsed < 10, (rc, elapsed, service.report())
    print(f"SIGTERM mid-round: exit {rc} after {elapsed:.2f} s")
    before = disk_state(service)
    assert before["state"]["phase"] == "training", "the chain must be mid-way at the SIGTERM"
    assert not service.serving()

    coordinator = service.coordinator(*flags, rounds_per_layer=2)
    assert coordinator.wait(timeout=120) == 0, service.report()
    for process, _ in service.swarms.values():
        assert process.wait(timeout=30) == 0, service.report()
    after = disk_state(service)
    assert after["state"]["phase"] == "done"
    old, new = before["state"]["history"], after["state"]["history"]
    assert new[: len(old)] == old, "the persisted history changed across the restart"
    assert all(after["final"].get(n) == raw for n, raw in before["final"].items())
    training = [r for r in new if not r["round_id"].startswith("eval")]
    assert len(training) == 2 * (NUM_LAYERS - START_LAYER)
    submissions = [
        s
        for _, report in service.swarms.values()
        for s in json.loads(report.read_text())["submissions"]
    ]
    assert_digests_match(training, submissions)
    print(
        f"history: {len(old)} rounds before the SIGTERM kept as they were, "
        f"{len(training)} training rounds in all, "
        f"{sum(len(r['update_digests']) for r in training)} aggregated digests matched"
    )


def assert_digests_match(training: list[dict], submissions: list[dict]) -> None:
    """Every aggregated (agent, digest) is an update that agent was told was accepted,
    none is aggregated twice, and an accepted update missing from the history belongs to
    a round that was never aggregated (in flight at the SIGTERM, re-run under a new id)."""
    aggregated = [
        (agent, r["round_id"], digest)
        for r in training
        for agent, digest in zip(r["participants"], r["update_digests"], strict=True)
    ]
    assert all(n == 1 for n in Counter((a, d) for a, _, d in aggregated).values())
    accepted = {(s["agent_id"], s["round_id"], s["digest"]) for s in submissions if s["accepted"]}
    ambiguous = {
        (s["agent_id"], s["round_id"], s["digest"])
        for s in submissions
        if not s["accepted"] and s["attempts"] > 1
    }
    assert set(aggregated) <= accepted | ambiguous, "an aggregated update no agent had sent"
    rounds = {r["round_id"] for r in training}
    for agent, round_id, _ in accepted - set(aggregated):
        if not round_id.startswith("eval"):
            assert round_id not in rounds, f"round {round_id} aggregated without {agent}"


# -- dead agents ---------------------------------------------------------------------------------


def test_an_agent_killed_for_good_stops_delaying_rounds_after_the_agent_timeout(
    service: Service,
):
    """Three agents, a quorum of three; c is SIGKILLed after two rounds. The round c was
    in closes once c has been silent for the timeout (short of the quorum: run again,
    without c); every later round neither samples nor waits for c. Without the timeout
    each such round would wait its whole deadline and then be re-run short of the
    quorum, for ever."""
    deadline_s, timeout_s = 8.0, 1.5
    coordinator = service.coordinator(
        *("--min-agents", "3", "--round-deadline", str(deadline_s)),
        *("--agent-timeout", str(timeout_s)),
        rounds_per_layer=5,  # ~13 rounds after the kill: the chain still runs for `status`
        exit_after_done=120,  # stopped below, once `chainfed status` has been read
    )
    victim = {agent_id: service.agents(agent_id, train_seconds=0.3) for agent_id in "abc"}["c"]
    service.wait_for(lambda: len(service.history()) >= 2, 90, "two rounds")
    victim.kill()
    victim.wait()
    killed_ms = time.time() * 1000
    service.wait_for(
        lambda: "agent c not seen for 1.5 s: inactive" in service.report(), 30, "c inactive"
    )
    status = subprocess.run(
        [sys.executable, "-m", "chainfed.agent.cli", "status", service.address],
        env={**ENV, "CHAINFED_TOKEN": TOKEN},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    rows = {
        line.split("|")[1].strip(): line for line in status.stdout.splitlines() if "s ago" in line
    }
    assert rows["c"].rstrip().endswith("| inactive |"), status.stdout
    if "phase training" in status.stdout:  # once the chain is done, a and b leave too
        assert rows["a"].rstrip().endswith("| active |"), status.stdout
    service.wait_for(lambda: (service.state() or {}).get("phase") == "done", 120, "the end")
    coordinator.send_signal(signal.SIGTERM)
    assert coordinator.wait(timeout=10) == 0, service.report()

    history = [r for r in service.history() if not r["round_id"].startswith("eval")]
    durations = [
        (r, (r["finished_unix_ms"] - p["finished_unix_ms"]) / 1000)
        for p, r in zip(history, history[1:], strict=False)
    ]
    before = [d for r, d in durations if r["finished_unix_ms"] <= killed_ms]
    # rounds closed after the kill that c took no part in (one may still hold an update c
    # sent just before it died); the first of them spans the wait for c
    without_c = [
        (r, d)
        for r, d in durations
        if r["finished_unix_ms"] > killed_ms and "c" not in r["participants"]
    ]
    waited, after = without_c[0][1], [d for _, d in without_c[1:]]
    print(
        f"round durations (s): before the kill {[round(d, 2) for d in before]}, "
        f"the round waiting for c {waited:.2f}, after {[round(d, 2) for d in after]} "
        f"(deadline {deadline_s:g} s, agent timeout {timeout_s:g} s)"
    )
    assert waited < deadline_s - 2, durations
    assert len(after) >= 3 and max(after) < deadline_s / 2, durations
    later = [r for r, _ in without_c]
    assert all("c" not in r["participants"] + r["dropped"] for r in later[1:]), later


# -- the status page ---------------------------------------------------------------------------


class HeadlessChromium:
    """Debian's ``chromium``, headless, driven over ``--remote-debugging-pipe`` (the
    DevTools protocol on fds 3 and 4, NUL-separated JSON): nothing secret on its command
    line, the token set as a request header."""

    def __init__(self, profile: Path) -> None:
        ours_read, theirs_write = os.pipe()
        theirs_read, ours_write = os.pipe()

        def wire_fds() -> None:  # in the child: its ends at fds 3 and 4, whatever held them
            read, write = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (theirs_read, theirs_write))
            os.dup2(read, 3)
            os.dup2(write, 4)

        self.process = subprocess.Popen(
            [
                *(shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu"),
                *("--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"),
            ],
            pass_fds=(3, 4),
            preexec_fn=wire_fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(theirs_read)
        os.close(theirs_write)
        self._read, self._write = ours_read, ours_write
        self._buffer = b""
        self._id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._read, 1 << 16)
                if not chunk:
                    raise EOFError("chromium closed its DevTools pipe")
                self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(line)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def open(self, url: str, headers: dict[str, str]) -> None:
        s = self.session
        self.call("Network.enable", s)
        self.call("Network.setExtraHTTPHeaders", s, headers=headers)
        self.call("Page.navigate", s, url=url)
        deadline = time.monotonic() + 20
        while self.text("document.readyState") != "complete":
            assert time.monotonic() < deadline, "the page did not load"
            time.sleep(0.05)

    def text(self, expression: str) -> str:
        result = self.call(
            "Runtime.evaluate", self.session, expression=expression, returnByValue=True
        )
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        s = self.session
        self.call(
            "Emulation.setDeviceMetricsOverride",
            s,
            width=1000,
            height=1300,
            deviceScaleFactor=1,
            mobile=False,
        )
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", s)["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (OSError, EOFError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._read)
        os.close(self._write)


def http_get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium (apt install chromium)"
)
def test_status_page_in_headless_chromium_shows_layer_and_agents(service: Service):
    http_port = free_port()
    coordinator = service.coordinator(
        *("--min-agents", "3", "--round-deadline", "30"),
        *("--http-port", str(http_port), "--http-host", "127.0.0.1"),
        rounds_per_layer=2,
        exit_after_done=60,  # stopped below, once looked at
    )
    service.agents("a", "b", "c", train_seconds=2)  # a layer lasts ~4 s: time to look
    service.wait_for(lambda: len(service.history()) >= 1, 90, "a round")
    base = f"http://127.0.0.1:{http_port}"
    for path in ("/", "/status.json"):
        for token in (None, "wrong-token"):
            status, body = http_get(base + path, token)
            assert status == 401 and b"stage" not in body and b"synthetic" not in body, body

    def layer() -> int:
        status, body = http_get(base + "/status.json", TOKEN)
        assert status == 200
        return json.loads(body)["stage_layer"]

    browser = HeadlessChromium(service.root / "chromium")
    try:
        before = layer()
        browser.open(base + "/", {"Authorization": f"Bearer {TOKEN}"})
        shown = browser.text("document.getElementById('stage-layer').textContent")
        registered = browser.text("document.getElementById('agents-registered').textContent")
        active = browser.text("document.getElementById('agents-active').textContent")
        svg = browser.text("document.querySelectorAll('#accuracy-chart circle').length")
        after = layer()
        browser.screenshot(service.root / "status_page.png")
    finally:
        browser.close()
    assert before <= int(shown) <= after, (before, shown, after)
    assert (registered, active) == ("3", "3")
    assert svg >= 1  # a point per finished round
    assert (service.root / "status_page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    coordinator.send_signal(signal.SIGTERM)
    assert coordinator.wait(timeout=10) == 0, service.report()


# -- bad options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--http-port", "--http-port: cannot listen on 127.0.0.1:"),
        ("--metrics-port", "--metrics-port: cannot listen on 127.0.0.1:"),
    ],
)
def test_a_taken_port_is_a_clear_error(service: Service, flag: str, message: str):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        coordinator = service.coordinator(flag, str(taken.getsockname()[1]))
        assert coordinator.wait(timeout=60) == 2
    assert message in service.report()
    assert not service.serving()


def test_a_non_positive_agent_timeout_is_refused(service: Service):
    coordinator = service.coordinator("--agent-timeout", "0")
    assert coordinator.wait(timeout=60) == 2
    assert "invalid option: agent timeout must be > 0 seconds" in service.report()


@pytest.mark.parametrize("flag", ["--http-port", "--metrics-port"])
@pytest.mark.parametrize("value, message", [("70000", "a port is 0..65535"), ("web", "not a port")])
def test_a_port_out_of_range_is_refused_by_the_parser(flag, value, message, capsys):
    argv = ["--model-spec", "spec.json", "--state-dir", "state", flag, value]
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err
