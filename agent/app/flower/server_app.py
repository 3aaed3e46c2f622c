"""The chain's ServerApp: our coordinator's state machine, driven over Flower messages.

::

    wait for N nodes -> query.register (capabilities, shard) -> ChainCoordinator.register
    loop until DONE:
        tick; next_task(agent) for every agent, in agent-id order
        PROBE       -> query.probe  -> report_probe          (FOAT: start layer)
        TRAIN_ROUND -> train        -> submit (validated)    (aggregated when all are in)
                       (secagg: SecAgg+'s four stages -> submit_secure_mean, the survivors'
                        weighted mean; see ``secure_aggregation``)
        EVALUATE    -> evaluate     -> submit (metrics only) (the final evaluation)
        persist (state_store) whenever the chain changed
    query.finish -> every node writes the final adapters; STATE_DIR/final_adapters.safetensors

The coordinator is the one ``chainfed coordinator`` runs (``chain_coordinator``: same
flags, same aggregation rules, update checks, convergence, DP and persistence); only the
transport is Flower's. Each round's messages go out together (``Grid.send_and_receive``)
and the replies are submitted in agent-id order, as the in-process ``chainfed simulate``
does, so the same seeds, split and aggregation give the same adapters.

Time: a node holding a task counts as active (``ChainCoordinator.polling``), so a long
round is never cut short by ``agent_timeout``. A node that does not answer within the
round's deadline (the probe's, for FOAT), or whose answer failed or was rejected, is
not asked again for that round: it is dropped from it (the clock jumps to the deadline)
and the coordinator re-runs a round short of its quorum or finishes the probe with the
reports it has, as over gRPC. Under SecAgg+ each of a round's four stages waits
at most until the round's deadline, and a node lost in any of them is a dropout.
Registration waits for every node; the final ``query.finish`` for a round's deadline at
most (a node lost for good gets no file, and is named).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from chainfed.agent.app.flower import records
from chainfed.agent.app.flower.secure_aggregation import (
    SecAggSettings,
    secagg_settings,
    secure_round,
)
from chainfed.agent.app.options import SimulationConfig, SimulationError
from chainfed.agent.app.simulation import VirtualClock, chain_coordinator
from chainfed.agent.convert.assets import resolve_model
from chainfed.agent.runtime.model import StreamingModel
from chainfed.coordinator import state_store
from chainfed.coordinator.chain_state import ChainCoordinator
from chainfed.coordinator.secure_aggregation import SecureAggregationError, check_secure_aggregation
from chainfed.coordinator.update_checks import UpdateRejectedError
from chainfed.proto.messages import ChainPhase, Task, TaskKind

NODE_WAIT_S = 600.0
"""How long the ServerApp waits for the run's nodes to connect."""
MAX_IDLE_LOOPS = 100
"""Loops without any task to send and no round open before the chain is declared stuck."""


