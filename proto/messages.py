"""Domain objects of the federation protocol: plain dataclasses, no protobuf.

Each mirrors one message of ``proto/chainfed.proto`` (whose comments are the reference
for every field); ``chainfed.proto.serde`` converts between the two, so protobuf
types never reach training or coordination code. Objects validate what they can on
creation and raise ``ProtocolError`` for values no peer may send. Tensor manifests use
``chainfed.proto.tensor_chunks.TensorSpec``.

Times are unix epoch milliseconds (``*_unix_ms``); sizes are bytes.
"""

from __future__ import annotations

import enum
import importlib.metadata
import math
from dataclasses import dataclass, field

from chainfed.proto.chain_rules import parse_gpo
from chainfed.proto.tensor_chunks import TensorSpec

LORA_TARGETS = ("qv", "attention", "all")
"""Where adapters go in each block: ``qv`` the query and value projections (the LoRA
paper's placement and PEFT's default for BERT-family models), ``attention`` the q/k/v/o
projections, ``all`` every linear layer."""


class ProtocolError(ValueError):
    """A message is well-formed protobuf but breaks the protocol (missing or bad field)."""


def software_version() -> str:
    """The installed chainfed's version (``setup.py``'s), which an agent declares in its
    ``AgentCapabilities``; ``unknown`` when chainfed runs from source without being
    installed (its folders on ``PYTHONPATH``)."""
    try:
        return importlib.metadata.version("chainfed")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ProtocolError(message)


def _non_negative(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value >= 0, f"{type(obj).__name__}.{name} must be >= 0, got {value}")


class TaskKind(enum.Enum):
    """What GetTask asks an agent to do."""

    WAIT = "wait"
    PROBE = "probe"
    TRAIN_ROUND = "train_round"
    ADVANCE = "advance"
    DONE = "done"
    EVALUATE = "evaluate"
    FIT_HEAD = "fit_head"


class ChainPhase(enum.Enum):
    """Where the whole federation is."""

    WAITING_FOR_AGENTS = "waiting_for_agents"
    PROBING = "probing"
    TRAINING = "training"
    EVALUATING = "evaluating"
    DONE = "done"


@dataclass(frozen=True)
class AgentCapabilities:
    """What an agent can do; sizes the window and weights aggregation."""

    device: str
    """Compute device, e.g. ``cpu``, ``cuda:0``."""
    memory_budget_bytes: int
    """Memory the agent may use for training."""
    num_samples: int
    """Training samples the agent holds."""
    software_version: str
    """ChainFed version the agent runs."""
    model_fingerprint: str
    """Fingerprint of the base model files; must match the coordinator's."""
    max_window: int = 0
    """Largest DLCT window whose stage fits ``memory_budget_bytes`` at the width of the
    agent's own training rows (at most its ``--max-len``), under the coordinator's
    ``TrainingParams``; 0 = no budget declared. ``--window auto`` takes the smallest one
    declared."""
    labels: tuple[str, ...] = ()
    """Class names in head order (lm: label words); empty = none declared. Agents that
    declare them must agree (the coordinator refuses one that does not), and the
    coordinator's final file carries them."""

    def __post_init__(self) -> None:
        _non_negative(self, "memory_budget_bytes", "num_samples", "max_window")
        object.__setattr__(self, "labels", tuple(self.labels))
        _require(
            all(self.labels) and len(set(self.labels)) == len(self.labels),
            f"AgentCapabilities.labels must be distinct non-empty names, got {self.labels!r:.200}",
        )


@dataclass(frozen=True)
class Registration:
    """Body of Register."""

    agent_id: str
    """Requested id; empty asks the coordinator to assign one."""
    token: str = field(repr=False)
    """Auth token (kept out of repr so it never lands in a log line)."""
    capabilities: AgentCapabilities


