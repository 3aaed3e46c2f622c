"""Load test of the coordinator: one ``chainfed coordinator`` process, N synthetic agents.

What runs. A real ``chainfed coordinator`` process (the CLI, plaintext gRPC on
localhost) serves the packaged MiniLM model (``--model``) with a fixed start layer, so
no FOAT probe, and N agents from ``chainfed.coordinator.testing.synthetic_agent`` in
``--processes`` worker processes (threads inside; one channel and TCP connection per
agent). Agents do what ``chainfed agent`` does on the wire — Register, long-poll
GetTask, FetchTensors, a streamed SubmitUpdate — but upload seeded noise of the real
adapter shapes (MiniLM, rank ``--rank``, all linear layers, window ``--window``, 2-class
head) instead of training. ``--agents-per-round`` K samples K of the N registered agents
into each training round (0: every agent); the others keep long-polling GetTask, as idle
devices do. The chain starts once all N have registered and each round waits for all of
its K (the quorum is N, and a round's quorum is at most its participants). The final
evaluation round asks every registered agent, or ``--evaluation-agents`` of them.

File descriptors. Every agent holds its own TCP connection, so the coordinator holds N
sockets and each worker process about N / ``--processes``; the script raises its soft
``RLIMIT_NOFILE`` to the hard limit before starting them (children inherit it) and refuses
to start when the hard limit cannot hold N connections and the coordinator's own files.

Rounds. The chain runs ``ceil(R / L)`` rounds per layer (L = the model's layers) from the
start layer ``L - ceil(R / rounds_per_layer)``, which is R rounds or the next multiple
of rounds_per_layer above it, then the final evaluation round (not counted as a round).

Measured.

* ``rounds_per_s``: training rounds per second between the first and the last
  aggregation (registration and the evaluation round excluded); ``wall_s`` is the whole
  run from the coordinator's start to the chain's end.
* ``p50_ms`` / ``p99_ms``: latency of every successful Register, FetchTensors and
  SubmitUpdate as the agents saw it (one call each, retries not merged). GetTask is a
  long-poll that the coordinator holds open until there is a task, so its duration is
  mostly waiting by design; it is reported on its own under ``rpc``.
* ``coordinator_peak_rss_bytes``: the kernel's RSS high-water mark (VmHWM) of the
  coordinator process, read just before it exits; ``coordinator_cpu_s`` its user +
  system CPU time over the whole run. On a small box the agents' processes compete with
  the coordinator for the same cores, so ``rounds_per_s`` there is a floor for what the
  coordinator alone could do (``--agent-niceness`` lowers the agents' priority below the
  coordinator's); ``coordinator_cpu_s`` / rounds is its own cost per round.
  ``coordinator_peak_threads`` and ``coordinator_peak_open_files`` are the most threads and
  file descriptors seen in it (sampled every half second).

Checked. Each agent records the ``update_digest`` of every update the coordinator
accepted; the coordinator's ``state.json`` history records, per round, the agents and
digests it aggregated. ``lost`` counts accepted updates in no aggregate; ``double_counted``
counts extra appearances of one update (same agent and digest) in the history, in one
round or several; ``unexpected`` counts aggregated digests no agent had accepted. An
upload whose first attempt failed (timeout, dropped call) and whose retry was refused
because the round had closed is ambiguous — the coordinator may have taken the first
attempt — and is counted in ``ambiguous_aggregated`` when it was aggregated. The
script exits 1 when lost, double_counted or unexpected is non-zero or an agent failed.

    python benchmarks/load.py --agents 1000 --rounds 20 --json runs/load.json
    python benchmarks/load.py --agents 10000 --agents-per-round 1000 --rounds 3 --json runs/l.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chainfed.agent.convert.assets import resolve_model
from chainfed.agent.runtime.lora import LoRAConfig, adapter_state, add_lora
from chainfed.agent.runtime.model import StreamingModel
from chainfed.coordinator.testing.synthetic_agent import AdapterLayout, SwarmReport
from chainfed.proto.auth_token import write_token_file

REQUEST_METHODS = ("Register", "FetchTensors", "SubmitUpdate")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SPARE_FILES = 1024
"""File descriptors the coordinator needs besides one socket per agent (model, state,
logs, gRPC's own pipes and pollers)."""


def chain_plan(num_layers: int, rounds: int) -> tuple[int, int]:
    """(start layer, rounds per layer) giving at least ``rounds`` training rounds."""
    per_layer = math.ceil(rounds / num_layers)
    stages = math.ceil(rounds / per_layer)
    return num_layers - stages, per_layer


def raise_file_limit(agents: int) -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit (the coordinator and
    the workers inherit it); the new soft limit. ``SystemExit`` when even the hard limit
    cannot hold one connection per agent plus ``SPARE_FILES``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < agents + SPARE_FILES:
        raise SystemExit(
            f"{agents} agents need {agents + SPARE_FILES} file descriptors in the coordinator; "
            f"the hard limit is {hard} (raise it: ulimit -Hn, /etc/security/limits.conf)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard if hard != resource.RLIM_INFINITY else soft


def vm_hwm_bytes(pid: int) -> int:
    """Peak resident set (VmHWM) of a live process, in bytes; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")


def check_updates(history: list[dict], submissions: list[dict]) -> dict[str, int]:
    """Accepted training updates vs the per-round aggregated digests (module docstring)."""
    training = [r for r in history if not r["round_id"].startswith("eval")]
    aggregated = [
        (agent, record["round_id"], digest)
        for record in training
        for agent, digest in zip(record["participants"], record["update_digests"], strict=True)
    ]
    training_submissions = [s for s in submissions if not s["round_id"].startswith("eval")]
    accepted = {
        (s["agent_id"], s["round_id"], s["digest"]) for s in training_submissions if s["accepted"]
    }
    ambiguous = {  # refused on a retry: an earlier attempt may have been taken
        (s["agent_id"], s["round_id"], s["digest"])
        for s in training_submissions
        if not s["accepted"] and s.get("attempts", 1) > 1
    }
    appearances = Counter((agent, digest) for agent, _, digest in aggregated)
    return {
        "accepted": len(accepted),
        "aggregated": len(aggregated),
        "lost": len(accepted - set(aggregated)),
        "double_counted": sum(n - 1 for n in appearances.values()),
        "unexpected": len(set(aggregated) - accepted - ambiguous),
        "ambiguous_aggregated": len(set(aggregated) & ambiguous),
        "rejected": sum(not s["accepted"] for s in submissions),
        "training_rounds": len(training),
    }


def adapter_layout(model_dir: Path, *, rank: int = 8, num_labels: int = 2) -> AdapterLayout:
    """The tensors ``chainfed agent`` uploads for ``model_dir`` (LoRA on every linear, a
    classification head): one block is loaded and wrapped to read them; every block of a
    model has the same shapes."""
    model = StreamingModel(model_dir)
    block = model.load_block(0)
    add_lora(block, 0, LoRAConfig(rank=rank))
    layer = tuple(
        (name.removeprefix("layers.0."), tuple(t.shape))
        for name, t in sorted(adapter_state(block, 0).items())
    )
    hidden = model.config.hidden_size
    head = (
        ("objective.head.bias", (num_labels,)),
        ("objective.head.weight", (num_labels, hidden)),
    )
    return AdapterLayout(layer, head)


def run(args: argparse.Namespace) -> dict:
    model_dir = resolve_model(args.model, progress=False)
    model = StreamingModel(model_dir)
    layout = adapter_layout(model_dir, rank=args.rank)
    file_limit = raise_file_limit(args.agents)
    start_layer, per_layer = chain_plan(model.num_layers, args.rounds)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="chainfed-load-"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "layout.json").write_text(json.dumps(layout.to_dict()))
    (root / "logs").mkdir(exist_ok=True)
    token_file = write_token_file(root / "token", secrets.token_urlsafe(16))
    started = time.monotonic()
    coordinator, port = start_coordinator(args, model_dir, start_layer, per_layer, root, token_file)
    workers = start_swarms(args, port, token_file, model.fingerprint, root)
    watch = watch_until_done(coordinator, workers, deadline=started + args.timeout + 60)
    wall = time.monotonic() - started
    figures = swarm_figures(workers, json.loads((root / "state" / "state.json").read_text()))
    return {
        "agents": args.agents,
        "agents_per_round": args.agents_per_round or args.agents,
        "evaluation_agents": args.evaluation_agents or args.agents,
        **figures,
        "coordinator_peak_rss_bytes": watch.peak_rss_bytes,
        "coordinator_cpu_s": watch.cpu_s,
        "coordinator_peak_threads": watch.peak_threads,
        "coordinator_peak_open_files": watch.peak_open_files,
        "wall_s": wall,
        "setup": {
            "model": str(model_dir.name),
            "start_layer": start_layer,
            "rounds_per_layer": per_layer,
            "window": args.window,
            "rank": args.rank,
            "update_bytes": args.window * layout.bytes_per_layer(),
            "processes": args.processes,
            "agent_niceness": args.agent_niceness,
            "poll_ms": args.poll_ms,
            "cpu_count": os.cpu_count(),
            "file_limit": file_limit,
            "workdir": str(root),
        },
    }


def start_coordinator(
    args: argparse.Namespace,
    model_dir: Path,
    start_layer: int,
    per_layer: int,
    root: Path,
    token_file: Path,
) -> tuple[subprocess.Popen, int]:
    """``chainfed coordinator`` of the load test's chain on a free local port; (process,
    port) once it listens."""
    argv = [
        *(sys.executable, "-m", "chainfed.agent.cli", "coordinator"),
        *("--model", str(model_dir), "--state-dir", str(root / "state")),
        *("--host", "127.0.0.1", "--port", "0", "--token-file", str(token_file)),
        *("--start-layer", str(start_layer), "--window", str(args.window), "--gpo", "none"),
        *("--min-rounds-per-layer", str(per_layer), "--max-rounds-per-layer", str(per_layer)),
        *("--min-agents", str(args.agents), "--agents-per-round", str(args.agents_per_round)),
        *("--evaluation-agents", str(args.evaluation_agents)),
        *("--round-deadline", str(args.round_deadline)),
        *("--poll-seconds", str(args.poll_ms / 1000)),
        *("--rank", str(args.rank), "--exit-after-done", "600", "--verbose"),
    ]
    logs = root / "logs"
    with open(logs / "coordinator.log", "wb") as out:
        coordinator = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=out)
    for line in coordinator.stdout:
        text = line.decode(errors="replace")
        (logs / "coordinator.out").open("a").write(text)
        if "listening on" in text:
            return coordinator, int(text.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
    raise SystemExit(f"coordinator did not start; see {logs}")


def start_swarms(
    args: argparse.Namespace, port: int, token_file: Path, fingerprint: str, root: Path
) -> list[tuple[subprocess.Popen, Path]]:
    """``args.processes`` synthetic-agent processes sharing ``args.agents`` agents; each
    with the path of the JSON report it writes."""
    ids = [f"a{k:05d}" for k in range(args.agents)]
    workers = []
    for w in range(args.processes):
        share = ids[w :: args.processes]
        if not share:
            continue
        report = root / f"swarm-{w}.json"
        argv = [
            *(sys.executable, "-m", "chainfed.coordinator.testing.synthetic_agent"),
            *("--coordinator", f"127.0.0.1:{port}", "--token-file", str(token_file)),
            *("--fingerprint", fingerprint, "--layout", str(root / "layout.json")),
            *("--agent-ids", ",".join(share), "--poll-ms", str(args.poll_ms)),
            *("--start-spread", str(args.start_spread), "--timeout", str(args.timeout)),
            *("--json", str(report)),
        ]
        with open(root / "logs" / f"swarm-{w}.log", "wb") as out:
            worker = subprocess.Popen(
                argv,
                env=ENV,
                stdout=out,
                stderr=out,
                preexec_fn=functools.partial(os.nice, args.agent_niceness),
            )
            workers.append((worker, report))
    return workers


@dataclass
class CoordinatorWatch:
    """What sampling the coordinator process saw (each figure its maximum so far)."""

    peak_rss_bytes: int = 0
    cpu_s: float = 0.0
    peak_threads: int = 0
    peak_open_files: int = 0
    """File descriptors: one socket per connected agent, plus its own files."""

    def sample(self, pid: int) -> None:
        self.peak_rss_bytes = max(self.peak_rss_bytes, vm_hwm_bytes(pid))
        self.cpu_s = max(self.cpu_s, cpu_seconds(pid))
        try:
            self.peak_threads = max(self.peak_threads, len(os.listdir(f"/proc/{pid}/task")))
            self.peak_open_files = max(self.peak_open_files, len(os.listdir(f"/proc/{pid}/fd")))
        except OSError:
            pass  # it exited between two looks


def watch_until_done(
    coordinator: subprocess.Popen, workers: list[tuple[subprocess.Popen, Path]], deadline: float
) -> CoordinatorWatch:
    """Sample the coordinator every half second while the swarms run (until they end or
    ``deadline``); then every process is stopped."""
    watch = CoordinatorWatch()
    while any(p.poll() is None for p, _ in workers) and time.monotonic() < deadline:
        watch.sample(coordinator.pid)
        time.sleep(0.5)
    watch.sample(coordinator.pid)
    for p, _ in workers:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
    coordinator.send_signal(signal.SIGTERM)  # every agent is done or gone
    try:
        coordinator.wait(timeout=60)
    except subprocess.TimeoutExpired:
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait()
    return watch


def swarm_figures(workers: list[tuple[subprocess.Popen, Path]], state: dict) -> dict:
    """Rounds, update accounting (accepted / aggregated / lost / double counted), request
    latencies and agent errors, from the swarms' reports and the coordinator's state."""
    swarms = [SwarmReport.from_dict(json.loads(r.read_text())) for _, r in workers if r.exists()]
    submissions = [s.__dict__ for sw in swarms for s in sw.submissions]
    latencies: dict[str, list[float]] = {}
    for sw in swarms:
        for method, values in sw.latencies.items():
            latencies.setdefault(method, []).extend(values)
    errors = [e for sw in swarms for e in sw.errors]
    errors += [f"swarm {w}: no report" for w, (_, r) in enumerate(workers) if not r.exists()]
    history = state["history"]
    counts = check_updates(history, submissions)
    finished = [r["finished_unix_ms"] for r in history if not r["round_id"].startswith("eval")]
    span_s = (finished[-1] - finished[0]) / 1000 if len(finished) > 1 else float("nan")
    request = [v for m in REQUEST_METHODS for v in latencies.get(m, [])]
    return {
        "rounds": counts.pop("training_rounds"),
        **{k: counts[k] for k in ("accepted", "aggregated", "lost", "double_counted")},
        "rounds_per_s": (len(finished) - 1) / span_s if len(finished) > 1 else float("nan"),
        "p50_ms": percentile_ms(request, 50),
        "p99_ms": percentile_ms(request, 99),
        "unexpected": counts["unexpected"],
        "ambiguous_aggregated": counts["ambiguous_aggregated"],
        "rejected": counts["rejected"],
        "phase": state["phase"],
        "agent_errors": errors[:20],
        "agent_error_count": len(errors),
        "retries": sum(sw.retries for sw in swarms),
        "rpc": {
            method: {
                "calls": len(values),
                "p50_ms": percentile_ms(values, 50),
                "p99_ms": percentile_ms(values, 99),
            }
            for method, values in sorted(latencies.items())
        },
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Load test: one coordinator process and N synthetic gRPC agents on "
        "localhost; checks every accepted update is aggregated exactly once."
    )
    parser.add_argument("--agents", type=int, default=1000, help="synthetic agents registered")
    parser.add_argument(
        "--agents-per-round",
        type=int,
        default=0,
        help="agents sampled into each training round (0 = all)",
    )
    parser.add_argument(
        "--evaluation-agents",
        type=int,
        default=0,
        help="agents asked to evaluate the final adapters (0 = all)",
    )
    parser.add_argument("--rounds", type=int, default=20, help="training rounds (at least)")
    parser.add_argument("--json", type=Path, required=True, help="where to write the figures")
    parser.add_argument("--processes", type=int, default=4, help="agent worker processes")
    parser.add_argument("--model", default="minilm", help="model folder or alias")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the uploads")
    parser.add_argument("--window", type=int, default=2, help="DLCT window Q")
    parser.add_argument(
        "--poll-ms",
        type=int,
        default=5000,
        help="agents' GetTask long-poll window, also the coordinator's --poll-seconds",
    )
    parser.add_argument("--round-deadline", type=float, default=600.0, help="seconds per round")
    parser.add_argument("--start-spread", type=float, default=5.0, help="seconds to start agents")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up after (seconds)")
    parser.add_argument(
        "--agent-niceness",
        type=int,
        default=0,
        help="added to the agent worker processes' niceness, so that on a small box the "
        "thousands of stand-ins for separate devices do not starve the coordinator",
    )
    parser.add_argument("--workdir", type=Path, help="state and logs (default: a temp dir)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("rpc", "setup")}, indent=2))
    bad = result["lost"] or result["double_counted"] or result["unexpected"]
    if bad or result["agent_error_count"] or result["phase"] != "done":
        print("FAILED: lost, double-counted or unexpected updates, or agents failed", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
