"""Secure Aggregation+ for the chain's training rounds: Flower's protocol, none of ours.

With ``secagg = true`` in the run config every training round goes through Flower's
``SecAggPlusWorkflow`` (server) and ``secaggplus_mod`` (each node): a node trains as
usual, then hands its window update to the mod, which quantises it, masks it with
pairwise and private masks and secret-shares the mask seeds; the server adds the masked
vectors and removes the masks, and so learns the sample-weighted mean of the round's
survivors and nothing about any one update. A node lost after sharing its keys (crash,
SIGKILL, a deadline missed) is a dropout: the others' shares rebuild its pairwise masks
and the round closes with the mean of the rest (``ChainCoordinator.submit_secure_mean``).
FOAT probes, evaluation rounds and the final adapters are not updates and travel as
without SecAgg+; so do each node's round metrics (losses, sample counts), which the
coordinator needs for the federated validation loss and the quorum.

What works under it is ``chainfed.coordinator.secure_aggregation``'s table (fedavg, ffa,
local DP; svd, median, trimmed-mean, norm bound, clip norm and central DP are refused
before the chain starts). Each node refuses to mask a non-finite update or one with a
value outside ±``clipping-range`` (the mod would clip it silently).

**Run config** (``[tool.flwr.app.config]`` or ``flwr run --run-config``)::

    secagg                           false   true: every training round through SecAgg+
    secagg-num-shares                3       shares of each node's secrets (a float: that
                                             fraction of the round's nodes)
    secagg-reconstruction-threshold  2       shares that rebuild a secret (a float: that
                                             fraction of num-shares); a round survives as
                                             long as every node keeps this many neighbours
    secagg-clipping-range            1.0     c: every tensor value must lie in [-c, c]
    secagg-quantization-range        2**24   Q: values map to integers 0..Q

The modulus is 2**32, so a round may hold at most ``2**32 // Q - 1`` nodes (255 at the
default Q) before the integer sum could wrap; the run is refused above that. Each
SecAgg+ stage waits at most until the round's deadline (``deadline-s``) for its replies.

**Quantisation error.** Node k scales its tensors x_k by q_k / Q, with integer weight
q_k = round(n_k Q / M) (n_k its training samples, M the largest n_k of the federation),
and rounds ``(q_k x_k / Q + c) · Q / 2c`` stochastically to an integer (error < 1). The
server's result is Σ q_k x_k / Σ q_k plus 2c/Σq_k times the sum of the K rounding
errors, and Σ q_k x_k / Σ q_k differs from the exact Σ n_k x_k / Σ n_k by at most
c·K/(A − K/2) with A = Q·Σn_k/M (the weights' own rounding, |x| ≤ c). Per coordinate,
before the cast to float32::

    |secure mean − weighted mean| < 3cK / (A − K/2)                (quantisation_bound)

For MiniLM's LoRA tensors (|values| < 0.25 in our runs, so c = 1 leaves 4x headroom),
three nodes of 30 samples each and the defaults: A = 3·2**24, bound 1.8e-7. A larger c
or a smaller Q scales it linearly; small shards beside a large one (a small A) raise it.
Nodes send float64 so that the mod's arithmetic adds no float32 rounding of its own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from chainfed.agent.app.options import SimulationError
from chainfed.proto.chainfed_pb2 import Task as TaskProto
from chainfed.proto.chainfed_pb2 import UpdateMetrics as UpdateMetricsProto
from chainfed.proto.messages import Task, UpdateMetrics
from chainfed.proto.serde import (
    parse_message,
    task_from_proto,
    task_to_proto,
    update_metrics_from_proto,
    update_metrics_to_proto,
)

MODULUS_RANGE = 2**32
"""Flower's default modulus: the integer ring the masked sums live in."""
RUN_CONFIG_KEYS = (
    "secagg",
    "secagg-num-shares",
    "secagg-reconstruction-threshold",
    "secagg-clipping-range",
    "secagg-quantization-range",
)
"""The run-config keys of this module (the module docstring)."""
FIT_TASK = "chainfed.task"
FIT_TENSORS = "chainfed.tensors"
FIT_METRICS = "chainfed.metrics"
"""Keys of our messages in the legacy fit records SecAgg+ speaks (FitIns.config for the
task and the names of its tensors; FitRes.metrics for the round metrics and the names
and dtypes of the update's tensors)."""


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+ parameters of a run (the module docstring's run-config keys)."""

    num_shares: int | float = 3
    """Shares of each node's secrets; a float is a fraction of the round's nodes."""
    reconstruction_threshold: int | float = 2
    """Shares that rebuild a secret; a float is a fraction of ``num_shares``."""
    clipping_range: float = 1.0
    """c: tensor values must lie in [-c, c]."""
    quantization_range: int = 2**24
    """Q: [-c, c] maps to the integers 0..Q."""

    def __post_init__(self) -> None:
        if not self.clipping_range > 0:
            raise SimulationError(f"secagg-clipping-range must be > 0, got {self.clipping_range}")
        if not 0 < self.quantization_range < MODULUS_RANGE // 2:
            raise SimulationError(
                f"secagg-quantization-range must be in 1..{MODULUS_RANGE // 2 - 1}, got "
                f"{self.quantization_range}"
            )
        # Flower's own checks of the share counts, now rather than at the first round
        self.workflow(timeout=None)

    @property
    def max_nodes(self) -> int:
        """Most nodes a round may sum without the integers wrapping (K + 1 terms ≤ Q each:
        the K quantised updates and the weights' sum)."""
        return MODULUS_RANGE // self.quantization_range - 1

    def check_round_size(self, nodes: int) -> None:
        """Refuse a round of ``nodes`` nodes that SecAgg+ cannot sum (the module docstring)."""
        if nodes < 2:
            raise SimulationError("SecAgg+ needs at least 2 nodes in a round")
        if nodes > self.max_nodes:
            raise SimulationError(
                f"SecAgg+ with quantization range {self.quantization_range} sums at most "
                f"{self.max_nodes} nodes in 2**32; this run has {nodes} in a round"
            )

    def workflow(self, timeout: float | None) -> SecAggPlusWorkflow:
        """Flower's server side of one round, waiting at most ``timeout`` s per stage;
        ``max_weight`` is set per round (``secure_round``)."""
        try:
            return SecAggPlusWorkflow(
                self.num_shares,
                self.reconstruction_threshold,
                clipping_range=self.clipping_range,
                quantization_range=self.quantization_range,
                modulus_range=MODULUS_RANGE,
                timeout=timeout,
            )
        except (TypeError, ValueError) as exc:
            raise SimulationError(f"SecAgg+ settings: {exc}") from exc


def secagg_settings(run_config: dict[str, Any]) -> SecAggSettings | None:
    """The run's SecAgg+ settings; None when ``secagg`` is off or absent."""
    if not run_config.get("secagg", False):
        return None
    defaults = SecAggSettings()
    return SecAggSettings(
        num_shares=run_config.get("secagg-num-shares", defaults.num_shares),
        reconstruction_threshold=run_config.get(
            "secagg-reconstruction-threshold", defaults.reconstruction_threshold
        ),
        clipping_range=float(run_config.get("secagg-clipping-range", defaults.clipping_range)),
        quantization_range=int(
            run_config.get("secagg-quantization-range", defaults.quantization_range)
        ),
    )


def quantisation_bound(settings: SecAggSettings, samples: Sequence[int], max_weight: int) -> float:
    """Per-coordinate bound on |secure mean − sample-weighted mean| of one round whose
    survivors trained on ``samples`` (``max_weight``: the workflow's M), for tensor values
    within ±c; derived in the module docstring."""
    k, c, q = len(samples), settings.clipping_range, settings.quantization_range
    total = q * sum(samples) / max_weight
    return 3 * c * k / (total - k / 2)


# -- node side ------------------------------------------------------------------------


def fit_instructions(task: Task, tensors: dict[str, torch.Tensor]) -> FitIns:
    """A training round as SecAgg+'s fit message carries it: the round's tensors as
    parameters, the task and the tensors' names in the config."""
    return FitIns(
        parameters=ndarrays_to_parameters([t.numpy() for t in tensors.values()]),
        config={
            FIT_TASK: task_to_proto(task).SerializeToString(),
            FIT_TENSORS: json.dumps(list(tensors)),
        },
    )


def task_of_fit(content: RecordDict) -> tuple[Task, dict[str, torch.Tensor]]:
    """The task and round tensors of a fit message (``fit_instructions``)."""
    fit = compat.recorddict_to_fitins(content, keep_input=True)
    if FIT_TASK not in fit.config or FIT_TENSORS not in fit.config:
        raise SimulationError("a SecAgg+ fit message without the chain's task")
    task = task_from_proto(parse_message(TaskProto, fit.config[FIT_TASK]))
    names = json.loads(str(fit.config[FIT_TENSORS]))
    arrays = parameters_to_ndarrays(fit.parameters)
    return task, {n: torch.from_numpy(a.copy()) for n, a in zip(names, arrays, strict=True)}


def fit_result(
    metrics: UpdateMetrics, update: dict[str, torch.Tensor], settings: SecAggSettings
) -> RecordDict:
    """A node's update as the SecAgg+ mod takes it: the tensors in float64 as parameters,
    ``train_samples`` as the weight, our metrics and the tensors' names and dtypes in
    the clear. Refuses an update the quantiser would corrupt: non-finite values, or
    values beyond ±c (which the mod would clip without a word)."""
    c = settings.clipping_range
    for name, tensor in update.items():
        if not bool(torch.isfinite(tensor).all()):
            raise SimulationError(f"update tensor {name!r} has NaN or Inf values")
        largest = float(tensor.abs().max()) if tensor.numel() else 0.0
        if largest > c:
            raise SimulationError(
                f"update tensor {name!r} holds {largest:.4g}, beyond the SecAgg+ clipping "
                f"range {c:g}: raise secagg-clipping-range"
            )
    described = [[name, str(t.dtype)] for name, t in update.items()]
    result = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters([t.double().numpy() for t in update.values()]),
        num_examples=metrics.train_samples,
        metrics={
            FIT_METRICS: update_metrics_to_proto(metrics).SerializeToString(),
            FIT_TENSORS: json.dumps(described),
        },
    )
    return compat.fitres_to_recorddict(result, keep_input=True)


