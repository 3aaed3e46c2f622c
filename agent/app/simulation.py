"""A whole federation on one machine: N agents with shards of one corpus and a coordinator.

Two ways to run the same federation, chosen by ``SimulationConfig.in_process``::

    in process (fast; tests, benchmarks)        one process per agent (the real thing)
    ┌──────────── this process ────────────┐    coordinator process ◄─gRPC─► agent process × N
    │ ChainCoordinator ◄─ calls ─► agents  │         ▲ Status RPC (progress)
    │ (same tasks, same FederatedAgent work)│    this process: polls, reads the reports
    └───────────────────────────────────────┘

Both build the coordinator from the same ``chainfed coordinator`` flags (``coordinator_config``)
and the agents' data with ``chainfed agent``'s ``--shard K/N --partition`` rule, and the
agents do their rounds with ``FederatedAgent``'s own methods, so the in-process run differs
from the real one only by transport: no gRPC, no chunking, a virtual clock. In process,
agents take their tasks in a fixed order, so a run is deterministic for its seed, and
the clock does not count their compute (``VirtualClock``): however slow the machine, a
round waits for every agent as parallel devices would be waited for.

Modes: ``chain`` (the method), ``e2e`` and ``topk:K`` — plain FedLoRA rounds through the
same coordinator: one stage at the last layer whose window reaches down to layer 0
(``e2e``) or L-K (``topk``), run for exactly ``rounds`` rounds. ``head_rounds`` head-only
rounds follow the last stage in every mode (the same head post-processing for all) and
count within ``rounds``.

Figures: per round the federated validation loss/metric (sample-weighted over the
participants) of the aggregate the round started from, the tensor payload each agent
fetched and uploaded, its memory peak and its compute seconds; at the end the
coordinator's evaluation round (validation data of every agent) and, with ``test_rows``,
the final adapters on a held-out test set no agent has seen (validation rows after the
first ``val_rows``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from chainfed.agent.app.options import (
    SimulationConfig,
    SimulationError,
    data_config,
    device_argv,
)
from chainfed.agent.convert.assets import resolve_model
from chainfed.agent.errors import DataError
from chainfed.agent.federation.federated_agent import (
    AgentConfig,
    FederatedAgent,
    LocalData,
    chain_config_from_params,
    payload_bytes,
)
from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.runtime.precision import Precision, PrecisionError
from chainfed.agent.training.chain import EncodedSplit, Evaluation, evaluate_streaming
from chainfed.agent.training.data import Example, SplitData, hold_out_test_rows, load_dataset
from chainfed.agent.training.memory_meter import declare_unified_memory, process_baseline
from chainfed.agent.training.objectives import build_objective
from chainfed.agent.training.partition import label_skew, shard_of
from chainfed.agent.training.tokenize import encode_split, label_token_ids
from chainfed.coordinator.chain_state import ChainCoordinator
from chainfed.coordinator.command import DEFAULT_MAX_ROUNDS, coordinator_config, option_defaults
from chainfed.coordinator.update_checks import UpdateRejectedError
from chainfed.proto.adapter_file import AdapterInfo, load_adapter_file
from chainfed.proto.auth_token import write_token_file
from chainfed.proto.client import CoordinatorClient, CoordinatorError
from chainfed.proto.messages import (
    ChainPhase,
    RoundRecord,
    StatusSnapshot,
    TaskKind,
)
from chainfed.proto.model_spec import ModelSpec
from chainfed.proto.tensor_names import strip_prefix

UpdateHook = Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
"""(agent id, update tensors) -> the tensors actually submitted (e.g. a malicious agent)."""
Progress = Callable[[str], None]
"""Receives one line of progress text at a time."""
MAX_RERUNS = 10
"""In process: rounds re-run below the quorum before the simulation gives up."""


@dataclass
class RoundEntry:
    """One aggregated round of the federation, with each participant's cost."""

    round_id: str
    stage_layer: int
    window: list[int]
    participants: list[str]
    dropped: list[str]
    train_loss: float
    val_loss: float
    """Federated (sample-weighted) validation loss, head right after the window, of the
    aggregate the round started from (the previous round's result: agents validate what
    they fetched, before their local steps)."""
    val_metric: float
    """Federated validation accuracy (classify) or next-token accuracy (lm)."""
    received_bytes: dict[str, int]
    """Tensor payload each participant fetched for the round."""
    sent_bytes: dict[str, int]
    """Tensor payload each participant uploaded."""
    peak_memory_bytes: dict[str, int]
    """Each participant's memory peak in the round (process RSS on CPU; in process all
    agents share one process, so this includes the others' resident state)."""
    baseline_memory_bytes: dict[str, int]
    """Each participant's idle process baseline."""
    compute_seconds: dict[str, float]
    """Each participant's compute time for the round (``RoundTraffic.compute_seconds``,
    as the agent measured it). In process the agents take turns, so a turn's wall time
    is that device's busy time; agent processes on one machine share its cores, so
    theirs include waiting for the others."""
    test_loss: float | None = None
    test_metric: float | None = None
    """The global model after this round on the held-out test rows (``test_each_round``)."""
    head_fit: bool = False
    """The closed-form head round (``--closed-form-head``, the coordinator's ``fit``
    round): agents uploaded head statistics and validated nothing, so its ``val_*`` and
    ``train_loss`` are 0 and say nothing; its costs and test figures are real."""


