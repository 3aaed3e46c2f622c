"""What travels in Flower messages, and the run config both apps read.

Flower carries records; ours are the protocol's own messages (``chainfed.proto.serde``)
serialised to bytes in a ``ConfigRecord`` — the task header (round id, stage, window,
training settings), an agent's capabilities, a FOAT report, round metrics — plus the
round's tensors in an ``ArrayRecord``. So only adapter tensors and scalar metrics
travel, as over our own gRPC protocol, and each side parses them with the same checks.

The run config (``pyproject.toml``'s ``[tool.flwr.app.config]``, ``flwr run
--run-config``) names the federation as ``chainfed simulate`` does: each key is a
``SimulationConfig`` field with dashes (``train-rows``), ``start-layer = -1`` meaning FOAT,
except ``state-dir``, ``min-agents`` (the coordinator's quorum; 0 = every agent) and the
``secagg*`` keys (``secure_aggregation``).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from chainfed.agent.app.flower.secure_aggregation import RUN_CONFIG_KEYS
from chainfed.agent.app.options import SimulationConfig, SimulationError
from chainfed.proto.chainfed_pb2 import AgentCapabilities as AgentCapabilitiesProto
from chainfed.proto.chainfed_pb2 import ProbeReport as ProbeReportProto
from chainfed.proto.chainfed_pb2 import Task as TaskProto
from chainfed.proto.chainfed_pb2 import UpdateMetrics as UpdateMetricsProto
from chainfed.proto.messages import AgentCapabilities, ProbeReport, Task, UpdateMetrics
from chainfed.proto.serde import (
    agent_capabilities_from_proto,
    agent_capabilities_to_proto,
    parse_message,
    probe_report_from_proto,
    probe_report_to_proto,
    task_from_proto,
    task_to_proto,
    update_metrics_from_proto,
    update_metrics_to_proto,
)

HEADER = "chainfed"
"""The ``ConfigRecord`` holding the serialised protocol messages."""
TENSORS = "tensors"
"""The ``ArrayRecord`` holding a round's tensors (server -> node) or an update (back)."""
REGISTER = "query.register"
PROBE = "query.probe"
FINISH = "query.finish"
TRAIN = "train"
EVALUATE = "evaluate"
"""Flower message types of the chain's tasks (``query.<action>`` for the non-FL ones)."""

_RUN_ONLY = {"state-dir", "min-agents", *RUN_CONFIG_KEYS}
"""Run-config keys that are not ``SimulationConfig`` fields: the ServerApp's state dir,
the quorum (``min-agents``: updates a round needs; 0 = every agent, ``chainfed
simulate``'s) and SecAgg+'s settings (``secure_aggregation``)."""


def simulation_config(run_config: dict[str, Any]) -> SimulationConfig:
    """The federation a Flower run config describes (see the module docstring)."""
    names = {f.name for f in fields(SimulationConfig)}
    settings: dict[str, Any] = {}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if key in _RUN_ONLY:
            continue
        if name not in names:
            raise SimulationError(f"run config {key!r} is not a chainfed simulate setting")
        settings[name] = value
    if settings.get("closed_form_head", "off") != "off":
        raise SimulationError(
            "run config 'closed-form-head': the Flower app has no closed-form head round; "
            "run it with chainfed coordinator or chainfed simulate"
        )
    if settings.get("start_layer") == -1:
        settings["start_layer"] = None
    for name in ("data", "workdir"):
        if settings.get(name):
            settings[name] = Path(settings[name])
        else:
            settings.pop(name, None)
    if settings.get("gpo_lambda", 0) < 0:
        settings["gpo_lambda"] = None
    quorum = int(run_config.get("min-agents", 0))
    if quorum < 0:
        raise SimulationError(f"run config 'min-agents' must be >= 0, got {quorum}")
    if quorum:
        settings["coordinator_options"] = {
            **settings.get("coordinator_options", {}),
            "min_agents": quorum,
        }
    return SimulationConfig(**settings)


def state_dir(run_config: dict[str, Any], config: SimulationConfig) -> Path:
    """Where the ServerApp persists the chain (``state-dir``; default WORKDIR/state)."""
    explicit = run_config.get("state-dir")
    if explicit:
        return Path(str(explicit))
    return (config.workdir or Path("runs") / "flower") / "state"


def task_record(task: Task, tensors: dict[str, torch.Tensor] | None = None) -> RecordDict:
    """A task for a node: its header and, for a round or an evaluation, its tensors."""
    record = RecordDict({HEADER: ConfigRecord({"task": task_to_proto(task).SerializeToString()})})
    if tensors is not None:
        record[TENSORS] = ArrayRecord(tensors)
    return record


def task_of(record: RecordDict) -> Task:
    return task_from_proto(parse_message(TaskProto, _header(record, "task")))


def tensors_of(record: RecordDict) -> dict[str, torch.Tensor]:
    """The tensors of a message (empty when it carries none)."""
    if TENSORS not in record:
        return {}
    return dict(record[TENSORS].to_torch_state_dict())


def capabilities_record(capabilities: AgentCapabilities, partition: int) -> RecordDict:
    """A node's answer to ``query.register``: what it declares, and its shard number."""
    return RecordDict(
        {
            HEADER: ConfigRecord(
                {
                    "capabilities": agent_capabilities_to_proto(capabilities).SerializeToString(),
                    "partition": partition,
                }
            )
        }
    )


def capabilities_of(record: RecordDict) -> tuple[AgentCapabilities, int]:
    caps = parse_message(AgentCapabilitiesProto, _header(record, "capabilities"))
    return agent_capabilities_from_proto(caps), int(record[HEADER]["partition"])


def probe_record(report: ProbeReport) -> RecordDict:
    return RecordDict(
        {HEADER: ConfigRecord({"probe": probe_report_to_proto(report).SerializeToString()})}
    )


def probe_of(record: RecordDict) -> ProbeReport:
    return probe_report_from_proto(parse_message(ProbeReportProto, _header(record, "probe")))


def update_record(metrics: UpdateMetrics, tensors: dict[str, torch.Tensor]) -> RecordDict:
    """A node's answer to a round (window state + metrics) or an evaluation (metrics)."""
    return RecordDict(
        {
            HEADER: ConfigRecord({"metrics": update_metrics_to_proto(metrics).SerializeToString()}),
            TENSORS: ArrayRecord(tensors),
        }
    )


def update_of(record: RecordDict) -> tuple[UpdateMetrics, dict[str, torch.Tensor]]:
    metrics = update_metrics_from_proto(
        parse_message(UpdateMetricsProto, _header(record, "metrics"))
    )
    return metrics, tensors_of(record)


def _header(record: RecordDict, key: str) -> bytes:
    if HEADER not in record or key not in record[HEADER]:
        raise SimulationError(f"message without its {key!r} header")
    return record[HEADER][key]