@dataclass(frozen=True)
class RegisterAck:
    """Answer to Register."""

    agent_id: str
    """The id for every later call."""
    max_message_bytes: int
    """Hard per-message limit the coordinator enforces."""

    def __post_init__(self) -> None:
        _require(self.agent_id != "", "RegisterAck.agent_id must not be empty")
        _require(self.max_message_bytes > 0, "RegisterAck.max_message_bytes must be > 0")


@dataclass(frozen=True)
class TrainingParams:
    """Hyper-parameters of one task; field meanings as in ``ChainConfig``."""

    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    micro_batch: int = 16
    """Samples per forward/backward."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    local_steps: int = 25
    """Optimiser steps in the round (when ``local_epochs`` is 0)."""
    local_epochs: float = 0.0
    """When > 0: the round is this many passes over the agent's own training rows, so an
    agent's steps follow its shard size as in FedAvg; ``local_steps`` is then unused."""
    gpo: str = "proxy"
    """``proxy``, ``none``, ``exact:K`` or ``exact:all`` (as ``ChainConfig.gpo``)."""
    gpo_lambda: float = 0.1
    """Weight of the global loss."""
    proxy_rank: int = 8
    """Rank of each GPO residual proxy."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: float = 16.0
    """LoRA scale numerator."""
    lora_dropout: float = 0.0
    """Dropout on the adapter branch input."""
    backbone_dropout: float = 0.0
    """Dropout of the trained blocks (attention probabilities and half-block outputs)."""
    e2e_streamed: bool = False
    """A window of every layer recomputes each block in backward (``e2e-streamed``)
    instead of keeping its activations (plain e2e); chain windows always recompute."""
    lora_targets: str = "all"
    """``qv``, ``attention`` or ``all`` (``LORA_TARGETS``)."""
    lora_train_a: bool = True
    """False freezes A at its seeded init (FFA)."""
    lora_seed: int = 0
    """Base seed of the per-layer A initialisation."""
    seed: int = 0
    """Seed of the round's data order."""
    foat_samples: int = 64
    """Samples in the FOAT probe mini-batch."""
    local_dp_clip: float = 0.0
    """Local DP: clip the update's delta to this L2 norm C before upload; 0 = off."""
    local_dp_noise_multiplier: float = 0.0
    """Local DP: add N(0, (z·C)²) per trained coordinate; 0 = off (needs ``local_dp_clip``)."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field_name in ("micro_batch", "grad_accum", "local_steps", "lora_rank"):
            value = getattr(self, field_name)
            _require(value >= 1, f"{name}.{field_name} must be >= 1, got {value}")
        _non_negative(self, "lr", "weight_decay", "gpo_lambda", "proxy_rank", "local_epochs")
        _require(
            math.isfinite(self.local_epochs),
            f"{name}.local_epochs must be finite, got {self.local_epochs}",
        )
        _non_negative(self, "lora_seed", "seed", "foat_samples")
        _non_negative(self, "local_dp_clip", "local_dp_noise_multiplier")
        _require(
            self.local_dp_noise_multiplier == 0 or self.local_dp_clip > 0,
            f"{name}.local_dp_noise_multiplier needs local_dp_clip > 0",
        )
        _require(0.0 <= self.lora_dropout < 1.0, f"{name}.lora_dropout must be in [0, 1)")
        _require(0.0 <= self.backbone_dropout < 1.0, f"{name}.backbone_dropout must be in [0, 1)")
        try:
            parse_gpo(self.gpo, 1)  # the agent's own vocabulary (ChainConfig.gpo)
        except ValueError as err:
            raise ProtocolError(f"{name}.gpo: {err}") from None
        _require(
            self.lora_targets in LORA_TARGETS,
            f"{name}.lora_targets must be one of {', '.join(LORA_TARGETS)}; "
            f"got {self.lora_targets!r}",
        )


@dataclass(frozen=True)
class Task:
    """Answer to GetTask."""

    kind: TaskKind
    """What to do."""
    round_id: str = ""
    """Key for FetchTensors / SubmitUpdate / ReportProbe; empty for WAIT."""
    stage_layer: int | None = None
    """Active layer of the current stage; None before the chain starts."""
    window_layers: tuple[int, ...] = ()
    """Layers trained together, lowest first; empty in a TRAIN_ROUND: a head round
    (after the chain, the task head alone trains, on the final features)."""
    frozen_layers: tuple[int, ...] = ()
    """ADVANCE: layers whose adapters became final."""
    params: TrainingParams | None = None
    """Hyper-parameters (PROBE, TRAIN_ROUND, FIT_HEAD)."""
    deadline_unix_ms: int = 0
    """Answers after this are dropped; 0 = none."""
    tensors: tuple[TensorSpec, ...] = ()
    """Manifest of what FetchTensors(round_id) streams."""
    retry_after_ms: int = 0
    """WAIT: when to poll again."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "window_layers", tuple(self.window_layers))
        object.__setattr__(self, "frozen_layers", tuple(self.frozen_layers))
        object.__setattr__(self, "tensors", tuple(self.tensors))
        kind = self.kind.name
        if self.kind is not TaskKind.WAIT:
            _require(self.round_id != "", f"a {kind} task needs a round_id")
        if self.kind in (TaskKind.PROBE, TaskKind.TRAIN_ROUND, TaskKind.FIT_HEAD):
            _require(self.params is not None, f"a {kind} task needs params")
        if self.kind in (TaskKind.TRAIN_ROUND, TaskKind.EVALUATE, TaskKind.FIT_HEAD):
            _require(self.stage_layer is not None, f"a {kind} task needs a stage_layer")
        names = [spec.name for spec in self.tensors]
        _require(len(names) == len(set(names)), f"{kind} task manifest repeats a tensor name")
        _non_negative(self, "deadline_unix_ms", "retry_after_ms")