@dataclass
class SimulationResult:
    """What a simulation did and reached."""

    config: dict[str, Any]
    num_layers: int
    start_layer: int
    foat_scores: list[float] | None
    readout_losses: list[float] | None
    """FOAT's federated statistics (in process only; None when no probe ran or, for the
    readout losses, the task head is trained)."""
    history: list[RoundEntry]
    """Training rounds, in order."""
    final_val_loss: float
    final_val_metric: float
    """The coordinator's evaluation round: the final model on every agent's validation data."""
    test_loss: float | None
    test_metric: float | None
    """The final adapters on the held-out test rows (None without ``test_rows``)."""
    adapters: str
    """Path of the final adapter file."""
    agent_samples: dict[str, int]
    """Training rows each agent held."""
    seconds: float
    label_skew: float | None = None
    """``partition.label_skew`` of the agents' training rows (None without labels)."""

    @property
    def rounds(self) -> int:
        return len(self.history)

    def bytes_per_agent_round(self) -> float:
        """Mean tensor payload (sent + received) of one agent in one round."""
        per = [
            e.sent_bytes[a] + e.received_bytes[a]
            for e in self.history
            for a in e.participants
            if a in e.sent_bytes
        ]
        return sum(per) / max(len(per), 1)

    def bytes_per_agent(self) -> dict[str, int]:
        """Total tensor payload (sent + received) per agent over the run."""
        total = dict.fromkeys(self.agent_samples, 0)
        for e in self.history:
            for agent, sent in e.sent_bytes.items():
                total[agent] = total.get(agent, 0) + sent + e.received_bytes[agent]
        return total

    def compute_seconds_per_agent(self) -> dict[str, float]:
        """Total compute time (device-seconds) per agent over the run."""
        total = dict.fromkeys(self.agent_samples, 0.0)
        for e in self.history:
            for agent, seconds in e.compute_seconds.items():
                total[agent] = total.get(agent, 0.0) + seconds
        return total

    def peak_memory_per_agent(self) -> dict[str, int]:
        """Largest round peak of each agent."""
        peak = dict.fromkeys(self.agent_samples, 0)
        for e in self.history:
            for agent, value in e.peak_memory_bytes.items():
                peak[agent] = max(peak.get(agent, 0), value)
        return peak

    def peak_above_baseline_per_agent(self) -> dict[str, int]:
        """Largest round peak of each agent above its idle process."""
        peak = dict.fromkeys(self.agent_samples, 0)
        for e in self.history:
            for agent, value in e.peak_memory_bytes.items():
                above = value - e.baseline_memory_bytes[agent]
                peak[agent] = max(peak.get(agent, 0), above)
        return peak

    def stages(self) -> list[dict[str, Any]]:
        """Per run of consecutive rounds of one stage layer, the head stage (``head``
        True, ``window`` empty) and each closed-form head fit (``fit`` True) apart:
        rounds, last federated validation figures, peak memory."""
        out: list[dict[str, Any]] = []
        for e in self.history:
            head = not e.window
            key = (e.stage_layer, head, e.head_fit)
            if not out or (out[-1]["layer"], out[-1]["head"], out[-1]["fit"]) != key:
                out.append(
                    {
                        "layer": e.stage_layer,
                        "head": head,
                        "fit": e.head_fit,
                        "window": e.window,
                        "rounds": 0,
                        "peak_memory_bytes": 0,
                    }
                )
            s = out[-1]
            s["rounds"] += 1
            s["val_loss"], s["val_metric"] = e.val_loss, e.val_metric
            s["peak_memory_bytes"] = max(s["peak_memory_bytes"], *e.peak_memory_bytes.values())
            s["above_baseline_bytes"] = max(
                s.get("above_baseline_bytes", 0),
                *(e.peak_memory_bytes[a] - e.baseline_memory_bytes[a] for a in e.peak_memory_bytes),
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rounds"] = self.rounds
        out["bytes_per_agent_round"] = self.bytes_per_agent_round()
        out["bytes_per_agent"] = self.bytes_per_agent()
        out["compute_seconds_per_agent"] = self.compute_seconds_per_agent()
        out["peak_memory_per_agent"] = self.peak_memory_per_agent()
        out["peak_above_baseline_per_agent"] = self.peak_above_baseline_per_agent()
        out["stages"] = self.stages()
        return out


# -- the federation's settings, as chainfed coordinator / chainfed agent flags ------------------


def fedlora_layout(mode: str, num_layers: int) -> tuple[int | None, int | None]:
    """(start layer, window) of a plain FedLoRA baseline; (None, None) for ``chain``."""
    if mode == "chain":
        return None, None
    k = num_layers if mode.startswith("e2e") else min(int(mode.split(":", 1)[1]), num_layers)
    return num_layers - k, k


def coordinator_options(config: SimulationConfig, num_layers: int) -> dict[str, Any]:
    """The ``chainfed coordinator`` options of this federation (without transport), by
    attribute name, valued as the coordinator's parser gives them."""
    start, window = fedlora_layout(config.mode, num_layers)
    options: dict[str, Any] = {
        "task": config.task,
        "min_agents": config.agents,
        "agents_per_round": config.agents_per_round,
        "aggregation": config.aggregation,
        "gpo": config.gpo,
        "gpo_lambda": config.gpo_lambda,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "micro_batch": config.micro_batch,
        "grad_accum": config.grad_accum,
        "local_steps": config.local_steps,
        "local_epochs": config.local_epochs,
        "rank": config.rank,
        "alpha": config.alpha,
        "targets": config.targets,
        "lora_dropout": config.lora_dropout,
        "backbone_dropout": config.backbone_dropout,
        "e2e_streamed": config.mode == "e2e-streamed",
        "seed": config.seed,
        "round_deadline": config.deadline_s,
        "head_rounds": config.head_rounds,
        "head_local_steps": config.head_local_steps,
        "closed_form_head": config.closed_form_head,
    }
    if start is None:
        options["start_layer"] = "auto" if config.start_layer is None else str(config.start_layer)
        options["foat_threshold"] = config.foat_threshold
        options["foat_readout_factor"] = config.foat_readout_factor
        options["window"] = str(config.window)
        options["min_rounds_per_layer"] = config.min_rounds_per_layer
        options["max_rounds_per_layer"] = config.max_rounds_per_layer
        options["rounds"] = config.rounds
    else:
        rounds = (config.rounds or DEFAULT_MAX_ROUNDS * num_layers) - config.head_rounds
        options.update(start_layer=str(start), window=str(window))
        options["first_stage_layer"] = num_layers - 1
        options.update(min_rounds_per_layer=rounds, max_rounds_per_layer=rounds)
    return options


def coordinator_argv(config: SimulationConfig, num_layers: int) -> list[str]:
    """``coordinator_options`` as the command line of a coordinator process."""
    argv = []
    for name, value in coordinator_options(config, num_layers).items():
        flag = f"--{name.replace('_', '-')}"
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def data_argv(config: SimulationConfig) -> list[str]:
    """The ``chainfed agent`` data options (model, corpus, rows, length, seed)."""
    argv = ["--model", config.model, "--task", config.task, "--max-len", str(config.max_len)]
    argv += ["--train-rows", str(config.train_rows)]
    argv += ["--val-rows", str(config.val_rows)]
    argv += ["--seed", str(config.seed)]
    if config.data is not None:
        argv += ["--data", str(config.data)]
    return argv


@dataclass
class Corpus:
    """The shared corpus, split the agents' way, plus the held-out test rows, and the
    model opened once per compute dtype the agents use."""

    model: StreamingModel
    """Agent 0's: it tokenises and scores the held-out test rows."""
    models: dict[str | None, StreamingModel]
    """By dtype option (``SimulationConfig.agent_dtypes``)."""
    model_dir: Path
    fingerprint: str
    data: SplitData
    test: EncodedSplit | None


def load_corpus(config: SimulationConfig) -> Corpus:
    """The model (once per agent dtype) and the corpus ``config`` names, with its held-out
    test rows: what every agent of the federation derives its shard from."""
    model_dir = resolve_model(config.model, progress=False)
    models = {}
    for name in dict.fromkeys(config.agent_dtypes):
        try:
            precision = Precision.resolve(config.device, name, config.weights)
        except PrecisionError as exc:
            raise SimulationError(f"invalid federation: {exc}") from exc
        models[name] = StreamingModel(
            model_dir, dtype=precision.dtype, device=precision.device, weights=precision.weights
        )
    model = models[config.agent_dtypes[0]]
    data, held_out = load_rows(config)
    test = encode_split(model, held_out, config.task, config.max_len) if held_out else None
    return Corpus(model, models, model_dir, model.fingerprint, data, test)


def load_rows(config: SimulationConfig) -> tuple[SplitData, list[Example]]:
    """The corpus ``config`` names, split the agents' way, and its held-out test rows
    (``test_rows`` of them, taken after the validation rows of the validation pool)."""
    data = load_dataset(
        data_config(
            config.data,
            config.task,
            train_rows=config.train_rows,
            val_rows=config.val_rows + config.test_rows,
            seed=config.seed,
        )
    )
    try:
        held_out = hold_out_test_rows(data, config.val_rows, config.test_rows)
    except DataError as exc:
        raise SimulationError(str(exc)) from None
    return data, held_out


def agent_local_data(corpus: Corpus, config: SimulationConfig, k: int) -> LocalData:
    """Agent ``k``'s shard of the corpus, encoded: ``chainfed agent --shard K/N``'s rule."""
    shard = shard_of(copy.copy(corpus.data), f"{k}/{config.agents}", config.split, config.seed)
    model = corpus.model
    return LocalData(
        train=encode_split(model, shard.train, config.task, config.max_len),
        val=encode_split(model, shard.val, config.task, config.max_len),
        task=config.task,
        labels=shard.labels,
        label_token_ids=(
            label_token_ids(model, corpus.data.train, shard.labels) if config.task == "lm" else None
        ),
    )


def _workdir(config: SimulationConfig) -> Path:
    root = config.workdir or Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    return root


# -- running ------------------------------------------------------------------------------------


def run_simulation(
    config: SimulationConfig,
    *,
    update_hook: UpdateHook | None = None,
    progress: Progress | None = None,
) -> SimulationResult:
    """Run the federation ``config`` describes to the end; see the module docstring.

    ``update_hook`` (in process only) sees every agent's update before it is submitted
    and returns what is submitted instead; an update the coordinator rejects leaves that
    agent out of the round (dropped at the deadline), as over gRPC.
    """
    if update_hook is not None and not config.in_process:
        raise SimulationError("update_hook needs in_process=True (agents are separate processes)")
    process_baseline()
    if config.unified_memory:
        declare_unified_memory(True)
    started = time.perf_counter()
    say = progress or (lambda _line: None)
    corpus = load_corpus(config)
    skew = split_label_skew(corpus, config)
    if skew is not None:
        say(f"split {config.split} over {config.agents} agents: label skew {skew:.3f}")
    root = _workdir(config)
    if config.in_process:
        outcome = _run_in_process(config, corpus, root, update_hook, say)
    else:
        outcome = _run_processes(config, corpus, root, say)
    return replace(_result(config, corpus, outcome, time.perf_counter() - started), label_skew=skew)


def split_label_skew(corpus: Corpus, config: SimulationConfig) -> float | None:
    """``partition.label_skew`` of the agents' training shards (``agent_local_data``'s
    rule), None when the rows carry no labels."""
    shards = [
        shard_of(copy.copy(corpus.data), f"{k}/{config.agents}", config.split, config.seed)
        for k in range(config.agents)
    ]
    labels = [[e.label for e in shard.train] for shard in shards]
    if any(label is None for part in labels for label in part):
        return None
    return label_skew(labels)


@dataclass
class _Outcome:
    """What a run leaves for the result: the coordinator's last snapshot, each agent's
    RoundTraffic (as a dict) per (agent, round id), samples per agent, the adapter file."""

    snapshot: StatusSnapshot
    adapters: Path
    traffic: dict[tuple[str, str], dict[str, Any]]
    samples: dict[str, int]
    foat_scores: list[float] | None = None
    readout_losses: list[float] | None = None
    round_tests: dict[str, Evaluation] = field(default_factory=dict)
    """Test-set evaluation of the global model after each training round, by round id."""


def _run_in_process(
    config: SimulationConfig,
    corpus: Corpus,
    root: Path,
    update_hook: UpdateHook | None,
    say: Progress,
) -> _Outcome:
    round_test = _round_test(config, corpus) if config.test_each_round else None
    federation = _InProcessFederation(
        chain_coordinator(config, corpus.model.spec()), say, update_hook, round_test
    )
    for k in range(config.agents):
        model = corpus.models[config.agent_dtypes[k]]
        federation.join(f"agent-{k}", corpus, model, agent_local_data(corpus, config, k), root)
    return federation.run_to_done(config.agents)


def chain_coordinator(config: SimulationConfig, spec: ModelSpec) -> ChainCoordinator:
    """The coordinator ``chainfed coordinator`` would run with this federation's options
    (and ``coordinator_options`` set on its config) for the model ``spec`` describes. The
    in-process federation and the Flower ServerApp (``chainfed.agent.app.flower``) both
    drive this one."""
    args = argparse.Namespace(**(option_defaults() | coordinator_options(config, spec.num_layers)))
    try:
        coord_config = coordinator_config(args, spec)
    except ValueError as exc:
        raise SimulationError(f"invalid federation: {exc}") from exc
    if config.coordinator_options:
        try:
            coord_config = replace(coord_config, **config.coordinator_options)
        except (TypeError, ValueError) as exc:
            raise SimulationError(f"coordinator_options: {exc}") from exc
    return ChainCoordinator(coord_config)


class _InProcessFederation:
    """A ``ChainCoordinator`` and ``FederatedAgent``s in this process on a virtual clock:
    agents take their tasks in a fixed order, so a run is deterministic for its seeds."""

    def __init__(
        self,
        coordinator: ChainCoordinator,
        say: Progress,
        update_hook: UpdateHook | None,
        round_test: Callable[[ChainCoordinator], Evaluation] | None = None,
    ) -> None:
        self.coordinator, self.say, self.update_hook = coordinator, say, update_hook
        self.round_test = round_test
        self.round_tests: dict[str, Evaluation] = {}
        self.clock = VirtualClock(wall=False)
        self.agents: dict[str, FederatedAgent] = {}
        self.traffic: dict[tuple[str, str], dict[str, Any]] = {}
        self.samples: dict[str, int] = {}
        self.rejected: set[tuple[str, str]] = set()
        """(agent, round) whose update was refused: the agent sits the round out (over
        gRPC such an agent gets INVALID_ARGUMENT and stops)."""

    def join(
        self,
        agent_id: str,
        corpus: Corpus,
        model: StreamingModel,
        local: LocalData,
        root: Path,
    ) -> None:
        """Register an agent computing with ``model`` on ``local``, working under
        ``root / agent_id``."""
        device = Precision(model.device, model.dtype, model.weights).describe()
        agent_config = AgentConfig(
            address="in-process", token="", workdir=root / agent_id, device=device
        )
        agent = FederatedAgent(agent_config, model, local, corpus.fingerprint)
        agent.agent_id = self.coordinator.register(agent_id, agent.capabilities(), self.clock.now())
        self.agents[agent.agent_id] = agent
        self.samples[agent.agent_id] = len(local.train)

    def run_to_done(self, expected_agents: int) -> _Outcome:
        """Hand out tasks until the chain is done; every agent writes its final adapters."""
        coordinator = self.coordinator
        reporter = _ProgressReporter(self.say, expected_agents)
        while coordinator.phase is not ChainPhase.DONE:
            coordinator.tick(self.clock.now())
            worked = False
            for agent_id, agent in self.agents.items():
                if self._work(agent_id, agent):
                    worked = True
                    reporter.show(coordinator.snapshot())
                self._test_last_round()
            if not worked and coordinator.open_round is not None:
                self.clock.jump_to(coordinator.open_round.deadline_ms)
            if coordinator.round_seq - len(coordinator.history) > MAX_RERUNS:
                raise SimulationError(
                    f"more than {MAX_RERUNS} rounds fell short of the quorum (rejected or "
                    "silent agents); lower min_agents in coordinator_options to go on without them"
                )
        snapshot = coordinator.snapshot()
        reporter.show(snapshot)
        paths = [
            agent.write_final_adapters(dict(coordinator.final), coordinator.params)
            for agent in self.agents.values()
        ]
        return _Outcome(
            snapshot,
            paths[0],
            self.traffic,
            self.samples,
            coordinator.foat_scores,
            coordinator.readout_losses,
            self.round_tests,
        )

    def _test_last_round(self) -> None:
        """With ``round_test``: score the global model once after each training round."""
        history = self.coordinator.history
        if self.round_test is None or not history:
            return
        round_id = history[-1].round_id
        if not round_id.startswith("eval") and round_id not in self.round_tests:
            test = self.round_tests[round_id] = self.round_test(self.coordinator)
            self.say(
                f"round {round_id}: global model on the test rows: loss {test.loss:.4f}, "
                f"accuracy {test.metric:.4f}"
            )

    def _work(self, agent_id: str, agent: FederatedAgent) -> bool:
        """Do the agent's current task, as its client loop would; False when it has none."""
        coordinator, clock, say = self.coordinator, self.clock, self.say
        task = coordinator.next_task(agent_id, clock.now())
        if task.kind is TaskKind.PROBE:
            coordinator.report_probe(agent.probe_report(task))
            coordinator.tick(clock.now())
        elif task.kind is TaskKind.TRAIN_ROUND:
            if (agent_id, task.round_id) in self.rejected:
                return False
            tensors = coordinator.tensors_for(task.round_id, omit_final=not agent.needs_final(task))
            metrics, update = agent.train_update(task, tensors)
            if self.update_hook is not None:
                update = self.update_hook(agent_id, update)
            if not _submit(coordinator, agent_id, task.round_id, metrics, update, clock, say):
                self.rejected.add((agent_id, task.round_id))
            cost = asdict(agent.traffic[-1])
            cost["sent_bytes"] = payload_bytes(update)
            self.traffic[(agent_id, task.round_id)] = cost
        elif task.kind is TaskKind.EVALUATE:
            final = coordinator.tensors_for(task.round_id)
            metrics = agent.evaluation_metrics(task, final)
            _submit(coordinator, agent_id, task.round_id, metrics, {}, clock, say)
        elif task.kind is TaskKind.FIT_HEAD:
            if (agent_id, task.round_id) in self.rejected:
                return False
            final = coordinator.tensors_for(task.round_id)
            metrics, statistics = agent.head_statistics(task, final)
            if self.update_hook is not None:
                statistics = self.update_hook(agent_id, statistics)
            if not _submit(coordinator, agent_id, task.round_id, metrics, statistics, clock, say):
                self.rejected.add((agent_id, task.round_id))
            self.traffic[(agent_id, task.round_id)] = asdict(agent.traffic[-1])
        else:
            return False
        return True


def _submit(coordinator, agent_id, round_id, metrics, tensors, clock, say) -> bool:
    """Submit as the servicer would; False (and a progress line) when it is rejected."""
    try:
        coordinator.submit(agent_id, round_id, metrics, tensors, clock.now())
    except UpdateRejectedError as exc:
        say(f"update of {agent_id} for round {round_id} rejected: {exc}")
        return False
    return True


class VirtualClock:
    """The coordinator's milliseconds: a base plus the jumps made to close rounds at their
    deadline without waiting.

    With ``wall`` the base is wall time: agents that really run side by side (Flower's
    ClientApps). Without it the base stays where the clock started: in process, agents
    take turns, and each stands for a device working in parallel with the others, so the
    time one spends training is not the others' silence. Counted, it made a round whose
    agents' turns add up past the deadline drop the later agents and run again, and
    agents silent past ``agent_timeout`` while the others trained were left out of the
    next round, which then aggregated a label-skewed subset of the federation."""

    def __init__(self, *, wall: bool = True) -> None:
        self.wall = wall
        self.started_ms = int(time.time() * 1000)
        self.offset_ms = 0

    def now(self) -> int:
        base = int(time.time() * 1000) if self.wall else self.started_ms
        return base + self.offset_ms

    def jump_to(self, when_ms: int) -> None:
        self.offset_ms += max(0, when_ms - self.now())


class _ProgressReporter:
    """Turns coordinator snapshots into one line per new event (phase, round)."""

    def __init__(self, say: Progress, agents: int) -> None:
        self.say, self.agents = say, agents
        self.phase: ChainPhase | None = None
        self.seen = 0
        self.started = time.monotonic()

    def _line(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        self.say(f"[{int(elapsed // 60):02d}:{int(elapsed % 60):02d}] {text}")

    def show(self, s: StatusSnapshot) -> None:
        for record in s.history[self.seen :]:
            m = record.metrics
            reported = (
                f"{len(record.participants)}/{len(record.participants) + len(record.dropped)} "
                "agents reported"
            )
            if record.head_fit:
                self._line(
                    f"round {record.round_id}: task head fitted in closed form, {reported} "
                    f"({m.train_samples} training rows)"
                )
                continue
            what = "final evaluation" if record.round_id.startswith("eval") else "round"
            self._line(
                f"{what} {record.round_id}: layer {record.stage_layer} window "
                f"{list(record.window_layers)}, {reported}, "
                f"val loss {m.val_loss:.4f}, val accuracy {m.val_metric:.4f}"
            )
        self.seen = len(s.history)
        if s.phase is not self.phase:
            self.phase = s.phase
            if s.phase is ChainPhase.TRAINING:
                self._line(
                    f"training: chain starts at layer {s.start_layer} of {s.num_layers}, "
                    f"window {list(s.window_layers)}"
                )
            else:
                registered = len(s.agents)
                self._line(f"{s.phase.value} ({registered}/{self.agents} agents registered)")


# -- one process per agent over gRPC ---------------------------------------------------------------


CLI = [sys.executable, "-m", "chainfed.agent.cli"]


def _run_processes(config: SimulationConfig, corpus: Corpus, root: Path, say: Progress) -> _Outcome:
    token = secrets.token_urlsafe(16)
    token_file = write_token_file(root / "token", token)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    processes: list[tuple[str, subprocess.Popen]] = []
    try:
        coordinator = subprocess.Popen(
            _coordinator_command(config, corpus, root / "state", token_file),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            text=True,
        )
        processes.append(("coordinator", coordinator))
        address = _listening_address(coordinator, logs / "coordinator.log")
        for k in range(config.agents):
            agent_id = f"agent-{k}"
            processes.append((agent_id, _start_agent(config, k, address, token_file, root)))
        snapshot = _follow(address, token, processes, say, config.agents, logs)
        for name, process in processes:
            if process.wait(timeout=120) != 0:
                raise SimulationError(
                    f"{name} exited with status {process.returncode}; see {logs / (name + '.log')}"
                )
    finally:
        for _name, process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    traffic = {}
    for k in range(config.agents):
        agent_id = f"agent-{k}"
        report = json.loads((root / agent_id / "agent_report.json").read_text())
        for entry in report["rounds"]:
            traffic[(agent_id, entry["round_id"])] = entry
    samples = {a.agent_id: a.capabilities.num_samples for a in snapshot.agents}
    return _Outcome(snapshot, root / "agent-0" / "final_adapters.safetensors", traffic, samples)


def _coordinator_command(
    config: SimulationConfig, corpus: Corpus, state_dir: Path, token_file: Path
) -> list[str]:
    """``chainfed coordinator`` on a free local port for this federation."""
    options = []
    for name, value in config.coordinator_options.items():
        options += [f"--{name.replace('_', '-')}", str(value)]
    return [
        *CLI,
        "coordinator",
        *("--host", "127.0.0.1", "--port", "0", "--state-dir", str(state_dir)),
        *("--token-file", str(token_file), "--exit-after-done", "2", "--model", config.model),
        *coordinator_argv(config, corpus.model.num_layers),
        *options,
    ]


def _start_agent(
    config: SimulationConfig, k: int, address: str, token_file: Path, root: Path
) -> subprocess.Popen:
    """``chainfed agent`` ``agent-K`` on shard K of the corpus, logging to
    ``root/logs/agent-K.log``, with ``threads_per_agent`` BLAS/OpenMP threads."""
    agent_id = f"agent-{k}"
    threads = str(config.threads_per_agent)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads}
    env["MKL_NUM_THREADS"] = threads
    command = [
        *CLI,
        "agent",
        *("--coordinator", address, "--token-file", str(token_file), "--agent-id", agent_id),
        *("--workdir", str(root / agent_id), "--shard", f"{k}/{config.agents}"),
        *("--partition", config.split, "--quiet", *data_argv(config)),
        *device_argv(config.device, config.agent_dtypes[k], config.unified_memory, config.weights),
    ]
    with open(root / "logs" / f"{agent_id}.log", "w") as log_file:
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)


