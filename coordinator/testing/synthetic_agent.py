"""Synthetic agents: real gRPC clients of the coordinator that upload without training.

For load and fault-injection runs a coordinator needs many agents that behave like
``chainfed agent`` on the wire — Register, long-poll GetTask, FetchTensors,
ReportProbe, a streamed SubmitUpdate, retry with backoff while the coordinator is
unreachable — but cost almost nothing, so that a thousand of them fit on one box.
A ``SyntheticAgent`` does exactly that and replaces training by seeded noise of the
real adapter shapes of the model (``AdapterLayout.from_model``: one block's LoRA
adapters under ``--targets`` and the classification head). Many agents share a
process as threads (``run_swarm``); each has its own channel and TCP connection.

What an agent guarantees, for the checks built on it: every update it sends is
recorded with its ``update_digest`` and whether the coordinator accepted it
(``Submission``), so a caller can match the agents' accepted updates against the
digests in the coordinator's round history. Update values depend on (agent, round)
only, so a retried upload is bit-identical to the first attempt.

``python -m chainfed.coordinator.testing.synthetic_agent --help`` runs a swarm in its own process
and writes a JSON report (``benchmarks/load.py`` and the fault-injection tests use it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import torch

from chainfed.proto.auth_token import TOKEN_ENV, resolve_token
from chainfed.proto.client import (
    CoordinatorClient,
    CoordinatorError,
    CoordinatorUnreachableError,
    RetryPolicy,
)
from chainfed.proto.durable_file import write_text_durably
from chainfed.proto.errors import ChainFedError
from chainfed.proto.messages import (
    AgentCapabilities,
    Registration,
    Task,
    TaskKind,
    UpdateMetrics,
    software_version,
)
from chainfed.proto.tensor_names import without_lora_a
from chainfed.proto.update_digest import update_digest

log = logging.getLogger("chainfed.synthetic_agent")

RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,  # what an overloaded server's dropped call looks like
)


class SyntheticAgentError(ChainFedError):
    """A synthetic agent gave up: refused by the coordinator or unreachable too long."""


@dataclass(frozen=True)
class AdapterLayout:
    """Names and shapes of what a round uploads for a model, per window layer and head."""

    layer_tensors: tuple[tuple[str, tuple[int, ...]], ...]
    """(name relative to ``layers.{i}.``, shape) of one block's adapter tensors."""
    head_tensors: tuple[tuple[str, tuple[int, ...]], ...]
    """(full name, shape) of the trainable task head (``objective.*``)."""

    def to_dict(self) -> dict:
        return {"layer_tensors": self.layer_tensors, "head_tensors": self.head_tensors}

    @classmethod
    def from_dict(cls, data: dict) -> AdapterLayout:
        return cls(
            tuple((n, tuple(s)) for n, s in data["layer_tensors"]),
            tuple((n, tuple(s)) for n, s in data["head_tensors"]),
        )

    def update(self, window: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
        """Seeded small noise in every tensor of a round over ``window``."""
        generator = torch.Generator().manual_seed(seed)
        tensors = {}
        for layer in window:
            for name, shape in self.layer_tensors:
                tensors[f"layers.{layer}.{name}"] = torch.randn(shape, generator=generator) * 0.01
        for name, shape in self.head_tensors:
            tensors[name] = torch.randn(shape, generator=generator) * 0.01
        return tensors

    def bytes_per_layer(self) -> int:
        return sum(4 * _numel(shape) for _, shape in self.layer_tensors)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class SyntheticAgentConfig:
    """How one synthetic agent connects and what it declares."""

    address: str
    """Coordinator ``host:port``."""
    token: str
    """Auth token."""
    agent_id: str
    """Requested agent id (fixed: records are keyed by it)."""
    model_fingerprint: str
    """The coordinator's model fingerprint."""
    layout: AdapterLayout
    """Shapes of the uploads."""
    num_samples: int = 100
    """Declared training samples (the aggregation weight)."""
    poll_ms: int = 5_000
    """Long-poll window of GetTask."""
    rpc_timeout_s: float = 120.0
    """Deadline of every unary or streaming call (not the long-poll)."""
    give_up_after_s: float = RetryPolicy.give_up_after_s
    """Fail after the coordinator is unreachable this long (a real agent's patience)."""
    first_backoff_s: float = RetryPolicy.first_backoff_s
    """First retry delay; doubles up to ``max_backoff_s``, with ±50 % jitter."""
    max_backoff_s: float = RetryPolicy.max_backoff_s
    """Longest retry delay. The defaults are a real agent's (``RetryPolicy``'s), so that a
    swarm retries as hard as a fleet of real agents would, no harder."""
    train_seconds: float = 0.0
    """Time a round's "training" takes (a sleep before the upload), so that a chain of
    a few agents does not finish in a blink."""
    die_mid_upload: bool = False
    """Fault injection: SIGKILL the whole process halfway through streaming the first
    update (after its header and half its chunks went out), as a device losing power."""


@dataclass(frozen=True)
class Submission:
    """One update this agent uploaded."""

    agent_id: str
    round_id: str
    digest: str
    """``update_digest`` of the tensors sent (empty tensors for an evaluation)."""
    accepted: bool
    """The coordinator answered OK (a duplicate of an accepted upload is also OK)."""
    detail: str = ""
    """Why not accepted (the coordinator's status and message)."""
    attempts: int = 1
    """Calls it took; after a failed attempt a refusal is ambiguous: the coordinator may
    have taken an earlier attempt whose answer was lost (at-least-once delivery)."""


@dataclass
class AgentLog:
    """What one agent did; appended to only by its own thread."""

    submissions: list[Submission] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    """Seconds per successful call, by method (GetTask includes its long-poll hold)."""
    retries: int = 0
    """Calls retried because the coordinator was unreachable."""
    registrations: int = 0
    done: bool = False
    error: str = ""


class SyntheticAgent:
    """One synthetic agent; ``run()`` works until the chain is DONE."""

    def __init__(
        self, config: SyntheticAgentConfig, *, stop: threading.Event | None = None
    ) -> None:
        self.config = config
        self.agent_id = config.agent_id
        self.log = AgentLog()
        self.stop = stop or threading.Event()
        self.client = CoordinatorClient(
            config.address,
            config.token,
            retry=RetryPolicy(
                give_up_after_s=config.give_up_after_s,
                first_backoff_s=config.first_backoff_s,
                max_backoff_s=config.max_backoff_s,
            ),
            own_connection=True,  # one TCP connection per agent, as separate devices would have
            wait=self.stop.wait,
            on_call=lambda method, seconds: self.log.latencies.setdefault(method, []).append(
                seconds
            ),
            on_retry=self._count_retry,
        )
        self._round = 0

    def _count_retry(self, method: str) -> None:
        log.warning("%s %s: coordinator away, retrying", self.agent_id, method)
        self.log.retries += 1

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> AgentLog:
        """Register and answer tasks until DONE; errors are recorded in ``log.error``."""
        try:
            self.client.connect()
            self._register()
            while not self.stop.is_set():
                try:
                    task = self.client.get_task(self.agent_id, self.config.poll_ms)
                except CoordinatorError as exc:
                    if exc.code is not grpc.StatusCode.NOT_FOUND:
                        raise
                    self._register()  # the coordinator lost track of us: join again
                    continue
                if task.kind is TaskKind.WAIT:
                    self.stop.wait(min(task.retry_after_ms, self.config.poll_ms) / 1000)
                elif task.kind is TaskKind.PROBE:
                    self._probe(task)
                elif task.kind is TaskKind.TRAIN_ROUND:
                    self._train_round(task)
                elif task.kind is TaskKind.EVALUATE:
                    self._evaluate(task)
                elif task.kind is TaskKind.DONE:
                    self._fetch(task)
                    self.log.done = True
                    break
        except (ChainFedError, ValueError) as exc:
            if isinstance(exc, CoordinatorError) and not isinstance(
                exc, CoordinatorUnreachableError
            ):
                self.log.error = f"{self.agent_id}: {exc.code.name}: {exc.details}"
            else:
                self.log.error = f"{self.agent_id}: {exc}"
            log.error("agent failed: %s", self.log.error)
        finally:
            self.client.close()
        return self.log

    def _register(self) -> None:
        capabilities = AgentCapabilities(
            device="synthetic",
            memory_budget_bytes=0,
            num_samples=self.config.num_samples,
            software_version=software_version(),
            model_fingerprint=self.config.model_fingerprint,
        )
        registration = Registration(self.agent_id, self.config.token, capabilities)
        ack = self.client.register(registration, timeout=self.config.rpc_timeout_s)
        self.log.registrations += 1
        if ack.agent_id != self.agent_id:
            raise SyntheticAgentError(f"asked for id {self.agent_id}, got {ack.agent_id}")

    def _fetch(self, task: Task) -> dict[str, torch.Tensor] | None:
        """The task's tensors, or None when its round closed before the fetch."""

        try:
            return self.client.fetch(
                self.agent_id, task.round_id, task.tensors, timeout=self.config.rpc_timeout_s
            )
        except CoordinatorError as exc:
            if exc.code is grpc.StatusCode.FAILED_PRECONDITION:
                return None
            raise

    def _probe(self, task: Task) -> None:
        raise SyntheticAgentError(
            f"{self.agent_id}: synthetic agents do not probe (start the coordinator with "
            f"--start-layer); got PROBE {task.round_id}"
        )

    def _seed(self, round_id: str) -> int:
        key = f"{self.agent_id}/{round_id}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1

    def _train_round(self, task: Task) -> None:
        if self._fetch(task) is None:
            return
        self.stop.wait(self.config.train_seconds)
        self._round += 1
        tensors = self.config.layout.update(task.window_layers, self._seed(task.round_id))
        if not task.params.lora_train_a:  # ffa: A stays at its seed, only B travels
            tensors = without_lora_a(tensors)
        loss = 1.0 / (1 + self._round)
        metrics = UpdateMetrics(
            train_samples=self.config.num_samples,
            val_samples=self.config.num_samples // 4 or 1,
            steps=1,
            train_loss=loss + 0.01,
            val_loss=loss,
            val_metric=1.0 - loss,
            peak_memory_bytes=0,
            seconds=0.0,
        )
        self._submit(task.round_id, metrics, tensors)

    def _evaluate(self, task: Task) -> None:
        if self._fetch(task) is None:
            return
        metrics = UpdateMetrics(
            train_samples=self.config.num_samples,
            val_samples=self.config.num_samples // 4 or 1,
            steps=0,
            train_loss=0.0,
            val_loss=0.5,
            val_metric=0.5,
            peak_memory_bytes=0,
            seconds=0.0,
        )
        self._submit(task.round_id, metrics, {})

    def _submit(self, round_id: str, metrics: UpdateMetrics, tensors: dict[str, torch.Tensor]):
        digest = update_digest(tensors)
        attempts = 0

        def before_chunk(k: int, n: int) -> None:
            nonlocal attempts
            attempts += k == 0
            if self.config.die_mid_upload and k == n // 2:
                time.sleep(0.5)  # let what was yielded reach the coordinator
                os.kill(os.getpid(), signal.SIGKILL)

        try:
            self.client.submit(
                self.agent_id,
                round_id,
                metrics,
                tensors,
                timeout=self.config.rpc_timeout_s,
                before_chunk=before_chunk,
            )
        except CoordinatorError as exc:
            if exc.code is not grpc.StatusCode.FAILED_PRECONDITION:
                raise
            detail = f"{exc.code.name}: {exc.details}"
            self.log.submissions.append(
                Submission(self.agent_id, round_id, digest, False, detail, max(attempts, 1))
            )
            return
        self.log.submissions.append(
            Submission(self.agent_id, round_id, digest, True, "", max(attempts, 1))
        )


# -- many agents in one process -------------------------------------------------------


@dataclass
class SwarmReport:
    """Everything the agents of one ``run_swarm`` did."""

    agents: int
    done: int
    errors: list[str]
    submissions: list[Submission]
    latencies: dict[str, list[float]]
    retries: int
    registrations: int
    seconds: float

    def to_dict(self) -> dict:
        return {
            "agents": self.agents,
            "done": self.done,
            "errors": self.errors,
            "submissions": [asdict(s) for s in self.submissions],
            "latencies": self.latencies,
            "retries": self.retries,
            "registrations": self.registrations,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict) -> SwarmReport:
        return cls(
            agents=data["agents"],
            done=data["done"],
            errors=list(data["errors"]),
            submissions=[Submission(**s) for s in data["submissions"]],
            latencies={k: list(v) for k, v in data["latencies"].items()},
            retries=data["retries"],
            registrations=data["registrations"],
            seconds=data["seconds"],
        )


def run_swarm(
    configs: list[SyntheticAgentConfig],
    *,
    timeout_s: float | None = None,
    start_spread_s: float = 0.0,
) -> SwarmReport:
    """Run one thread per agent until every agent is DONE or failed (or ``timeout_s``).

    Starts are spread evenly over ``start_spread_s`` so that a thousand agents do not
    open their connections in the same millisecond."""
    stop = threading.Event()
    agents = [SyntheticAgent(c, stop=stop) for c in configs]
    started = time.monotonic()
    threads = []
    for k, agent in enumerate(agents):
        thread = threading.Thread(target=agent.run, name=agent.agent_id, daemon=True)
        thread.start()
        threads.append(thread)
        if start_spread_s and k + 1 < len(agents):
            time.sleep(start_spread_s / len(agents))
    for thread in threads:
        remaining = None if timeout_s is None else max(0.0, started + timeout_s - time.monotonic())
        thread.join(remaining)
    stop.set()
    for thread in threads:
        thread.join(30)
    latencies: dict[str, list[float]] = {}
    for agent in agents:
        for method, values in agent.log.latencies.items():
            latencies.setdefault(method, []).extend(values)
    errors = [a.log.error for a in agents if a.log.error]
    errors += [f"{a.agent_id}: not done when the swarm stopped" for a in agents if not a.log.done]
    return SwarmReport(
        agents=len(agents),
        done=sum(a.log.done for a in agents),
        errors=sorted(set(errors)),
        submissions=[s for a in agents for s in a.log.submissions],
        latencies=latencies,
        retries=sum(a.log.retries for a in agents),
        registrations=sum(a.log.registrations for a in agents),
        seconds=time.monotonic() - started,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chainfed.coordinator.testing.synthetic_agent",
        description="Run synthetic agents (threads of one process) against a coordinator "
        "until its chain is done, then write what they did as JSON.",
    )
    parser.add_argument("--coordinator", required=True, help="coordinator HOST:PORT")
    parser.add_argument("--token", help=f"auth token (prefer --token-file or ${TOKEN_ENV})")
    parser.add_argument("--token-file", type=Path, help="file holding the auth token")
    parser.add_argument("--fingerprint", required=True, help="the coordinator's model fingerprint")
    parser.add_argument("--layout", type=Path, required=True, help="AdapterLayout JSON file")
    parser.add_argument("--agent-ids", required=True, help="comma-separated agent ids")
    parser.add_argument("--poll-ms", type=int, default=5_000, help="GetTask long-poll window")
    parser.add_argument(
        "--give-up-after",
        type=float,
        default=RetryPolicy.give_up_after_s,
        help="seconds unreachable before failing (default: a real agent's)",
    )
    parser.add_argument("--start-spread", type=float, default=0.0, help="seconds to start all")
    parser.add_argument("--timeout", type=float, help="stop after this many seconds")
    parser.add_argument("--train-seconds", type=float, default=0.0, help="seconds per round")
    parser.add_argument(
        "--max-backoff",
        type=float,
        default=RetryPolicy.max_backoff_s,
        help="longest retry delay in seconds (default: a real agent's)",
    )
    parser.add_argument(
        "--die-mid-upload",
        action="store_true",
        help="fault injection: SIGKILL this process halfway through the first upload",
    )
    parser.add_argument("--json", type=Path, required=True, help="where to write the report")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    token = resolve_token(args.token, args.token_file)
    if token is None:
        parser.error(f"a token is required: --token-file, --token or ${TOKEN_ENV}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    layout = AdapterLayout.from_dict(json.loads(args.layout.read_text()))
    configs = [
        SyntheticAgentConfig(
            address=args.coordinator,
            token=token,
            agent_id=agent_id,
            model_fingerprint=args.fingerprint,
            layout=layout,
            poll_ms=args.poll_ms,
            give_up_after_s=args.give_up_after,
            max_backoff_s=args.max_backoff,
            train_seconds=args.train_seconds,
            die_mid_upload=args.die_mid_upload,
        )
        for agent_id in args.agent_ids.split(",")
    ]
    report = run_swarm(configs, timeout_s=args.timeout, start_spread_s=args.start_spread)
    write_text_durably(args.json, json.dumps(report.to_dict()))
    return 0 if not report.errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