@dataclass(frozen=True)
class UpdateMetrics:
    """Measurements of one round on one agent, or the federated aggregate of a round."""

    train_samples: int
    """Training samples seen (the aggregation weight)."""
    val_samples: int
    """Validation samples behind the val_* values."""
    steps: int
    """Optimiser steps taken."""
    train_loss: float
    """Mean training loss over the round."""
    val_loss: float
    """Validation loss of the model the round started from: a training round reports
    the window aggregate it fetched, before any local step (so the federated figure of
    round k measures the aggregate of round k-1, the model the federation holds); an
    evaluation round reports the final model."""
    val_metric: float
    """Validation metric of the same model (accuracy for classification)."""
    peak_memory_bytes: int
    """Peak memory of the round."""
    seconds: float
    """Wall time of the round."""

    def __post_init__(self) -> None:
        _non_negative(self, "train_samples", "val_samples", "steps", "peak_memory_bytes")


@dataclass(frozen=True)
class UpdateHeader:
    """First part of a SubmitUpdate stream."""

    agent_id: str
    """Sender."""
    round_id: str
    """The TRAIN_ROUND task answered."""
    metrics: UpdateMetrics
    """The round's measurements."""
    tensors: tuple[TensorSpec, ...]
    """Manifest of the chunks that follow; names unique."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        _require(self.round_id != "", "UpdateHeader.round_id must not be empty")
        names = [spec.name for spec in self.tensors]
        _require(len(names) == len(set(names)), "UpdateHeader manifest repeats a tensor name")


@dataclass(frozen=True)
class ProbeReport:
    """FOAT statistics of one agent."""

    agent_id: str
    """Sender."""
    round_id: str
    """The PROBE task answered."""
    cka_scores: tuple[float, ...]
    """Linear CKA of block i's output vs the family's reference, i = 0..L-1."""
    num_samples: int
    """Samples behind the scores (the averaging weight)."""
    readout_losses: tuple[float, ...] = ()
    """The task loss with the model's own frozen output head reading block i's output,
    i = 0..L-1; empty when the task head is trained (classify)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "cka_scores", tuple(self.cka_scores))
        object.__setattr__(self, "readout_losses", tuple(self.readout_losses))
        _require(self.round_id != "", "ProbeReport.round_id must not be empty")
        _non_negative(self, "num_samples")