def _listening_address(process: subprocess.Popen, log_path: Path) -> str:
    """Read the coordinator's stdout until it says where it listens; the rest of its
    output goes to ``log_path`` from a background thread."""
    import threading

    log_file = open(log_path, "w")  # noqa: SIM115 - closed by the copying thread
    for line in process.stdout:
        log_file.write(line)
        log_file.flush()
        match = re.search(r"listening on ([^ ]+:\d+)", line)
        if match:
            address = match.group(1)

            def copy_rest() -> None:
                with log_file:
                    for rest in process.stdout:
                        log_file.write(rest)
                        log_file.flush()

            threading.Thread(target=copy_rest, daemon=True).start()
            return address
    log_file.close()
    raise SimulationError(
        f"the coordinator exited with status {process.wait()} before listening; see {log_path}"
    )


def _follow(
    address: str,
    token: str,
    processes: list[tuple[str, subprocess.Popen]],
    say: Progress,
    agents: int,
    logs: Path,
) -> StatusSnapshot:
    """Poll the coordinator's Status RPC until the chain is done; report progress."""
    client = CoordinatorClient(address, token)
    reporter = _ProgressReporter(say, agents)
    try:
        while True:
            for name, process in processes:
                if process.poll() not in (None, 0):
                    raise SimulationError(
                        f"{name} exited with status {process.returncode}; see "
                        f"{logs / (name + '.log')}"
                    )
            try:
                snapshot = client.status()
            except CoordinatorError:
                time.sleep(0.5)
                continue
            reporter.show(snapshot)
            if snapshot.phase is ChainPhase.DONE:
                return snapshot
            time.sleep(1.0)
    finally:
        client.close()


