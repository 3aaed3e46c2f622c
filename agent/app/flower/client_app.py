"""The chain's ClientApp: a SuperNode does our agent's round work (``FederatedAgent``).

::

    query.register -> capabilities (samples, model fingerprint) + this node's shard number
    query.probe    -> FOAT scores of the local data (ProbeReport)
    train          -> final adapters + window aggregate in, window state + metrics out
    evaluate       -> final adapters + head in, metrics out
    query.finish   -> final adapters in; written to WORKDIR/agent-K/final_adapters.safetensors

The node's shard is ``partition-id`` of ``num-partitions`` (node config; the simulation
engine sets both), cut from the corpus the run config names by ``chainfed agent
--shard``'s rule, and its agent id is ``agent-<partition-id>``. Raw data never leaves the
node: only adapter tensors and scalar metrics go back.

**What a node keeps between rounds.** The prefix caches live on disk under
WORKDIR/agent-K, keyed by fingerprints, so a ClientApp started afresh for a message (the
deployment engine starts one process per message) reuses what earlier rounds computed. A
process that handles several messages (the simulation engine's actors) also keeps the
agent itself: model, encoded data, trainer. The trainer's batch sampler is the one piece of
in-memory state a round's result depends on; its state is saved in the node's
``Context.state`` after every round and restored into a rebuilt trainer, so both engines
give the same updates. (With ``local-epochs`` > 0 a rebuilt trainer starts a new pass over
its rows where a kept one would go on with the current pass.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from chainfed.agent.app.flower import records, secure_aggregation
from chainfed.agent.app.flower.secure_aggregation import secagg_settings
from chainfed.agent.app.options import SimulationConfig, SimulationError
from chainfed.agent.app.simulation import Corpus, agent_local_data, load_corpus
from chainfed.agent.federation.federated_agent import AgentConfig, FederatedAgent
from chainfed.agent.runtime.precision import Precision
from chainfed.proto.messages import Task, UpdateMetrics

SAMPLER_STATE = "chainfed.sampler"
"""The ``Context.state`` record holding the trainer's batch sampler state."""
RunConfig = dict[str, Any] | None
"""A run config given in code (``build``); None: the Context's (``flwr run``'s)."""


@dataclass
class _Node:
    agent: FederatedAgent
    partition: int


_corpora: dict[str, Corpus] = {}
"""Loaded corpora of this process, by run config (JSON)."""
_nodes: dict[tuple[int, int], _Node] = {}
"""Agents of this process, by (run id, node id)."""


def _node(context: Context, run_config: dict[str, Any] | None) -> _Node:
    key = (context.run_id, context.node_id)
    if key in _nodes:
        return _nodes[key]
    config = records.simulation_config(run_config or dict(context.run_config))
    partition = int(context.node_config["partition-id"])
    partitions = int(context.node_config["num-partitions"])
    if partitions != config.agents or not 0 <= partition < partitions:
        raise SimulationError(
            f"node config partition-id={partition} num-partitions={partitions} does not fit "
            f"the run's {config.agents} agents"
        )
    corpus = _corpus(config)
    agent_id = f"agent-{partition}"
    model = corpus.models[config.agent_dtypes[partition]]
    workdir = (config.workdir or Path("runs") / "flower") / agent_id
    agent = FederatedAgent(
        AgentConfig(
            address="flower",
            token="",
            workdir=workdir,
            agent_id=agent_id,
            device=Precision(model.device, model.dtype).describe(),
        ),
        model,
        agent_local_data(corpus, config, partition),
        corpus.fingerprint,
    )
    _nodes[key] = _Node(agent, partition)
    return _nodes[key]


def _corpus(config: SimulationConfig) -> Corpus:
    key = json.dumps(config.to_dict(), sort_keys=True)
    if key not in _corpora:
        _corpora[key] = load_corpus(config)
    return _corpora[key]