@dataclass(frozen=True)
class AgentStatus:
    """One registered agent as the coordinator sees it."""

    agent_id: str
    """Agent id."""
    capabilities: AgentCapabilities
    """What it registered with."""
    last_seen_unix_ms: int
    """Its last call."""
    rounds_completed: int
    """Rounds whose aggregate included its update."""
    inactive: bool = False
    """Not seen for the coordinator's agent timeout: neither sampled nor waited for until
    it calls again."""


HEAD_FIT_ROUND = "fit"
"""Prefix of the closed-form head round's id (``RoundRecord.head_fit``)."""


@dataclass(frozen=True)
class RoundRecord:
    """One finished round."""

    round_id: str
    """Round id."""
    stage_layer: int
    """Active layer of the round's stage."""
    window_layers: tuple[int, ...]
    """Window trained."""
    participants: tuple[str, ...]
    """Agents aggregated."""
    dropped: tuple[str, ...]
    """Agents dropped (late, rejected or silent)."""
    metrics: UpdateMetrics
    """Federated metrics of the round."""
    finished_unix_ms: int
    """When it was aggregated."""
    update_digests: tuple[str, ...] = ()
    """``update_digest`` of each aggregated update, aligned with ``participants``; empty
    for an evaluation round (and in states saved before digests were recorded)."""
    dp_epsilon: float | None = None
    """DP: ε spent by the chain up to and including this round; None without DP."""
    dp_round_epsilon: float | None = None
    """DP: ε of this round alone (no composition); None without DP."""

    def __post_init__(self) -> None:
        for name in ("window_layers", "participants", "dropped", "update_digests"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def head_fit(self) -> bool:
        """The closed-form head round (id ``fit<N>``): statistics were aggregated and
        nothing was validated, so its train and validation figures are 0 and say nothing."""
        return self.round_id.startswith(HEAD_FIT_ROUND)


@dataclass(frozen=True)
class StatusSnapshot:
    """Where the federation stands (answer to Status)."""

    phase: ChainPhase
    """Phase of the federation."""
    num_layers: int
    """Layers L of the model."""
    start_layer: int | None = None
    """First chain layer; None until chosen."""
    stage_layer: int | None = None
    """Active layer; None outside TRAINING."""
    window_layers: tuple[int, ...] = ()
    """Current window, lowest first."""
    final_layers: tuple[int, ...] = ()
    """Layers whose adapters are final."""
    round_id: str = ""
    """Round in progress; empty when none."""
    stage_rounds: int = 0
    """Rounds finished in the current stage."""
    total_rounds: int = 0
    """Rounds finished over the chain."""
    agents: tuple[AgentStatus, ...] = ()
    """Registered agents."""
    history: tuple[RoundRecord, ...] = ()
    """Finished rounds, oldest first."""
    dp_epsilon: float | None = None
    """DP: ε spent so far at ``dp_delta``; None without DP."""
    dp_delta: float = 0.0
    """DP: the δ of ``dp_epsilon``; 0 without DP."""
    dp_epsilon_budget: float | None = None
    """DP: the ε budget; None when there is none."""
    stop_reason: str = ""
    """Why the chain stopped before training every layer; empty when it did not."""
    history_omitted: int = 0
    """Finished rounds left out of ``history`` (older than all it holds): not asked for,
    or over the reply's message limit."""
    params: TrainingParams | None = None
    """The training settings every task carries (fixed for the run); None from a
    coordinator that does not say."""

    def __post_init__(self) -> None:
        for name in ("window_layers", "final_layers", "agents", "history"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _non_negative(self, "num_layers", "stage_rounds", "total_rounds", "history_omitted")