# -- server side ----------------------------------------------------------------------


@dataclass(frozen=True)
class SecureRound:
    """What one SecAgg+ round showed the server."""

    metrics: dict[int, UpdateMetrics]
    """Round metrics of each survivor (node id): the nodes whose update is in the mean."""
    mean: dict[str, torch.Tensor]
    """The survivors' sample-weighted mean, in the updates' dtype."""


class _OneRound(Strategy):
    """The legacy strategy SecAggPlusWorkflow drives: hands out the given fit
    instructions and keeps what the workflow aggregates."""

    def __init__(self, instructions: list[tuple[ClientProxy, FitIns]]) -> None:
        self.instructions = instructions
        self.results: list[tuple[ClientProxy, FitRes]] | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return self.instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.results = results
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list, failures: list
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


def secure_round(
    grid: Grid,
    round_number: int,
    tasks: dict[int, tuple[Task, dict[str, torch.Tensor]]],
    *,
    settings: SecAggSettings,
    max_weight: int,
    timeout: float,
) -> SecureRound | None:
    """Run one training round on the nodes of ``tasks`` (node id -> task, round tensors)
    through SecAgg+; None when too few nodes stayed for the protocol to finish (every
    update is then lost, as in a round nobody answered). ``max_weight``: the largest
    training-sample count of the federation (each node's weight is n_k / max_weight)."""
    settings.check_round_size(len(tasks))
    run_id = grid.run.run_id
    strategy = _OneRound(
        [
            (GridClientProxy(node, grid, run_id), fit_instructions(task, tensors))
            for node, (task, tensors) in tasks.items()
        ]
    )
    context = LegacyContext(
        Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        strategy=strategy,
    )
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_number})
    context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = settings.workflow(timeout)
    workflow.max_weight = float(max_weight)
    workflow(grid, context)
    if not strategy.results:
        return None
    metrics, described = {}, None
    for proxy, fit in strategy.results:
        node = int(proxy.node_id)
        metrics[node] = update_metrics_from_proto(
            parse_message(UpdateMetricsProto, fit.metrics[FIT_METRICS])
        )
        names = json.loads(str(fit.metrics[FIT_TENSORS]))
        if described is not None and names != described:
            raise SimulationError(
                f"node {node} masked tensors {names}, another {described}: no mean to take"
            )
        described = names
    arrays = parameters_to_ndarrays(strategy.results[0][1].parameters)
    mean = {
        name: torch.from_numpy(np.asarray(array)).to(getattr(torch, dtype.removeprefix("torch.")))
        for (name, dtype), array in zip(described, arrays, strict=True)
    }
    return SecureRound(metrics, mean)