def build(run_config: dict[str, Any] | None = None) -> ServerApp:
    """The ServerApp; ``run_config`` (tests, the Python simulation API, whose Contexts carry
    none) stands in for the Context's."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        settings = run_config or dict(context.run_config)
        config = records.simulation_config(settings)
        state_dir = records.state_dir(settings, config)
        run_chain(grid, config, state_dir, secagg=secagg_settings(settings), say=_say)

    return server


def run_chain(
    grid: Grid,
    config: SimulationConfig,
    state_dir: Path,
    *,
    secagg: SecAggSettings | None = None,
    say: Callable[[str], None] = print,
) -> ChainCoordinator:
    """Run the chain ``config`` describes on ``grid``'s nodes to the end; the final
    adapters end in ``state_dir`` (and on every node). Returns the finished coordinator.
    ``secagg``: every training round through SecAgg+ (``secure_aggregation``)."""
    coordinator = checked_coordinator(config, secagg)
    driver = _ChainDriver(grid, coordinator, state_dir, say, secagg)
    driver.register(_await_nodes(grid, config.agents))
    driver.run()
    driver.finish()
    return coordinator


def checked_coordinator(
    config: SimulationConfig, secagg: SecAggSettings | None
) -> ChainCoordinator:
    """The coordinator of ``config``; with ``secagg``, refused (``SimulationError``) when
    a setting needs the individual updates or a round holds more nodes than SecAgg+ can
    sum, before any node is asked for anything."""
    spec = StreamingModel(resolve_model(config.model, progress=False)).spec()
    coordinator = chain_coordinator(config, spec)
    if secagg is not None:
        try:
            check_secure_aggregation(coordinator.config)
        except SecureAggregationError as exc:
            raise SimulationError(str(exc)) from exc
        secagg.check_round_size(config.agents_per_round or config.agents)
    return coordinator


def _await_nodes(grid: Grid, count: int) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_S
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() > deadline:
            raise SimulationError(f"{len(nodes)} of {count} nodes connected in {NODE_WAIT_S} s")
        time.sleep(1.0)


_MESSAGE_TYPES = {
    TaskKind.PROBE: records.PROBE,
    TaskKind.TRAIN_ROUND: records.TRAIN,
    TaskKind.EVALUATE: records.EVALUATE,
}


class _ChainDriver:
    """Hands the coordinator's tasks to the nodes and their answers back to it."""

    def __init__(
        self,
        grid: Grid,
        coordinator: ChainCoordinator,
        state_dir: Path,
        say: Callable[[str], None],
        secagg: SecAggSettings | None,
    ) -> None:
        self.grid, self.coordinator, self.state_dir, self.say = grid, coordinator, state_dir, say
        self.secagg = secagg
        self.clock = VirtualClock()
        self.nodes: dict[str, int] = {}
        """Agent id -> Flower node id."""
        self.seen = 0
        self.sat_out: set[tuple[str, str]] = set()
        """(agent, round id) whose node failed, timed out or was rejected: it is not asked
        again for that round, which closes at its deadline without it (as the in-process
        simulation's rejected agents sit a round out)."""

    def register(self, node_ids: list[int]) -> None:
        """Ask every node who it is; register them in agent-id order."""
        replies = self._exchange(
            [self._message(node, records.REGISTER, RecordDict()) for node in node_ids]
        )
        answers = {}
        for node, reply in replies.items():
            capabilities, partition = records.capabilities_of(reply.content)
            answers[f"agent-{partition}"] = (node, capabilities)
        if len(answers) != len(node_ids):
            raise SimulationError(f"{len(node_ids)} nodes but {len(answers)} distinct shards")
        for agent_id, (node, capabilities) in sorted(answers.items()):
            self.coordinator.register(agent_id, capabilities, self.clock.now())
            self.nodes[agent_id] = node
        self.coordinator.online_since_ms = self.clock.now()
        self._persist()

    def run(self) -> None:
        coordinator, idle = self.coordinator, 0
        while coordinator.phase is not ChainPhase.DONE:
            coordinator.tick(self.clock.now())
            tasks = {
                agent: task
                for agent in sorted(self.nodes)
                if (task := coordinator.next_task(agent, self.clock.now())).kind in _MESSAGE_TYPES
                and (agent, task.round_id) not in self.sat_out
            }
            if tasks:
                idle = 0
                self._round(tasks)
            elif coordinator.open_round is not None:
                self.clock.jump_to(coordinator.open_round.deadline_ms)
            elif coordinator.phase is ChainPhase.PROBING:
                self.clock.jump_to(coordinator.probe_deadline_ms)
            else:
                idle += 1
                if idle > MAX_IDLE_LOOPS:
                    raise SimulationError(f"the chain is stuck in phase {coordinator.phase.value}")
            self._persist()
            self._report()

    def _round(self, tasks: dict[str, Task]) -> None:
        if self.secagg is not None and all(t.kind is TaskKind.TRAIN_ROUND for t in tasks.values()):
            self._secure_round(tasks, self.secagg)
            return
        coordinator, now = self.coordinator, self.clock.now()
        messages = []
        for agent, task in tasks.items():
            tensors = None
            if task.kind is not TaskKind.PROBE:
                tensors = coordinator.tensors_for(task.round_id)
            content = records.task_record(task, tensors)
            messages.append(self._message(self.nodes[agent], _MESSAGE_TYPES[task.kind], content))
            coordinator.polling[agent] += 1
        deadlines = [
            t.deadline_unix_ms or (coordinator.probe_deadline_ms if t.kind is TaskKind.PROBE else 0)
            for t in tasks.values()
        ]
        deadlines = [d for d in deadlines if d]
        timeout = max(1.0, (min(deadlines) - now) / 1000) if deadlines else None
        try:
            replies = self._exchange(messages, timeout=timeout)
        finally:
            for agent in tasks:
                coordinator.polling[agent] -= 1
        agents = {node: agent for agent, node in self.nodes.items()}
        answered = sorted(agents[node] for node in replies)
        for agent in answered:  # every answer arrived now, before any closes the round
            coordinator.touch(agent, self.clock.now())
        by_agent = {agents[node]: reply for node, reply in replies.items()}
        for agent in sorted(set(tasks) - set(answered)):
            self.sat_out.add((agent, tasks[agent].round_id))
        for agent in answered:
            self._hand_in(agent, tasks[agent], by_agent[agent])
        coordinator.tick(self.clock.now())

    def _secure_round(self, tasks: dict[str, Task], secagg: SecAggSettings) -> None:
        """A training round through SecAgg+: the coordinator gets the survivors' mean and
        metrics; nodes lost mid-protocol are dropped from the round. When too few stay
        for the protocol to finish, every update is lost: the round runs to its deadline
        and the coordinator re-runs it."""
        coordinator, now = self.coordinator, self.clock.now()
        task = next(iter(tasks.values()))
        tensors = coordinator.tensors_for(task.round_id)
        work = {self.nodes[agent]: (t, tensors) for agent, t in tasks.items()}
        largest = max(e.capabilities.num_samples for e in coordinator.agents.values())
        for agent in tasks:
            coordinator.polling[agent] += 1
        try:
            result = secure_round(
                self.grid,
                coordinator.round_seq,
                work,
                settings=secagg,
                max_weight=largest,
                timeout=max(1.0, (task.deadline_unix_ms - now) / 1000),
            )
        finally:
            for agent in tasks:
                coordinator.polling[agent] -= 1
        if result is None:
            self.say(f"round {task.round_id}: SecAgg+ halted, too few nodes stayed; no mean")
            self.clock.jump_to(task.deadline_unix_ms)
            coordinator.tick(self.clock.now())
            return
        agents = {node: agent for agent, node in self.nodes.items()}
        metrics = {agents[node]: m for node, m in result.metrics.items()}
        lost = sorted(set(tasks) - set(metrics))
        if lost:
            self.say(
                f"round {task.round_id}: SecAgg+ lost {lost}; the mean of the other {len(metrics)}"
            )
        try:
            coordinator.submit_secure_mean(task.round_id, metrics, result.mean, self.clock.now())
        except UpdateRejectedError as exc:
            self.say(f"secure mean of {task.round_id} rejected: {exc}")

    def _hand_in(self, agent: str, task: Task, reply: Message) -> None:
        coordinator, now = self.coordinator, self.clock.now()
        try:
            if task.kind is TaskKind.PROBE:
                coordinator.report_probe(records.probe_of(reply.content))
            else:
                metrics, tensors = records.update_of(reply.content)
                coordinator.submit(agent, task.round_id, metrics, tensors, now)
        except UpdateRejectedError as exc:
            self.say(f"answer of {agent} for {task.round_id} rejected: {exc}")
            self.sat_out.add((agent, task.round_id))

    def finish(self) -> None:
        """Every node writes the final adapters (as ``chainfed agent`` does at DONE); a node
        silent for a round's deadline (lost for good) is named and left out."""
        task = self.coordinator.next_task(sorted(self.nodes)[0], self.clock.now())
        final = self.coordinator.tensors_for("done")
        content = records.task_record(task, final)
        replies = self._exchange(
            [self._message(node, records.FINISH, content) for node in self.nodes.values()],
            timeout=self.coordinator.config.round_deadline_s,
        )
        missing = sorted(agent for agent, node in self.nodes.items() if node not in replies)
        self.say(
            f"chain done: final adapters in {self.state_dir / state_store.FINAL_FILE} and on "
            f"{len(replies)} nodes" + (f" (not on {missing}: no answer)" if missing else "")
        )

    def _message(self, node: int, message_type: str, content: RecordDict) -> Message:
        return Message(content=content, dst_node_id=node, message_type=message_type)

    def _exchange(
        self, messages: list[Message], timeout: float | None = None
    ) -> dict[int, Message]:
        """Send, wait, and return the good replies by node; errors are logged, dropped."""
        good = {}
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.say(f"node {node} failed: {reply.error.reason}")
                continue
            good[node] = reply
        return good

    def _persist(self) -> None:
        state_store.persist(self.coordinator, self.state_dir)

    def _report(self) -> None:
        history = self.coordinator.history
        for record in history[self.seen :]:
            m = record.metrics
            what = "final evaluation" if record.round_id.startswith("eval") else "round"
            self.say(
                f"{what} {record.round_id}: layer {record.stage_layer} window "
                f"{list(record.window_layers)}, {len(record.participants)} agents, "
                f"val loss {m.val_loss:.4f}, val accuracy {m.val_metric:.4f}"
            )
        self.seen = len(history)


def _say(line: str) -> None:
    """Progress of a ``flwr run``: the ServerApp's output is what ``--stream`` shows."""
    print(line, flush=True)


app = build()
"""``flwr run``'s ServerApp (pyproject.toml's ``serverapp``)."""
