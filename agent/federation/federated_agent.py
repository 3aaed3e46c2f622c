"""The agent's side of the federation: pull tasks, run chain rounds, upload updates.

::

    Register ──> loop: GetTask (long-poll)
                   WAIT        -> poll again
                   PROBE       -> FOAT scores on local data -> ReportProbe
                   TRAIN_ROUND -> FetchTensors (final adapters + window aggregate)
                                  -> enter the stage (prefix cache advances if the chain moved)
                                  -> local steps -> SubmitUpdate (window state + metrics)
                                  (empty window: a head round, the head alone on the
                                  final features)
                   DONE        -> fetch the final adapters, write them, exit 0

The agent only ever dials the coordinator (edge devices sit behind NAT). When the
coordinator is unreachable it retries with exponential backoff and jitter. After its own
restart it re-registers and, because its prefix caches live in ``workdir`` keyed by
fingerprints, continues without recomputing any prefix it already holds. Raw data never
leaves the device: only adapter/head tensors and scalar metrics are sent.

Under FFA (``TrainingParams.lora_train_a`` False) every A stays at its seeded init for
the whole run, so none travels: the agent uploads B (with the head and GPO proxies) only,
and rebuilds the A of whatever it fetches from the shared seed (``with_seeded_lora_a``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import torch

from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.budget import largest_window
from chainfed.agent.training.chain import (
    ChainConfig,
    ChainTrainer,
    EncodedSplit,
    evaluate_streaming,
    pooled_features_streaming,
)
from chainfed.agent.training.memory_meter import PeakMemoryMeter
from chainfed.agent.training.objectives import ClassifyObjective, LMObjective, build_objective
from chainfed.proto.adapter_file import AdapterFile, AdapterInfo, save_adapter_file
from chainfed.proto.client import CoordinatorClient, CoordinatorError, RetryPolicy
from chainfed.proto.closed_form_head import head_statistics
from chainfed.proto.dp_mechanism import local_dp_update
from chainfed.proto.errors import ChainFedError
from chainfed.proto.messages import (
    AgentCapabilities,
    ProbeReport,
    Registration,
    Task,
    TaskKind,
    TrainingParams,
    UpdateMetrics,
    software_version,
)
from chainfed.proto.seeded_init import linear_in_features, with_seeded_lora_a
from chainfed.proto.tensor_chunks import (
    DEFAULT_MAX_MESSAGE_BYTES,
)
from chainfed.proto.tensor_names import strip_prefix, without_lora_a

log = logging.getLogger("chainfed.agent")


@dataclass(frozen=True)
class AgentConfig:
    """How the agent connects and what it declares."""

    address: str
    """Coordinator ``host:port``."""
    token: str
    """Auth token (shared or this agent's own)."""
    workdir: Path
    """Prefix caches and the final adapters live here (keep it across restarts)."""
    agent_id: str = ""
    """Requested id; empty lets the coordinator (or a per-agent token) decide."""
    tls_ca: bytes | None = None
    """PEM of the CA that signed the coordinator's certificate; None = plaintext."""
    memory_budget_bytes: int = 0
    """Declared training memory (0 = not declared); sizes ``--window auto``."""
    device: str = "cpu"
    """Compute device and dtype declared to the coordinator (``Precision.describe``); the
    model's own device and dtype are what the agent computes with."""
    poll_ms: int = 10_000
    """Long-poll window of GetTask."""
    give_up_after_s: float = RetryPolicy.give_up_after_s
    """Exit with an error after the coordinator is unreachable this long."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Per-message limit until the coordinator states its own."""


@dataclass(frozen=True)
class RoundTraffic:
    """What one round (training, or the closed-form head fit) cost this agent: tensor
    payload each way (bytes of the tensors' values; the wire adds chunk framing), the
    round's memory peak and its compute time."""

    round_id: str
    stage_layer: int
    received_bytes: int
    """Final adapters + window aggregate fetched for the round."""
    sent_bytes: int
    """The window state uploaded."""
    peak_memory_bytes: int
    """Process peak during the round (RSS on CPU)."""
    baseline_memory_bytes: int
    """The process's idle baseline, for the figure above it."""
    compute_seconds: float
    """Wall time of the round's work on this device, from the fetched tensors to the
    update (``train_update``: the trainer's set-up on first use, prefix caches brought up
    at a stage's entry, validation of the fetched aggregate, the local steps); transport
    excluded. The device-seconds of the round when the device does nothing else."""


def payload_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors' values."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class LocalData:
    """This device's private data, encoded, plus what the objective needs."""

    train: EncodedSplit
    val: EncodedSplit
    task: str
    labels: list[str]
    label_token_ids: list[int] | None = None


class FederatedAgent:
    """One agent process: connects, then ``run()`` until the chain is done."""

    def __init__(
        self,
        config: AgentConfig,
        model: StreamingModel,
        data: LocalData,
        model_fingerprint: str,
        *,
        progress: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.model = model
        self.data = data
        self.model_fingerprint = model_fingerprint
        self.progress = progress
        self.sleep = sleep
        self.agent_id = config.agent_id
        self.trainer: ChainTrainer | None = None
        self.rounds_done = 0
        self.traffic: list[RoundTraffic] = []
        """One entry per training round this agent ran."""
        self.client = CoordinatorClient(
            config.address,
            config.token,
            tls_ca=config.tls_ca,
            retry=RetryPolicy(give_up_after_s=config.give_up_after_s),
            max_message_bytes=config.max_message_bytes,
            wait=sleep,
        )

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> Path:
        """Work until the chain is done; returns the path of the final adapter file."""
        self.client.connect()
        self._register()
        while True:
            task = self.client.get_task(self.agent_id, self.config.poll_ms)
            if task.kind is TaskKind.WAIT:
                self.sleep(min(task.retry_after_ms, self.config.poll_ms) / 1000)
            elif task.kind is TaskKind.PROBE:
                self._probe(task)
            elif task.kind is TaskKind.TRAIN_ROUND:
                self._train_round(task)
            elif task.kind is TaskKind.EVALUATE:
                self._evaluate(task)
            elif task.kind is TaskKind.FIT_HEAD:
                self._fit_head(task)
            elif task.kind is TaskKind.DONE:
                return self._finish(task)

    def max_window(self, params: TrainingParams) -> int:
        """The largest DLCT window whose stage fits this agent's declared memory budget at
        the width of its training rows (what it trains at; at most ``--max-len``) under
        ``params``; 0 when it declared no budget."""
        if not self.config.memory_budget_bytes:
            return 0
        return largest_window(
            self.model.config,
            chain_config_from_params(params, 1),
            self.config.memory_budget_bytes,
            seq_len=self.data.train.input_ids.shape[1],
            task=self.data.task,
            dtype=self.model.dtype,
        )

    def _coordinator_params(self) -> TrainingParams | None:
        """The training settings the coordinator gives every task (Status), or None from
        a coordinator that does not say."""
        return self.client.status(history_limit=1, timeout=30).params

    def capabilities(self, max_window: int = 0) -> AgentCapabilities:
        """What this agent declares when it registers (over gRPC, in process or as a
        Flower node): device, budget, samples, model fingerprint, class names."""
        return AgentCapabilities(
            device=self.config.device,
            memory_budget_bytes=self.config.memory_budget_bytes,
            num_samples=len(self.data.train),
            software_version=software_version(),
            model_fingerprint=self.model_fingerprint,
            max_window=max_window,
            labels=tuple(self.data.labels),
        )

    def _register(self) -> None:
        max_window = 0
        if self.config.memory_budget_bytes:
            params = self._coordinator_params()
            max_window = 0 if params is None else self.max_window(params)
        capabilities = self.capabilities(max_window)
        ack = self.client.register(Registration(self.agent_id, self.config.token, capabilities))
        self.agent_id = ack.agent_id
        log.info("registered as %s", self.agent_id)

    def needs_final(self, task: Task) -> bool:
        """Whether a TRAIN_ROUND must fetch the final adapters: only on entering a stage
        (they are adopted then and never change within it)."""
        trainer = self.trainer
        return (
            trainer is None
            or trainer.layer != task.stage_layer
            or trainer.window != list(task.window_layers)
        )

    def _fetch(self, round_id: str, task: Task) -> dict[str, torch.Tensor]:
        omit_final = task.kind is TaskKind.TRAIN_ROUND and not self.needs_final(task)
        specs = [s for s in task.tensors if not (omit_final and s.name.startswith("final."))]
        return self.client.fetch(self.agent_id, round_id, specs, omit_final=omit_final)

    def _fetch_or_none(self, task: Task) -> dict[str, torch.Tensor] | None:
        """The task's tensors, or None when its round closed meanwhile (deadline passed,
        coordinator restarted): the agent then simply asks for its next task."""
        try:
            return self._fetch(task.round_id, task)
        except CoordinatorError as exc:
            if exc.code is not grpc.StatusCode.FAILED_PRECONDITION:
                raise
            log.warning("round %s closed before its tensors were fetched: %s", task.round_id, exc)
            return None

    def ensure_trainer(self, params: TrainingParams, window: int) -> ChainTrainer:
        """This agent's trainer, built from ``params`` on first use and kept after."""
        if self.trainer is None:
            config = chain_config_from_params(params, window)
            if window >= self.model.config.num_layers and not params.e2e_streamed:
                # The coordinator's e2e layout: every layer trains at once, so there is
                # no chain to save memory for; keep the activations, as e2e users do.
                config = replace(config, recompute=False)
            self.trainer = ChainTrainer(
                self.model,
                self._objective(params),
                self.data.train,
                self.data.val,
                config,
                self.config.workdir,
                progress=self.progress,
            )
        return self.trainer

    def _objective(self, params: TrainingParams) -> ClassifyObjective | LMObjective:
        return build_objective(
            self.model,
            self.data.task,
            num_labels=len(self.data.labels),
            label_token_ids=self.data.label_token_ids,
            seed=params.seed,
        )

    def probe_report(self, task: Task) -> ProbeReport:
        """FOAT statistics of this device's data for a PROBE task (no transport)."""
        probe = self.ensure_trainer(task.params, 1).probe()
        return ProbeReport(
            self.agent_id,
            task.round_id,
            tuple(probe.cka_scores),
            len(self.data.train),
            tuple(probe.readout_losses),
        )

    def _probe(self, task: Task) -> None:
        self.client.report_probe(self.probe_report(task))

    def _train_round(self, task: Task) -> None:
        tensors = self._fetch_or_none(task)
        if tensors is None:
            return
        metrics, update = self.train_update(task, tensors)
        self._submit(task.round_id, metrics, update)

    def train_update(
        self, task: Task, tensors: dict[str, torch.Tensor]
    ) -> tuple[UpdateMetrics, dict[str, torch.Tensor]]:
        """One TRAIN_ROUND on local data from the round's fetched ``tensors`` (final
        adapters + window aggregate): the metrics and window state to submit. The work of
        a round without its transport, so an in-process simulation runs the same code.

        The validation figures are those of the fetched aggregate on this agent's
        validation rows, measured before the local steps; the training loss is that of
        the local steps.

        A head round (empty window, after the chain's last stage) takes every adapter as
        final, brings the prefix caches to the top of the model once (later head rounds
        reuse them), and trains the task head alone on those final states: its update
        is the head, and no backward pass goes through any block."""
        started = time.perf_counter()
        window = list(task.window_layers)
        trainer = self.ensure_trainer(task.params, len(window))
        final = self.with_frozen_a(strip_prefix(tensors, "final."), trainer.config.lora)
        with PeakMemoryMeter(self.model.device) as meter:
            if trainer.start_layer is None:
                trainer.set_start_layer(window[0] if window else task.stage_layer)
            if self.needs_final(task):
                trainer.enter_stage(task.stage_layer, window, final=final)
            if trainer.load_trainable_state(strip_prefix(tensors, "window.")):
                trainer.restart_optimizer()
            # Validate the fetched aggregate, not this agent's locally trained window: on
            # a label-skewed shard the local window scores far above the model the
            # federation holds, and the coordinator's stage convergence reads these
            # figures (one round late: see UpdateMetrics.val_loss).
            evaluation = trainer.evaluate_window()
            params = task.params
            start = trainer.trainable_state() if params.local_dp_clip > 0 else None
            result = trainer.train_round(round_steps(params, len(self.data.train)))
            update = trainer.trainable_state()
            if not params.lora_train_a:  # A frozen at its seeded init: nothing to send
                update = without_lora_a(update)
            if start is not None:  # local DP: clip the change, noise it, before it leaves
                update = local_dp_update(
                    update,
                    start,
                    params.local_dp_clip,
                    params.local_dp_noise_multiplier,
                    train_a=params.lora_train_a,
                )
        metrics = UpdateMetrics(
            # FedAvg weight: the samples this agent holds (not the steps it ran)
            train_samples=len(self.data.train),
            val_samples=len(self.data.val),
            steps=result.steps,
            train_loss=result.train_loss,
            val_loss=evaluation.loss,
            val_metric=evaluation.metric,
            peak_memory_bytes=meter.reading.peak_bytes,
            seconds=time.perf_counter() - started,
        )
        self.rounds_done += 1
        self.traffic.append(
            RoundTraffic(
                task.round_id,
                task.stage_layer,
                payload_bytes(tensors),
                payload_bytes(update),
                meter.reading.peak_bytes,
                meter.reading.baseline_bytes,
                metrics.seconds,
            )
        )
        log.info(
            "round %s layer %d: train loss %.4f, val loss %.4f, val metric %.4f",
            task.round_id,
            task.stage_layer,
            result.train_loss,
            evaluation.loss,
            evaluation.metric,
        )
        return metrics, update

    def _evaluate(self, task: Task) -> None:
        final = self._fetch_or_none(task)
        if final is None:
            return
        self._submit(task.round_id, self.evaluation_metrics(task, final), {})

    def evaluation_metrics(self, task: Task, final: dict[str, torch.Tensor]) -> UpdateMetrics:
        """The final model (``final``: adapters + head) on local validation data, by the
        same streamed evaluation as ``chainfed train``; only these metrics go back."""
        started = time.perf_counter()
        objective = self._objective(task.params)
        head = {k.removeprefix("head."): v for k, v in final.items() if k.startswith("head.")}
        if head:
            objective.head.load_state_dict(head)
        adapters, lora = self.final_adapters(final, task.params)
        evaluation = evaluate_streaming(
            self.model, objective, adapters, lora, self.data.val, batch_size=task.params.micro_batch
        )
        return UpdateMetrics(
            train_samples=len(self.data.train),
            val_samples=len(self.data.val),
            steps=0,
            train_loss=0.0,
            val_loss=evaluation.loss,
            val_metric=evaluation.metric,
            peak_memory_bytes=0,
            seconds=time.perf_counter() - started,
        )

    def _fit_head(self, task: Task) -> None:
        final = self._fetch_or_none(task) if task.tensors else {}
        if final is None:
            return
        self._submit(task.round_id, *self.head_statistics(task, final))

    def head_statistics(
        self, task: Task, final: dict[str, torch.Tensor]
    ) -> tuple[UpdateMetrics, dict[str, torch.Tensor]]:
        """FIT_HEAD: the closed-form head statistics (``chainfed.proto.closed_form_head``)
        of this agent's training rows, pooled after the whole network with the adapters in
        ``final`` (none: the base model), and the metrics that weight them (its training
        rows). One forward pass over the rows, from the trainer's prefix cache when its
        states went through the same adapters (only the blocks above it run). After the
        chain's last stage the trainer first moves to the head stage, as a head round
        would: its window's blocks are dropped and the caches advance to the top, where
        the pass then starts and where head rounds after it find them."""
        if self.data.task != "classify":
            raise ChainFedError(
                f"round {task.round_id} asks for a closed-form head, which only the classify "
                f"task has; this agent's task is {self.data.task!r}"
            )
        started = time.perf_counter()
        objective = self._objective(task.params)
        adapters, lora = self.final_adapters(final, task.params)
        trainer = self.trainer
        with PeakMemoryMeter(self.model.device) as meter:
            if trainer is not None and trainer.window and trainer.layer == trainer.L - 1:
                # after the chain's last stage: first what a head round does (the window's
                # blocks go, the caches climb to the top through the federation's final
                # adapters), so no block is held beside the ones streamed
                trainer.enter_stage(trainer.layer, [], final=adapters)
            cache = None if trainer is None else trainer.cached_rows(adapters)
            features = pooled_features_streaming(
                self.model,
                objective,
                adapters,
                lora,
                self.data.train,
                batch_size=task.params.micro_batch,
                cache=cache,
            )
        statistics = head_statistics(features, self.data.train.labels, len(self.data.labels))
        metrics = UpdateMetrics(
            train_samples=len(self.data.train),
            val_samples=0,
            steps=0,
            train_loss=0.0,
            val_loss=0.0,
            val_metric=0.0,
            peak_memory_bytes=meter.reading.peak_bytes,
            seconds=time.perf_counter() - started,
        )
        self.traffic.append(
            RoundTraffic(
                task.round_id,
                task.stage_layer,
                payload_bytes(final),
                payload_bytes(statistics),
                meter.reading.peak_bytes,
                meter.reading.baseline_bytes,
                metrics.seconds,
            )
        )
        log.info("round %s: head statistics of %d training rows", task.round_id, len(features))
        return metrics, statistics

    def _submit(self, round_id: str, metrics: UpdateMetrics, tensors: dict[str, torch.Tensor]):
        try:
            self.client.submit(self.agent_id, round_id, metrics, tensors)
        except CoordinatorError as exc:
            if exc.code is not grpc.StatusCode.FAILED_PRECONDITION:
                raise
            log.warning("update for round %s not taken: %s", round_id, exc)

    def _finish(self, task: Task) -> Path:
        path = self.write_final_adapters(self._fetch("done", task), task.params)
        self.client.close()
        return path

    def final_adapters(
        self, final: dict[str, torch.Tensor], params: TrainingParams
    ) -> tuple[dict[str, torch.Tensor], LoRAConfig]:
        """The adapters of a fetched final model (A rebuilt from the seed under FFA) and
        the LoRA settings of ``params`` they run with: what an evaluation and a head fit
        stream the network with."""
        lora = chain_config_from_params(params, 1).lora
        final = self.with_frozen_a(final, lora)
        return {k: v for k, v in final.items() if k.startswith("layers.")}, lora

    def with_frozen_a(
        self, tensors: dict[str, torch.Tensor], lora: LoRAConfig
    ) -> dict[str, torch.Tensor]:
        """``tensors`` with the seeded A of every adapter that came as B alone, when
        ``lora`` freezes A (FFA); unchanged otherwise."""
        if lora.train_a:
            return tensors

        def in_features(layer: int, module: str) -> int:
            return linear_in_features(self.model.block_tensor_spec(layer))[module]

        return with_seeded_lora_a(tensors, lora.seed, in_features)

    def write_final_adapters(self, final: dict[str, torch.Tensor], params: TrainingParams) -> Path:
        """``WORKDIR/final_adapters.safetensors``: the federation's result with this
        device's metadata (task, labels, LoRA settings), loadable by ``chainfed classify``.
        Under FFA the frozen A, which never travels, is rebuilt from the seed of ``params``
        (the DONE task's). An agent that trained nothing in this process (restarted after
        the chain ended; a Flower ClientApp started for this message) takes the LoRA
        settings and pooling from ``params``, as its trainer would have."""
        lora = chain_config_from_params(params, 1).lora
        objective = self._objective(params) if self.trainer is None else self.trainer.objective
        info = AdapterInfo(
            task=self.data.task,
            model_digest=self.model_fingerprint,
            lora=lora.to_dict(),
            labels=self.data.labels,
            label_token_ids=self.data.label_token_ids,
            pooling=getattr(objective, "pooling", None),
        )
        tensors = self.with_frozen_a(dict(final), lora)
        path = save_adapter_file(
            self.config.workdir / "final_adapters.safetensors", AdapterFile(tensors, info.to_dict())
        )
        log.info("chain done; final adapters in %s", path)
        return path


def round_steps(params: TrainingParams, samples: int) -> int:
    """Optimiser steps of one round on ``samples`` training rows: ``local_steps``, or with
    ``local_epochs`` > 0 that many passes over the rows (FedAvg's E: an agent with more
    rows takes more steps; the last micro-batch of a pass holds what is left)."""
    if params.local_epochs <= 0:
        return params.local_steps
    batches = math.ceil(params.local_epochs * math.ceil(samples / params.micro_batch))
    return max(1, math.ceil(batches / params.grad_accum))


def chain_config_from_params(params: TrainingParams, window: int) -> ChainConfig:
    """The local trainer settings a coordinator's task implies."""
    return ChainConfig(
        mode="chain",
        window=max(window, 1),
        gpo=params.gpo,
        gpo_lambda=params.gpo_lambda,
        proxy_rank=params.proxy_rank,
        foat_samples=params.foat_samples,
        lora=LoRAConfig(
            rank=params.lora_rank,
            alpha=params.lora_alpha,
            dropout=params.lora_dropout,
            targets=params.lora_targets,
            train_a=params.lora_train_a,
            seed=params.lora_seed,
        ),
        lr=params.lr,
        weight_decay=params.weight_decay,
        backbone_dropout=params.backbone_dropout,
        micro_batch=params.micro_batch,
        grad_accum=params.grad_accum,
        steps_per_round=params.local_steps,
        epoch_passes=params.local_epochs > 0,
        seed=params.seed,
    )