# -- the result ------------------------------------------------------------------------------------


def _result(
    config: SimulationConfig,
    corpus: Corpus,
    outcome: _Outcome,
    seconds: float,
) -> SimulationResult:
    snapshot = outcome.snapshot
    history = [
        _entry(r, outcome.traffic, outcome.round_tests.get(r.round_id))
        for r in snapshot.history
        if not r.round_id.startswith("eval")
    ]
    evaluation = [r for r in snapshot.history if r.round_id.startswith("eval")]
    if not evaluation:
        raise SimulationError("the federation finished without its evaluation round")
    final = evaluation[-1].metrics
    test_loss = test_metric = None
    if corpus.test is not None:
        test_loss, test_metric = _evaluate_file(corpus, outcome.adapters, config)
    return SimulationResult(
        config=config.to_dict(),
        num_layers=snapshot.num_layers,
        start_layer=snapshot.start_layer,
        foat_scores=outcome.foat_scores,
        readout_losses=outcome.readout_losses,
        history=history,
        final_val_loss=final.val_loss,
        final_val_metric=final.val_metric,
        test_loss=test_loss,
        test_metric=test_metric,
        adapters=str(outcome.adapters),
        agent_samples=dict(outcome.samples),
        seconds=seconds,
    )


def _entry(
    record: RoundRecord,
    traffic: dict[tuple[str, str], dict[str, Any]],
    test: Evaluation | None,
) -> RoundEntry:
    costs = {a: traffic[(a, record.round_id)] for a in record.participants}
    m = record.metrics
    return RoundEntry(
        round_id=record.round_id,
        stage_layer=record.stage_layer,
        window=list(record.window_layers),
        participants=list(record.participants),
        dropped=list(record.dropped),
        train_loss=m.train_loss,
        val_loss=m.val_loss,
        val_metric=m.val_metric,
        received_bytes={a: c["received_bytes"] for a, c in costs.items()},
        sent_bytes={a: c["sent_bytes"] for a, c in costs.items()},
        peak_memory_bytes={a: c["peak_memory_bytes"] for a, c in costs.items()},
        baseline_memory_bytes={a: c["baseline_memory_bytes"] for a, c in costs.items()},
        compute_seconds={a: c["compute_seconds"] for a, c in costs.items()},
        test_loss=None if test is None else test.loss,
        test_metric=None if test is None else test.metric,
        head_fit=record.head_fit,
    )