def register(content: RecordDict, context: Context, run_config: RunConfig = None) -> RecordDict:
    """This node's capabilities and shard number."""
    node = _node(context, run_config)
    return records.capabilities_record(node.agent.capabilities(), node.partition)


def probe(content: RecordDict, context: Context, run_config: RunConfig = None) -> RecordDict:
    """FOAT: per-layer CKA of the local data."""
    agent = _node(context, run_config).agent
    return records.probe_record(agent.probe_report(records.task_of(content)))


def train(content: RecordDict, context: Context, run_config: RunConfig = None) -> RecordDict:
    """One chain round on the local shard, from the round's tensors; under SecAgg+ the
    round comes and goes in the fit records its mod speaks (``secure_aggregation``)."""
    settings = secagg_settings(run_config or dict(context.run_config))
    if settings is None:
        metrics, update = _train_round(
            records.task_of(content), records.tensors_of(content), context, run_config
        )
        return records.update_record(metrics, update)
    task, tensors = secure_aggregation.task_of_fit(content)
    metrics, update = _train_round(task, tensors, context, run_config)
    return secure_aggregation.fit_result(metrics, update, settings)


def _train_round(
    task: Task, tensors: dict[str, torch.Tensor], context: Context, run_config: RunConfig
) -> tuple[UpdateMetrics, dict[str, torch.Tensor]]:
    agent = _node(context, run_config).agent
    trainer = agent.ensure_trainer(task.params, len(task.window_layers))
    if agent.rounds_done == 0 and SAMPLER_STATE in context.state:
        # a trainer rebuilt in a fresh process: continue the sampler where it stopped
        trainer.rng.bit_generator.state = json.loads(context.state[SAMPLER_STATE]["state"])
    metrics, update = agent.train_update(task, tensors)
    context.state[SAMPLER_STATE] = ConfigRecord(
        {"state": json.dumps(trainer.rng.bit_generator.state)}
    )
    return metrics, update


def evaluate(content: RecordDict, context: Context, run_config: RunConfig = None) -> RecordDict:
    """The final model on the local validation rows."""
    agent = _node(context, run_config).agent
    metrics = agent.evaluation_metrics(records.task_of(content), records.tensors_of(content))
    return records.update_record(metrics, {})


def finish(content: RecordDict, context: Context, run_config: RunConfig = None) -> RecordDict:
    """Write the federation's final adapters with this node's metadata, as ``chainfed
    agent`` does when its chain is done."""
    agent = _node(context, run_config).agent
    task = records.task_of(content)
    path = agent.write_final_adapters(records.tensors_of(content), task.params)
    return RecordDict({records.HEADER: ConfigRecord({"path": str(path)})})


Work = Callable[[RecordDict, Context, RunConfig], RecordDict]


def build(run_config: RunConfig = None, *, mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp; ``run_config`` (tests, the Python simulation API, whose Contexts carry
    none) stands in for the Context's. ``mods`` wrap every message, outermost first (the
    tests' stand-in for a node that dies mid-round).

    With ``secagg`` on in the run config every training message goes through Flower's
    ``secaggplus_mod``, which refuses one that does not follow the protocol: a server
    cannot ask such a node for its update in the clear."""
    client = ClientApp(mods=list(mods))

    def secure_when_configured(
        message: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        if secagg_settings(run_config or dict(context.run_config)) is None:
            return call_next(message, context)
        return secaggplus_mod(message, context, call_next)

    def handler(work: Work) -> Callable[[Message, Context], Message]:
        def handle(message: Message, context: Context) -> Message:
            return Message(work(message.content, context, run_config), reply_to=message)

        return handle

    client.query("register")(handler(register))
    client.query("probe")(handler(probe))
    client.train(mods=[secure_when_configured])(handler(train))
    client.evaluate()(handler(evaluate))
    client.query("finish")(handler(finish))
    return client


app = build()
"""``flwr run``'s ClientApp (pyproject.toml's ``clientapp``)."""
