"""``CoordinatorConfig``: everything a federation is run with, validated once.

Built from the command line's options and a ``ModelSpec`` (``coordinator.command``), or
directly by the in-process simulation; saved with the state so a resumed coordinator can
refuse a state dir of another model or task.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from chainfed.coordinator.aggregation import STRATEGIES
from chainfed.coordinator.dp import DPConfig
from chainfed.proto.chain_rules import (
    DEFAULT_FOAT_THRESHOLD,
    DEFAULT_PATIENCE,
    DEFAULT_TOLERANCE,
    READOUT_LOSS_FACTOR,
    check_foat_rule,
    check_stage_rule,
)
from chainfed.proto.closed_form_head import CLOSED_FORM_HEAD_MODES
from chainfed.proto.messages import TrainingParams

AGGREGATIONS = tuple(STRATEGIES)


DEFAULT_WINDOW = 2
"""DLCT window of ``--window auto`` when no agent declared a memory budget."""


@dataclass(frozen=True)
class CoordinatorConfig:
    """Chain knobs of one federation (the ``chainfed coordinator`` flags)."""

    num_layers: int
    """Layers L of the model."""
    model_fingerprint: str
    """Digest of the model files; agents must match it."""
    task: str
    """``classify`` or ``lm``; a state dir of another task is refused."""
    params: TrainingParams
    """Hyper-parameters sent with every task."""
    start_layer: int | None = None
    """First chain layer; None = FOAT (probe the agents)."""
    window: int | None = 2
    """DLCT window Q; None = auto: chosen when training starts, the smallest
    ``AgentCapabilities.max_window`` the registered agents declared (each sized it for its
    own budget and sequence length); ``DEFAULT_WINDOW`` when none declared one."""
    foat_threshold: float = DEFAULT_FOAT_THRESHOLD
    """FOAT CKA threshold."""
    foat_readout_factor: float = READOUT_LOSS_FACTOR
    """lm task: FOAT starts no lower than the first layer the model's own output head
    reads within this factor of the last layer's loss (``first_readable_layer``)."""
    min_rounds: int = 1
    """Rounds every stage runs at least."""
    max_rounds: int = 3
    """Round cap per stage."""
    patience: int = DEFAULT_PATIENCE
    """Rounds without relative improvement before a stage converges."""
    round_budget: int | None = None
    """Training rounds of the whole run, head rounds included (``--rounds``); None = no
    budget: every stage runs by ``min_rounds``/``max_rounds`` alone. With a budget a
    stage may spend at most an equal share of what is left (``stage_round_cap``), so
    rounds a converged stage did not need flow to the stages after it and to the head
    (``head_takes_what_is_left``)."""
    head_rounds: int = 0
    """Head-only rounds after the chain's last stage (``--head-rounds``): agents train the
    task head alone on their final features and upload it; 0 = none. With a
    ``round_budget`` this is the head's minimum, and it takes what the chain left unless
    the head is fitted in closed form (``head_takes_what_is_left``)."""
    closed_form_head: str = "off"
    """Fit the task head in closed form (``--closed-form-head``,
    ``CLOSED_FORM_HEAD_MODES``): ``end`` after the chain's last stage, ``both`` also
    before its first. A FIT_HEAD round in which every agent uploads the head statistics
    of its training rows' final features (``chainfed.proto.closed_form_head``; the final
    adapters' after the chain, the base model's before it), and the coordinator solves the
    head of all their rows from the statistics' weighted mean. The fit after the chain
    replaces the head the rounds trained, which label skew pulls toward each agent's
    classes and which meets the final features only in the last stage; the fit before it
    lets the first stages train through a head fitted to the whole federation rather than
    a random one. Classification only; needs an aggregation that takes the weighted mean
    (fedavg, ffa) and no DP (the statistics are not a clipped delta)."""
    head_local_steps: int | None = None
    """Optimiser steps of an agent's head round (``--head-local-steps``); None = the
    chain's own local schedule (``params``). A head step costs a linear layer's update on
    cached states, so head rounds can afford many more steps than a chain round."""
    tolerance: float = DEFAULT_TOLERANCE
    """Relative improvement of the federated validation loss that counts."""
    min_agents: int = 1
    """Quorum: registered agents before starting, updates before aggregating."""
    agents_per_round: int = 0
    """Agents sampled per round; 0 = every registered agent."""
    evaluation_agents: int = 0
    """Agents asked to evaluate the final adapters; 0 = every active agent. Each fetches
    the whole final adapters, so with thousands of agents a seeded sample measures the
    federated validation metric for a fraction of the transfer."""
    round_deadline_s: float = 600.0
    """Seconds a round waits for its agents before dropping stragglers."""
    agent_timeout_s: float | None = None
    """An agent not seen (no call) for this many seconds is inactive: it is neither
    sampled into rounds nor waited for, and becomes active again with its next call.
    None = twice ``round_deadline_s``: an agent is silent while it trains, and a round
    it trains in lasts at most the deadline, so only an agent that missed a whole round
    and its next long-poll is pruned (``agent_timeout``)."""
    aggregation: str = "fedavg"
    """``fedavg``, ``ffa``, ``svd``, ``trimmed-mean`` or ``median``."""
    trim_fraction: float = 0.2
    """``trimmed-mean``: fraction of the updates dropped at each end of every coordinate."""
    norm_bound: float | None = None
    """Reject updates whose change from the round's start (all tensors together, L2)
    exceeds this. The change, not the tensors: adapters and head legitimately grow over
    a chain, and a seeded A is large from the start, so only the delta says how far one
    agent tries to move the aggregate."""
    clip_norm: float | None = None
    """Scale each update's delta from the round's start down to this L2 norm (all its
    tensors together) before aggregating; None = no clipping."""
    dp_noise_multiplier: float | None = None
    """Client-level DP (``chainfed.coordinator.dp``): noise multiplier z; None = DP off."""
    dp_clip: float | None = None
    """DP: L2 bound C of each update's delta (required with ``dp_noise_multiplier``)."""
    dp_delta: float = 1e-5
    """DP: δ that ε is reported at."""
    dp_mode: str = "central"
    """DP: ``central`` (the coordinator noises the sum) or ``local`` (each agent its own)."""
    dp_epsilon_budget: float | None = None
    """DP: stop the chain before a round would take ε above this; None = no limit."""
    seed: int = 0
    """Seeds the per-round agent sampling."""
    first_stage_layer: int | None = None
    """Stage the chain opens at; None = the start layer. A plain FedLoRA baseline is one
    stage at L-1 whose window reaches down to the start layer (``e2e``: start 0, window
    L; ``topk:K``: start L-K, window K), through the same rounds and aggregation."""
    lora_in_features: dict[str, int] = field(default_factory=dict)
    """In features of each linear of a block by module name (every block of a model
    alike): the width of a frozen A, which the coordinator rebuilds from the seed for the
    final adapters since agents never send it (``params.lora_train_a`` False)."""

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {self.aggregation!r}"
            )
        if self.start_layer is not None and not 0 <= self.start_layer < self.num_layers:
            raise ValueError(f"start layer {self.start_layer} not in 0..{self.num_layers - 1}")
        if self.first_stage_layer is not None and not 0 <= self.first_stage_layer < self.num_layers:
            raise ValueError(f"first stage layer {self.first_stage_layer} is not a layer")
        if (self.window is not None and self.window < 1) or self.min_agents < 1:
            raise ValueError("window and min_agents must be >= 1")
        if self.agents_per_round < 0 or self.evaluation_agents < 0:
            raise ValueError("agents per round and evaluation agents must be >= 0 (0 = all)")
        if self.agent_timeout_s is not None and not (
            math.isfinite(self.agent_timeout_s) and self.agent_timeout_s > 0
        ):
            raise ValueError(f"agent timeout must be > 0 seconds, got {self.agent_timeout_s}")
        check_stage_rule(self.min_rounds, self.max_rounds, self.patience, self.tolerance)
        check_foat_rule(self.foat_threshold, self.foat_readout_factor)
        if self.head_rounds < 0:
            raise ValueError(f"head rounds must be >= 0, got {self.head_rounds}")
        if self.head_local_steps is not None and self.head_local_steps < 1:
            raise ValueError(f"head local steps must be >= 1, got {self.head_local_steps}")
        if self.round_budget is not None:
            self._check_budget(self.round_budget)
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.clip_norm is not None and not (
            math.isfinite(self.clip_norm) and self.clip_norm > 0
        ):
            raise ValueError(f"clip norm must be > 0, got {self.clip_norm}")
        if (self.dp_noise_multiplier is None) != (self.dp_clip is None):
            raise ValueError("differential privacy needs both a noise multiplier and a clip")
        if self.dp_epsilon_budget is not None and self.dp_noise_multiplier is None:
            raise ValueError("an epsilon budget needs differential privacy (a noise multiplier)")
        if not self.params.lora_train_a and self.aggregation != "ffa":
            raise ValueError(
                f"A frozen (lora_train_a False) is ffa's: agents then send B alone, which "
                f"{self.aggregation!r} cannot aggregate"
            )
        if not self.params.lora_train_a and not self.lora_in_features:
            raise ValueError("A frozen (ffa) needs lora_in_features to rebuild it from the seed")
        if (
            self.dp is not None
            and self.dp.mode == "central"
            and self.aggregation not in ("fedavg", "ffa")
        ):
            raise ValueError(
                f"central DP needs an aggregation linear in the updates (fedavg or ffa), "
                f"not {self.aggregation!r}"
            )
        if self.closed_form_head not in CLOSED_FORM_HEAD_MODES:
            raise ValueError(
                f"closed_form_head must be one of {', '.join(CLOSED_FORM_HEAD_MODES)}, "
                f"got {self.closed_form_head!r}"
            )
        if self.closed_form_head != "off":
            self._check_closed_form_head()

    def _check_closed_form_head(self) -> None:
        if self.task != "classify":
            raise ValueError(f"a closed-form head needs the classify task, not {self.task!r}")
        if self.aggregation not in ("fedavg", "ffa"):
            raise ValueError(
                "a closed-form head solves from the weighted mean of the agents' statistics "
                f"(fedavg or ffa), which {self.aggregation!r} does not take"
            )
        if self.dp is not None:
            raise ValueError(
                "a closed-form head is not available with differential privacy: its "
                "statistics are not a delta that DP could clip and noise"
            )

    def _check_budget(self, budget: int) -> None:
        """A budget must cover each stage's minimum and the head rounds, where the stages
        are known (a start layer given; under FOAT ``ChainCoordinator`` checks at start)."""
        if budget < 1:
            raise ValueError(f"round budget must be >= 1, got {budget}")
        first = self.first_stage_layer if self.first_stage_layer is not None else self.start_layer
        if first is None:
            return
        need = self.budget_floor(first)
        if budget < need:
            raise ValueError(
                f"a budget of {budget} rounds cannot give {self.num_layers - first} stages "
                f"{self.min_rounds} round(s) each plus {self.head_rounds} head round(s) "
                f"({need} needed)"
            )

    @property
    def head_takes_what_is_left(self) -> bool:
        """Whether the rounds of the budget the chain's stages left go to head rounds. Not
        with a closed-form head: its fit is the head of all the agents' rows at once, and
        head rounds after it only move each agent's copy toward its own shard; the rounds
        stay unspent (``head_rounds`` still run when asked for)."""
        return self.round_budget is not None and self.closed_form_head == "off"

    def budget_floor(self, first_stage: int) -> int:
        """Rounds a chain whose first stage is ``first_stage`` needs at least: every
        stage's ``min_rounds`` and the head rounds."""
        return (self.num_layers - first_stage) * self.min_rounds + self.head_rounds

    @property
    def dp(self) -> DPConfig | None:
        """The DP settings (validated), None when DP is off."""
        if self.dp_noise_multiplier is None:
            return None
        return DPConfig(
            self.dp_noise_multiplier,
            self.dp_clip,
            self.dp_delta,
            self.dp_mode,
            self.dp_epsilon_budget,
        )

    @property
    def agent_timeout(self) -> float:
        """Seconds of silence after which an agent is inactive (``agent_timeout_s``)."""
        if self.agent_timeout_s is None:
            return 2 * self.round_deadline_s
        return self.agent_timeout_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