def _round_test(
    config: SimulationConfig, corpus: Corpus
) -> Callable[[ChainCoordinator], Evaluation]:
    """Scores a coordinator's current global model on the held-out test rows, by the same
    streamed evaluation as the final adapter file."""
    model = corpus.model
    objective = build_objective(
        model,
        config.task,
        num_labels=len(corpus.data.labels),
        label_token_ids=(
            label_token_ids(model, corpus.data.train, corpus.data.labels)
            if config.task == "lm"
            else None
        ),
        seed=config.seed,
    )

    def score(coordinator: ChainCoordinator) -> Evaluation:
        state = coordinator.global_model()
        if config.task == "classify":
            objective.head.load_state_dict(strip_prefix(state, "head."))
        lora = chain_config_from_params(coordinator.params, 1).lora
        adapters = {k: v for k, v in state.items() if k.startswith("layers.")}
        return evaluate_streaming(model, objective, adapters, lora, corpus.test)

    return score


def _evaluate_file(corpus: Corpus, adapters: Path, config: SimulationConfig) -> tuple[float, float]:
    """The final adapter file on the held-out test rows, by the streamed evaluation."""
    saved = load_adapter_file(adapters)
    info = AdapterInfo.from_dict(saved.info, adapters)
    model = corpus.model
    objective = build_objective(
        model,
        config.task,
        num_labels=len(corpus.data.labels),
        label_token_ids=info.label_token_ids,
        seed=config.seed,
    )
    if config.task == "classify":
        objective.head.load_state_dict(saved.head())
    lora = LoRAConfig(**info.lora_settings(adapters))
    evaluation = evaluate_streaming(model, objective, saved.adapters(), lora, corpus.test)
    return evaluation.loss, evaluation.metric
