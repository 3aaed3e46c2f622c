"""The federated chain's state machine: who does what, when a round closes, when the chain moves.

Pure coordination logic — no gRPC, no threads. The servicer calls it under one lock and
persists it after every change (``chainfed.coordinator.state_store``)::

    WAITING_FOR_AGENTS ──(min agents registered)──> PROBING ──(scores averaged)──┐
            │ (--start-layer N)                                                  ▼
            └───────────────────────────────────────────────────────────────> TRAINING
    TRAINING, per stage layer l = s .. L-1:
        round: sample agents -> TRAIN_ROUND tasks -> updates -> (all in | deadline)
               -> quorum? aggregate window state : retry the round
        converged (StageConvergence on the federated validation loss)?
               -> adapters leaving the window become final, l += 1
    l = L-1 converged -> every window adapter final
        -> head_rounds > 0 (or budget left, no closed-form head): HEAD STAGE, rounds
           whose window is empty: agents train the task head alone on their final
           features, upload it, it is aggregated
    -> EVALUATING (one round, metrics only: every active agent, or a sample of
       ``evaluation_agents``) -> DONE

Guarantees:

* An update is counted at most once: a second submission by the same agent for the
  same round is acknowledged and ignored (idempotent).
* A round is aggregated at most once: it is closed, recorded and given a new id in one
  step, so an update for a closed round is stale and rejected.
* Stragglers are dropped at the deadline (and logged); a round short of the quorum is
  re-run with a fresh id from the same starting state, never aggregated.
* An agent silent for ``config.agent_timeout`` seconds is inactive: rounds neither
  sample it nor wait for it (a round it was in closes as soon as every active
  participant answered), and any call makes it active again. Silence counts from its
  last call or from when this process came up (``online_since_ms``), whichever is
  later: no agent can call a coordinator that is down, so a restart prunes nobody. An
  agent holding a long-poll right now (``polling``, kept by the service) is not silent.

Head stage. One task head serves every stage and meets the model's final features only
in the last one; head-only rounds fit it to them at a linear model's cost (each agent
brings its prefix cache to the top once, then takes head-only steps: no backward through
any block). A head round is a TRAIN_ROUND task at layer L-1 with an empty window; its
update is the head alone (``objective.*``), checked and aggregated like any other. The
stage is persisted (``head_stage`` and its round count), so a restarted coordinator
re-runs only the head round that was in flight.

Closed-form head (``config.closed_form_head``, ``chainfed.proto.closed_form_head``). A
FIT_HEAD round (id ``fit<N>``) right after the last stage, on the final features (before
any head rounds), and with ``both`` another before the first training round, on the base
model's: agents upload the statistics of ``chainfed.proto.closed_form_head``, the
coordinator solves the head of all their rows from the weighted mean. Neither is a
training round of the budget; the first fit is found done in the history, the last is
persisted as ``head_refit`` while it is due.

Rounds where they pay. Without a budget each stage runs between ``min_rounds`` and
``max_rounds`` and ends at the plateau (``StageConvergence``). With ``round_budget`` R
(head rounds included) the cap of a stage entered with B rounds left and S stages to go
is ``stage_round_cap``: an equal share of what is left after the head's reserve,
``(B - head_rounds) // S``, within the ``min_rounds``/``max_rounds`` guards; the last
stage's share is all of it, and the head stage runs from ``head_rounds`` up to every
round still left (with a closed-form head, ``head_rounds`` alone: see
``CoordinatorConfig.head_takes_what_is_left``). Why a share and not "until converged":
the federated validation loss of an early stage often keeps improving by more than the
tolerance, and a stage that could take all that is left would starve the layers above it
and the head, which read the final features and pay most; a stage that plateaus early
hands its unspent share on. The plateau rule is what can actually fire: relative
improvement below ``tolerance`` for ``patience`` rounds, once ``min_rounds`` have run.

Convergence sees each aggregate one round late. Agents validate the aggregate they
fetched, before their local steps (``UpdateMetrics.val_loss``): a locally trained window
on a label-skewed shard scores far above the model the federation holds. So round 1 of a
stage measures where the stage starts (the previous stage's result plus the new layer's
fresh adapter, head after the new window) and round k the aggregate of round k-1. The
stage ends at the round whose report shows the plateau, or at the cap; that round's own
aggregate, one round of training past the last figure, is what the stage hands on, and
the next stage's round 1 (after the last stage: the evaluation round) measures it.

FFA (``params.lora_train_a`` False): every A stays at its seeded init for the whole run,
so no A travels. Updates carry B (with head and proxies) only — an A is rejected like any
unexpected tensor — and no task, round fetch or final fetch sends one: agents rebuild A
from the shared seed. ``final`` and ``window_state`` hold B only (a state saved before
this may still hold the seeded A: kept, never sent); ``final_adapters()`` rebuilds A
(``lora_in_features`` gives its width) for the final adapter file. ``norm_bound``
measures an update's change from the round's start, in which a frozen A has no part.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from chainfed.coordinator.aggregation import WeightedUpdate, aggregate, validate_updates
from chainfed.coordinator.config import DEFAULT_WINDOW, CoordinatorConfig
from chainfed.coordinator.dp import PrivacyLedger, central_dp_mean
from chainfed.coordinator.fault_injection import crash_point
from chainfed.coordinator.round_start import round_start_state
from chainfed.coordinator.secure_aggregation import check_secure_aggregation
from chainfed.coordinator.update_checks import (
    UpdateRejectedError,
    check_evaluation_answer,
    check_finite,
    check_head_statistics,
    check_names,
    check_norm,
    check_shapes,
    check_training_metrics,
    expected_tensors,
)
from chainfed.proto.chain_rules import StageConvergence, choose_start_layer, window_layers
from chainfed.proto.closed_form_head import solve_head
from chainfed.proto.dp_mechanism import clip_update, noise_generator
from chainfed.proto.messages import (
    HEAD_FIT_ROUND,
    AgentCapabilities,
    AgentStatus,
    ChainPhase,
    ProbeReport,
    RoundRecord,
    StatusSnapshot,
    Task,
    TaskKind,
    TrainingParams,
    UpdateMetrics,
)
from chainfed.proto.seeded_init import with_seeded_lora_a
from chainfed.proto.tensor_chunks import manifest_of
from chainfed.proto.tensor_names import layers_of, without_lora_a
from chainfed.proto.update_digest import update_digest

log = logging.getLogger("chainfed.coordinator")


class ChainObserver(Protocol):
    """What the state machine tells as it goes (the service's metrics listen)."""

    def round_opened(self) -> None:
        """A training or evaluation round opened."""

    def round_closed(self, outcome: str, aggregation_seconds: float) -> None:
        """A round closed: ``aggregated`` (with the seconds its aggregation took),
        ``rerun`` (short of the quorum, opened again under a new id) or ``evaluated``."""


class _Unobserved:
    """The default ``ChainObserver``: nobody listens."""

    def round_opened(self) -> None:
        return None

    def round_closed(self, outcome: str, aggregation_seconds: float) -> None:
        return None


@dataclass
class AgentEntry:
    capabilities: AgentCapabilities
    last_seen_ms: int
    rounds_completed: int = 0


@dataclass
class OpenRound:
    """The round in progress."""

    round_id: str
    stage_layer: int
    window: list[int]
    participants: list[str]
    deadline_ms: int
    evaluation: bool = False
    """True for the final evaluation round: metrics only, nothing aggregated."""
    head_fit: bool = False
    """True for the closed-form head round (``config.closed_form_head``): agents upload
    head statistics, the coordinator solves the head from their weighted mean."""
    sampling_rate: float = 1.0
    """Participants / registered agents when the round opened (DP accounting's q)."""
    expected: dict[str, tuple] = field(default_factory=dict)
    """(shape, dtype) per tensor every update must carry; empty: set by the first."""
    updates: dict[str, tuple[UpdateMetrics, dict[str, torch.Tensor]]] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    """``update_digest`` of each update, recorded with the round when it is aggregated."""
    secure_mean: dict[str, torch.Tensor] | None = None
    """The survivors' weighted mean from a secure sum (``submit_secure_mean``); None when
    the round collects individual updates."""

    def received(self) -> list[str]:
        """The agents whose update arrived, sorted."""
        return sorted(self.updates)

    def record(
        self,
        metrics: UpdateMetrics,
        now_ms: int,
        *,
        window: tuple[int, ...] | None = None,
        digests: bool = True,
        dp_epsilon: float | None = None,
        dp_round_epsilon: float | None = None,
    ) -> RoundRecord:
        """The history's entry of this round, closed at ``now_ms``: the agents received and
        dropped, the window trained (``window`` overrides it: a head fit trains none), the
        uploads' digests unless ``digests`` is False or a secure mean hid them."""
        received = self.received()
        return RoundRecord(
            self.round_id,
            self.stage_layer,
            tuple(self.window) if window is None else window,
            tuple(received),
            tuple(sorted(set(self.participants) - set(received))),
            metrics,
            now_ms,
            tuple(self.digests[a] for a in received)
            if digests and self.secure_mean is None
            else (),
            dp_epsilon,
            dp_round_epsilon,
        )


class ChainCoordinator:
    """State of one federated chain; every method is called under the servicer's lock."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        dp_generator: torch.Generator | None = None,
    ) -> None:
        self.config = config
        self.window = config.window
        self.phase = ChainPhase.WAITING_FOR_AGENTS
        self.agents: dict[str, AgentEntry] = {}
        self.labels: tuple[str, ...] = ()
        """The federation's class names in head order: the first that a registered agent
        declared (``AgentCapabilities.labels``), which every later declaration must equal;
        empty while none has. Derived from ``agents``, kept here so a registration does
        not scan them."""
        self.start_layer: int | None = config.start_layer
        self.stage_layer: int | None = None
        self.final: dict[str, torch.Tensor] = {}
        """Adapters of layers that left the window."""
        self.window_state: dict[str, torch.Tensor] = {}
        """Aggregate of the window adapters + head + proxies; empty before round 1 of the
        chain (agents then start from the shared seeded initialisation)."""
        self.history: list[RoundRecord] = []
        self.round_seq = 0
        self.open_round: OpenRound | None = None
        self.probe_id = ""
        self.probe_reports: dict[str, ProbeReport] = {}
        self.probe_deadline_ms = 0
        """After this, the probe finishes with the reports it has (a silent agent cannot
        hold the chain in PROBING forever)."""
        self.foat_scores: list[float] | None = None
        self.readout_losses: list[float] | None = None
        """FOAT's sample-weighted readout losses, over the agents that sent them (None: no
        probe yet, or a task whose head is trained)."""
        self.head_stage = False
        """True after the chain's last stage while head-only rounds run."""
        self.head_refit = False
        """True after the chain's last stage while its closed-form refit on the final
        features is due (``config.closed_form_head``); the head rounds, if any, follow."""
        self.convergence = self._new_convergence()
        self.dp_ledger = PrivacyLedger(config.dp.delta) if config.dp is not None else None
        """Rounds charged to the privacy budget (None without DP)."""
        self.dp_generator = dp_generator or noise_generator()
        """Source of the central-DP noise (OS randomness unless a test fixes it)."""
        self.stop_reason = ""
        """Why the chain stopped early (the ε budget); empty otherwise."""
        self.params = config.params
        """What every task carries: ``config.params`` plus the local-DP fields."""
        if config.dp is not None and config.dp.mode == "local":
            self.params = replace(
                config.params,
                local_dp_clip=config.dp.clip,
                local_dp_noise_multiplier=config.dp.noise_multiplier,
            )
        self.changed = True
        """Set when something worth persisting happened; a save clears it."""
        self.unsaved_agents: set[str] = set()
        """Agents registered or refreshed since the last save: all that changed when
        ``changed`` is False (persisted by appending to the registration journal)."""
        self.observer: ChainObserver = _Unobserved()
        """Told of rounds opening and closing (the service sets its metrics here)."""
        self.online_since_ms = 0
        """When this process began serving (unix ms): agent silence counts from here at
        the earliest."""
        self._inactive: set[str] = set()
        """Agents found inactive at the last look (to log each change once)."""
        self._looked_ms: int | None = None
        """When ``_note_activity`` last looked: at most once a second, since every call
        ticks and a look visits every agent (a thousand agents, a thousand calls a second)."""
        self.polling: Counter[str] = Counter()
        """Long-polls (GetTask calls) each agent holds open now; the service counts them."""

    # -- helpers ----------------------------------------------------------------------

    def _new_convergence(self) -> StageConvergence:
        """The rule of the stage at ``stage_layer`` (or of the head stage), its cap drawn
        from the round budget when there is one (see the module docstring)."""
        c = self.config
        if self.head_stage:
            rounds = c.head_rounds
            if c.head_takes_what_is_left:
                rounds = max(rounds, c.round_budget - self.trained_rounds())
            return StageConvergence(c.head_rounds, rounds, c.patience, c.tolerance)
        cap = c.max_rounds
        if c.round_budget is not None and self.stage_layer is not None:
            cap = stage_round_cap(
                c.round_budget - self.trained_rounds(),
                c.num_layers - self.stage_layer,
                head_rounds=c.head_rounds,
                min_rounds=c.min_rounds,
                max_rounds=c.max_rounds,
            )
        return StageConvergence(c.min_rounds, cap, c.patience, c.tolerance)

    def trained_rounds(self) -> int:
        """Training rounds aggregated so far (head rounds included, evaluation not)."""
        return sum(1 for r in self.history if not (r.head_fit or r.round_id.startswith("eval")))

    @property
    def head_fit_pending(self) -> bool:
        """A closed-form head round is due: after the chain's last stage (``head_refit``),
        or with ``both`` before its first training round (no round closed yet: once the
        fit is in the history, a restarted coordinator goes on from the head it solved)."""
        if self.config.closed_form_head == "off" or self.phase is not ChainPhase.TRAINING:
            return False
        return self.head_refit or (self.config.closed_form_head == "both" and not self.history)

    def round_window(self) -> list[int]:
        """Layers the current stage trains: none in the head stage."""
        if self.head_stage or self.stage_layer is None:
            return []
        return self.window_for(self.stage_layer)

    @property
    def a_frozen(self) -> bool:
        """FFA: every A stays at its seeded init, so none is sent either way."""
        return not self.config.params.lora_train_a

    def _sendable(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` less every A when A is frozen (a state saved before may hold it)."""
        return without_lora_a(tensors) if self.a_frozen else dict(tensors)

    def _with_frozen_a(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` with the seeded A of each lone B when A is frozen, each before its B."""
        if not self.a_frozen:
            return dict(tensors)
        widths = self.config.lora_in_features
        return with_seeded_lora_a(
            tensors, self.config.params.lora_seed, lambda _layer, module: widths[module]
        )

    def final_adapters(self) -> dict[str, torch.Tensor]:
        """The federation's result, A included: under FFA rebuilt from the shared seed
        (``initial_lora_a``), exactly the A every agent trained with."""
        return self._with_frozen_a(self.final)

    def global_model(self) -> dict[str, torch.Tensor]:
        """The federation's model as it stands after the last aggregated round: final
        adapters and the window's aggregate, A included, and the task head as ``head.*``
        (GPO proxies are training aids, not part of the model)."""
        model = dict(self.final)
        for name, tensor in self.window_state.items():
            if name.startswith("layers."):
                model[name] = tensor
            elif name.startswith("objective."):
                model[name.removeprefix("objective.")] = tensor
        return self._with_frozen_a(model)

    def window_for(self, layer: int) -> list[int]:
        """DLCT window of the stage whose newest layer is ``layer``."""
        return window_layers(self.start_layer, layer, self.window)

    def _next_round_id(self, prefix: str = "r") -> str:
        self.round_seq += 1
        return f"{prefix}{self.round_seq}"

    # -- agents ---------------------------------------------------------------------

    def is_active(self, agent_id: str, now_ms: int) -> bool:
        """Heard from within ``config.agent_timeout``, or waiting in a call now."""
        if self.polling[agent_id] > 0:
            return True
        seen = max(self.agents[agent_id].last_seen_ms, self.online_since_ms)
        return now_ms - seen <= self.config.agent_timeout * 1000

    def active_agents(self, now_ms: int) -> list[str]:
        """Ids of the active agents, sorted."""
        return [a for a in sorted(self.agents) if self.is_active(a, now_ms)]

    def _note_activity(self, now_ms: int) -> None:
        """Log every agent that went inactive or came back since the last look."""
        inactive = {a for a in self.agents if not self.is_active(a, now_ms)}
        for agent in sorted(inactive - self._inactive):
            log.warning(
                "agent %s not seen for %g s: inactive (not sampled or waited for) until it "
                "calls again",
                agent,
                self.config.agent_timeout,
            )
        for agent in sorted(self._inactive - inactive):
            log.info("agent %s is back", agent)
        self._inactive = inactive

    def register(self, agent_id: str, capabilities: AgentCapabilities, now_ms: int) -> str:
        """Add or refresh an agent; a model fingerprint mismatch, or class names other than
        the federation's, are refused."""
        if capabilities.model_fingerprint != self.config.model_fingerprint:
            raise UpdateRejectedError(
                "failed_precondition",
                f"agent {agent_id or '(new)'} loaded a different model (fingerprint "
                f"{capabilities.model_fingerprint[:12]}…, coordinator "
                f"{self.config.model_fingerprint[:12]}…)",
                reason="wrong_model",
            )
        if capabilities.labels and self.labels and capabilities.labels != self.labels:
            raise UpdateRejectedError(
                "failed_precondition",
                f"agent {agent_id or '(new)'} numbers other classes "
                f"({', '.join(capabilities.labels)}) than the federation "
                f"({', '.join(self.labels)}); give every agent the same --labels, in the "
                "same order",
                reason="wrong_labels",
            )
        if not agent_id:
            agent_id = f"agent-{len(self.agents) + 1}"
            while agent_id in self.agents:
                agent_id += "x"
        if self.window is not None and 0 < capabilities.max_window < self.window:
            log.warning(
                "agent %s fits a window of %d only; the chain runs with %d",
                agent_id,
                capabilities.max_window,
                self.window,
            )
        self.labels = self.labels or capabilities.labels
        entry = self.agents.get(agent_id)
        if entry is None:
            self.agents[agent_id] = AgentEntry(capabilities, now_ms)
            log.info("agent %s registered (%s samples)", agent_id, capabilities.num_samples)
        else:
            entry.capabilities, entry.last_seen_ms = capabilities, now_ms
        self.unsaved_agents.add(agent_id)
        return agent_id

    def touch(self, agent_id: str, now_ms: int) -> None:
        if agent_id not in self.agents:
            raise UpdateRejectedError(
                "not_found", f"agent {agent_id!r} is not registered", reason="unknown_agent"
            )
        self.agents[agent_id].last_seen_ms = now_ms

    # -- progress ---------------------------------------------------------------------

    def tick(self, now_ms: int) -> None:
        """Advance whatever time or registrations allow: start, open, close rounds."""
        if self._looked_ms is None or not 0 <= now_ms - self._looked_ms < 1000:
            self._note_activity(now_ms)
            self._looked_ms = now_ms
        if (
            self.phase is ChainPhase.WAITING_FOR_AGENTS
            and len(self.agents) >= self.config.min_agents
        ):
            if self.start_layer is None:
                self.phase = ChainPhase.PROBING
                self.probe_id = self._next_round_id("probe")
                self.probe_reports = {}
                self.probe_deadline_ms = now_ms + int(self.config.round_deadline_s * 1000)
                log.info("probing %d agents for the FOAT start layer", len(self.agents))
            else:
                self._start_training()
            self.changed = True
        if self.phase is ChainPhase.PROBING:
            expected = set(self.active_agents(now_ms))
            late = now_ms >= self.probe_deadline_ms
            if self.probe_reports and (expected <= set(self.probe_reports) or late):
                if late and not expected <= set(self.probe_reports):
                    log.warning(
                        "probe deadline: going on without %s",
                        sorted(expected - set(self.probe_reports)),
                    )
                self._finish_probe()
        if self.phase in (ChainPhase.TRAINING, ChainPhase.EVALUATING):
            if self.open_round is None:
                self._open_round(now_ms)
            elif self._round_complete(now_ms) or now_ms >= self.open_round.deadline_ms:
                self._close_round(now_ms)

    def _start_training(self) -> None:
        if self.window is None:
            declared = {
                a: e.capabilities.max_window
                for a, e in self.agents.items()
                if e.capabilities.max_window > 0
            }
            self.window = min(declared.values(), default=DEFAULT_WINDOW)
            log.info("window auto: Q = %d (agents' largest windows: %s)", self.window, declared)
        self.phase = ChainPhase.TRAINING
        first = self.config.first_stage_layer
        self.stage_layer = self.start_layer if first is None else max(first, self.start_layer)
        budget = self.config.round_budget
        if budget is not None and budget < self.config.budget_floor(self.stage_layer):
            log.warning(
                "a budget of %d rounds is short of the %d that %d stages and %d head rounds "
                "need at least: every stage still runs its minimum",
                budget,
                self.config.budget_floor(self.stage_layer),
                self.config.num_layers - self.stage_layer,
                self.config.head_rounds,
            )
        self.convergence = self._new_convergence()
        log.info("chain starts at layer %d (window %d)", self.start_layer, self.window)

    def _finish_probe(self) -> None:
        reports = list(self.probe_reports.values())
        self.foat_scores = _sample_weighted_mean([r.cka_scores for r in reports], reports)
        readers = [r for r in reports if r.readout_losses]
        self.readout_losses = (
            _sample_weighted_mean([r.readout_losses for r in readers], readers) if readers else None
        )
        self.start_layer = choose_start_layer(
            self.foat_scores,
            self.config.foat_threshold,
            self.readout_losses,
            self.config.foat_readout_factor,
        )
        log.info(
            "FOAT scores %s, readout losses %s -> start layer %d",
            [round(s, 3) for s in self.foat_scores],
            None if self.readout_losses is None else [round(x, 2) for x in self.readout_losses],
            self.start_layer,
        )
        self._start_training()
        self.changed = True

    def _open_round(self, now_ms: int) -> None:
        agents = self.active_agents(now_ms)
        if not agents:
            return  # every agent is silent: the round opens when one calls again
        k = self.config.agents_per_round or len(agents)
        rng = random.Random(self.config.seed * 1_000_003 + self.round_seq)
        participants = sorted(rng.sample(agents, min(k, len(agents))))
        evaluation = self.phase is ChainPhase.EVALUATING
        sampling_rate = len(participants) / len(agents)
        if not evaluation and self._over_budget(sampling_rate):
            self._open_round(now_ms)  # the evaluation round of what was trained
            return
        if not evaluation and self.head_fit_pending:
            self.open_round = OpenRound(
                round_id=self._next_round_id(HEAD_FIT_ROUND),
                stage_layer=self.stage_layer,
                window=[],
                participants=participants,
                deadline_ms=now_ms + int(self.config.round_deadline_s * 1000),
                sampling_rate=sampling_rate,
                head_fit=True,
            )
            self.observer.round_opened()
            self.changed = True
            return
        layer = self.config.num_layers - 1 if evaluation else self.stage_layer
        window = self.window_for(layer) if evaluation else self.round_window()
        if evaluation:
            k = self.config.evaluation_agents or len(agents)
            participants = sorted(rng.sample(agents, min(k, len(agents))))
        self.open_round = OpenRound(
            round_id=self._next_round_id("eval" if evaluation else "r"),
            stage_layer=layer,
            window=window,
            participants=participants,
            deadline_ms=now_ms + int(self.config.round_deadline_s * 1000),
            evaluation=evaluation,
            sampling_rate=sampling_rate,
            expected={} if evaluation else self._expected_tensors(layer, window),
        )
        self.observer.round_opened()
        self.changed = True

    def _dp_round(self, sampling_rate: float) -> tuple[float, float]:
        """(z, q) of a training round as the accountant sees it (local DP: q = 1)."""
        dp = self.config.dp
        return dp.noise_multiplier, (sampling_rate if dp.mode == "central" else 1.0)

    def _over_budget(self, sampling_rate: float) -> bool:
        """True (and the chain stopped) when one more round would spend more ε than the
        budget allows: what was trained becomes final, then the usual evaluation round."""
        dp = self.config.dp
        if dp is None or dp.epsilon_budget is None:
            return False
        spent = self.dp_ledger.epsilon()
        ahead = self.dp_ledger.epsilon_after_next(*self._dp_round(sampling_rate))
        if ahead <= dp.epsilon_budget:
            return False
        self.stop_reason = (
            f"privacy budget: epsilon {spent:.4g} spent, the next round would take it to "
            f"{ahead:.4g} > budget {dp.epsilon_budget:g} (delta {dp.delta:g})"
        )
        log.warning("stopping the chain: %s", self.stop_reason)
        for name in [n for n in self.window_state if n.startswith("layers.")]:
            self.final[name] = self.window_state.pop(name)
        self._finish_training()
        self.changed = True
        return True

    def _round_complete(self, now_ms: int) -> bool:
        """Every participant that is still active has answered."""
        r = self.open_round
        waiting = set(r.participants) - set(r.updates)
        return not any(self.is_active(a, now_ms) for a in waiting if a in self.agents)

    def _close_round(self, now_ms: int) -> None:
        """Close the open round on what arrived: re-run it below the quorum, else hand it
        to the closer of its kind (head fit, final evaluation, training round)."""
        r = self.open_round
        self.open_round = None
        received = r.received()
        dropped = sorted(set(r.participants) - set(received))
        if dropped:
            log.warning("round %s: dropped stragglers %s", r.round_id, dropped)
        dp = self.config.dp
        if dp is not None and dp.mode == "local" and received and not r.evaluation:
            # the agents' noised updates reached the coordinator: released, whatever follows
            self.dp_ledger.charge(*self._dp_round(r.sampling_rate))
        if len(received) < min(self.config.min_agents, len(r.participants)):
            log.warning(
                "round %s: %d of %d updates, below the quorum of %d; re-running the round",
                r.round_id,
                len(received),
                len(r.participants),
                self.config.min_agents,
            )
            self.observer.round_closed("rerun", 0.0)
            self.changed = True
            return
        metrics = _federated_metrics([r.updates[a][0] for a in received])
        if r.head_fit:
            self._close_head_fit(r, metrics, now_ms)
        elif r.evaluation:
            self._close_evaluation(r, metrics, now_ms)
        else:
            self._close_training_round(r, metrics, now_ms)

    def _close_evaluation(self, r: OpenRound, metrics: UpdateMetrics, now_ms: int) -> None:
        """The final model's federated validation figures end the chain."""
        self.history.append(r.record(metrics, now_ms, digests=False))
        self.phase = ChainPhase.DONE
        log.info(
            "final model on %d agents' validation data: loss %.4f, metric %.4f",
            len(r.updates),
            metrics.val_loss,
            metrics.val_metric,
        )
        self.observer.round_closed("evaluated", 0.0)
        self.changed = True

    def _close_training_round(self, r: OpenRound, metrics: UpdateMetrics, now_ms: int) -> None:
        """The aggregate (or the secure mean) becomes the window state, central DP is
        charged, the round is recorded, and the stage's convergence rule may end it."""
        dp = self.config.dp
        received = r.received()
        crash_point("aggregate")  # fault-injection tests only; a no-op otherwise
        started = time.perf_counter()
        if r.secure_mean is not None:
            self.window_state = r.secure_mean
        else:
            self.window_state = self._aggregate(r, received)
        self.observer.round_closed("aggregated", time.perf_counter() - started)
        dp_epsilon = dp_round_epsilon = None
        if dp is not None:
            if dp.mode == "central":
                self.dp_ledger.charge(*self._dp_round(r.sampling_rate))
            dp_epsilon = self.dp_ledger.epsilon()
            dp_round_epsilon = self.dp_ledger.epsilon_of_one_round(*self._dp_round(r.sampling_rate))
        for agent in received:
            if agent in self.agents:
                self.agents[agent].rounds_completed += 1
        self.history.append(
            r.record(metrics, now_ms, dp_epsilon=dp_epsilon, dp_round_epsilon=dp_round_epsilon)
        )
        log.info(
            "round %s layer %d: %d agents, val loss %.4f, val metric %.4f%s",
            r.round_id,
            r.stage_layer,
            len(received),
            metrics.val_loss,
            metrics.val_metric,
            "" if dp_epsilon is None else f", epsilon {dp_epsilon:.4g}",
        )
        if self.convergence.update(metrics.val_loss):
            self._advance()
        self.changed = True

    def _close_head_fit(self, r: OpenRound, metrics: UpdateMetrics, now_ms: int) -> None:
        """The head solved from the received statistics' sample-weighted mean becomes the
        window state's head: the chain's first round starts from it, or, after the last
        stage (``head_refit``), it replaces the trained head and what follows the chain
        begins (head rounds or the evaluation). Statistics that give
        no finite head (each agent's passed the checks, their mean does not solve) are
        dropped and the fit round is asked again, as a round short of its quorum is."""
        received = r.received()
        started = time.perf_counter()
        if r.secure_mean is not None:
            stats = r.secure_mean
        else:
            updates = [
                WeightedUpdate(r.updates[a][1], r.updates[a][0].train_samples, a) for a in received
            ]
            stats = aggregate("fedavg", updates)
        try:
            weight, bias = solve_head(stats)
        except (ValueError, torch.linalg.LinAlgError) as exc:
            weight = bias = torch.tensor(float("nan"))
            log.error("round %s: the head statistics do not solve: %s", r.round_id, exc)
        if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
            log.error("round %s: no finite head from these statistics; fitting again", r.round_id)
            self.observer.round_closed("rerun", 0.0)
            self.changed = True
            return
        self.window_state = {"objective.head.weight": weight, "objective.head.bias": bias}
        self.observer.round_closed("aggregated", time.perf_counter() - started)
        self.history.append(r.record(metrics, now_ms, window=()))
        log.info(
            "round %s: task head fitted in closed form on %d agents' %d training rows",
            r.round_id,
            len(received),
            metrics.train_samples,
        )
        self.changed = True
        if self.head_refit:
            self.head_refit = False
            self._after_chain()

    def _aggregate(self, r: OpenRound, received: list[str]) -> dict[str, torch.Tensor]:
        """The round's new window state: clipping, then central DP or the strategy."""
        c = self.config
        uploads = {a: r.updates[a][1] for a in received}
        validate_updates(
            [WeightedUpdate(t, r.updates[a][0].train_samples, a) for a, t in uploads.items()],
            b_only=self.a_frozen,
        )
        central = c.dp is not None and c.dp.mode == "central"
        if c.clip_norm is not None or central:
            start = round_start_state(
                uploads[received[0]], self.window_state, c.params, self.start_layer, c.num_layers
            )
            if c.clip_norm is not None:
                uploads = {a: clip_update(t, start, c.clip_norm) for a, t in uploads.items()}
            if central:
                return central_dp_mean(
                    [uploads[a] for a in received],
                    start,
                    c.dp,
                    train_a=c.params.lora_train_a,
                    generator=self.dp_generator,
                )
        updates = [WeightedUpdate(uploads[a], r.updates[a][0].train_samples, a) for a in received]
        options = {"trim": c.trim_fraction} if c.aggregation == "trimmed-mean" else {}
        if self.a_frozen:  # ffa (the config allows no other): B travels without its A
            options = {"b_only": True}
        return aggregate(c.aggregation, updates, **options)

    def _advance(self) -> None:
        """The stage converged: adapters leaving the window become final; next layer, the
        head stage, or the evaluation."""
        layer = self.stage_layer
        if self.head_stage:
            self._finish_training()
            log.info("head stage done after %d rounds; evaluating", self.convergence.rounds)
            return
        if layer == self.config.num_layers - 1:
            leaving = self.window_for(layer)
        else:
            leaving = [j for j in self.window_for(layer) if j not in self.window_for(layer + 1)]
        for j in leaving:
            prefix = f"layers.{j}."
            for name in [n for n in self.window_state if n.startswith(prefix)]:
                self.final[name] = self.window_state.pop(name)
        if layer == self.config.num_layers - 1:
            if self.config.closed_form_head != "off":
                self.head_refit = True
                log.info("chain trained: %d final tensors; refitting the head", len(self.final))
                return
            self._after_chain()
            return
        self.stage_layer = layer + 1
        self.convergence = self._new_convergence()
        log.info("layer %d frozen (%s final); stage layer %d", layer, leaving, self.stage_layer)

    def _after_chain(self) -> None:
        """Every adapter is final: head rounds next when asked for (or a budget is left
        that the head takes), the evaluation otherwise."""
        if self.config.head_rounds > 0 or self.config.head_takes_what_is_left:
            self._enter_head_stage()
            return
        self._finish_training()
        log.info("chain trained: %d final tensors; evaluating", len(self.final))

    def _enter_head_stage(self) -> None:
        """After the last stage: the window state keeps the task head alone, and head-only
        rounds begin (none when a budget left nothing and asked for none)."""
        self.window_state = {
            n: t for n, t in self.window_state.items() if n.startswith("objective.")
        }
        self.head_stage = True
        self.convergence = self._new_convergence()
        if self.convergence.max_rounds == 0:
            self._finish_training()
            return
        log.info(
            "chain trained: %d final tensors; head stage of %d to %d rounds",
            len(self.final),
            self.convergence.min_rounds,
            self.convergence.max_rounds,
        )

    def _finish_training(self) -> None:
        """The trained task head joins the final adapters (``head.*``); evaluate next.
        What a round budget has left is logged, whichever way training ended (a closed-form
        head takes no head rounds, the head stage converged, a privacy budget stopped it)."""
        for name in [n for n in self.window_state if n.startswith("objective.")]:
            self.final[name.removeprefix("objective.")] = self.window_state.pop(name)
        self.window_state = {}
        self.phase = ChainPhase.EVALUATING
        self.stage_layer = None
        self.head_stage = False
        budget, trained = self.config.round_budget, self.trained_rounds()
        if budget is not None and budget > trained:
            log.info(
                "%d rounds of the budget unspent (%d of %d trained)",
                budget - trained,
                trained,
                budget,
            )

    # -- what agents ask --------------------------------------------------------------

    def next_task(self, agent_id: str, now_ms: int) -> Task:
        """The agent's next task (WAIT when there is nothing for it now)."""
        self.touch(agent_id, now_ms)
        self.tick(now_ms)
        params = self.params
        if self.phase is ChainPhase.DONE:
            # params: an agent that never trained rebuilds a frozen A from their seed
            return Task(
                TaskKind.DONE,
                round_id="done",
                params=params,
                tensors=tuple(manifest_of(self._sendable(self.final))),
            )
        if self.phase is ChainPhase.PROBING and agent_id not in self.probe_reports:
            return Task(TaskKind.PROBE, round_id=self.probe_id, params=params)
        r = self.open_round
        if r is not None and r.head_fit:
            if agent_id not in r.participants or agent_id in r.updates:
                return Task(TaskKind.WAIT, retry_after_ms=200)
            return Task(
                TaskKind.FIT_HEAD,
                round_id=r.round_id,
                stage_layer=r.stage_layer,
                params=params,
                deadline_unix_ms=r.deadline_ms,
                tensors=tuple(manifest_of(self._sendable(self.final))),
            )
        if r is not None and not r.window and not r.evaluation:
            params = self.head_params()
        if (
            self.phase in (ChainPhase.EVALUATING, ChainPhase.TRAINING)
            and r is not None
            and agent_id in r.participants
            and agent_id not in r.updates
        ):
            # an evaluation fetches the final adapters, a training round the round's tensors
            evaluating = self.phase is ChainPhase.EVALUATING
            return Task(
                TaskKind.EVALUATE if evaluating else TaskKind.TRAIN_ROUND,
                round_id=r.round_id,
                stage_layer=r.stage_layer,
                window_layers=tuple(r.window),
                params=params,
                deadline_unix_ms=r.deadline_ms,
                tensors=tuple(
                    manifest_of(self._sendable(self.final) if evaluating else self.round_tensors())
                ),
            )
        return Task(TaskKind.WAIT, retry_after_ms=200)

    def head_params(self) -> TrainingParams:
        """What a head round's task carries: the chain's settings, with
        ``config.head_local_steps`` steps (and no local epochs) when that is set."""
        steps = self.config.head_local_steps
        if steps is None:
            return self.params
        return replace(self.params, local_steps=steps, local_epochs=0.0)

    def round_tensors(self) -> dict[str, torch.Tensor]:
        """What a TRAIN_ROUND fetch streams: final adapters + the window's aggregate (no A
        when A is frozen)."""
        tensors = {f"final.{k}": v for k, v in self._sendable(self.final).items()}
        tensors.update({f"window.{k}": v for k, v in self._sendable(self.window_state).items()})
        return tensors

    def tensors_for(self, round_id: str, *, omit_final: bool = False) -> dict[str, torch.Tensor]:
        """What FetchTensors streams for ``round_id``; ``omit_final``: a TRAIN_ROUND's
        window tensors only (the agent holds the final adapters of this stage already)."""
        if self.phase is ChainPhase.DONE and round_id == "done":
            return self._sendable(self.final)
        if self.open_round is None or round_id != self.open_round.round_id:
            raise UpdateRejectedError("failed_precondition", f"round {round_id!r} is not open")
        if self.open_round.evaluation or self.open_round.head_fit:
            return self._sendable(self.final)
        tensors = self.round_tensors()
        if omit_final:
            return {k: v for k, v in tensors.items() if not k.startswith("final.")}
        return tensors

    def report_probe(self, report: ProbeReport) -> None:
        if self.phase is not ChainPhase.PROBING or report.round_id != self.probe_id:
            raise UpdateRejectedError(
                "failed_precondition", f"probe {report.round_id!r} is not open (stale report)"
            )
        if len(report.cka_scores) != self.config.num_layers:
            raise UpdateRejectedError(
                "invalid_argument",
                f"{len(report.cka_scores)} CKA scores for a {self.config.num_layers}-layer model",
            )
        if not all(math.isfinite(s) for s in report.cka_scores):
            raise UpdateRejectedError("invalid_argument", "CKA scores must be finite")
        if len(report.readout_losses) not in (0, self.config.num_layers):
            raise UpdateRejectedError(
                "invalid_argument",
                f"{len(report.readout_losses)} readout losses for a "
                f"{self.config.num_layers}-layer model (one per layer, or none)",
            )
        if not all(math.isfinite(x) and x >= 0 for x in report.readout_losses):
            raise UpdateRejectedError(
                "invalid_argument", "readout losses must be finite and non-negative"
            )
        self.probe_reports[report.agent_id] = report
        self.changed = True

    def _expected_tensors(self, layer: int, window: list[int]) -> dict[str, tuple]:
        return expected_tensors(
            self._sendable(self.window_state), self._sendable(self.final), layer, window
        )

    def submit(
        self,
        agent_id: str,
        round_id: str,
        metrics: UpdateMetrics,
        tensors: dict[str, torch.Tensor],
        now_ms: int,
    ) -> bool:
        """Validate and record an update; False when it is a duplicate (ignored)."""
        self.touch(agent_id, now_ms)
        r = self.open_round
        if r is None or round_id != r.round_id:
            raise UpdateRejectedError(
                "failed_precondition",
                f"round {round_id!r} is not open (stale or unknown"
                + (f"; current round is {r.round_id}" if r else "")
                + ")",
                reason="stale_round",
            )
        if agent_id not in r.participants:
            raise UpdateRejectedError(
                "failed_precondition",
                f"agent {agent_id} was not selected for round {round_id}",
                reason="not_selected",
            )
        if agent_id in r.updates:
            return False
        self._validate(r, metrics, tensors)
        r.updates[agent_id] = (metrics, tensors)
        r.digests[agent_id] = update_digest(tensors)
        # nothing to persist yet (a round in flight is not saved): only closing it is
        self.tick(now_ms)
        return True

    def submit_secure_mean(
        self,
        round_id: str,
        metrics: dict[str, UpdateMetrics],
        mean: dict[str, torch.Tensor],
        now_ms: int,
    ) -> None:
        """Close training round ``round_id`` with ``mean``, the sample-weighted mean of the
        updates of the agents in ``metrics`` (each agent's round metrics), computed by a
        secure sum that showed nobody any single update (``chainfed.coordinator.
        secure_aggregation`` says which settings allow it).

        The round closes at once: no later update can join a sum already taken, so the
        participants not in ``metrics`` are dropped. Everything else is a normal close: the
        quorum (below it the round is re-run), federated metrics, convergence, history
        (with no update digests: no update was seen) and the stage's advance. ``mean`` gets
        the checks a sum allows (names, shapes, dtypes, finite values), the metrics the
        per-agent ones; anything wrong rejects the whole mean and leaves the round open."""
        check_secure_aggregation(self.config)
        for agent in metrics:
            self.touch(agent, now_ms)
        r = self.open_round
        if r is None or r.evaluation or round_id != r.round_id:
            raise UpdateRejectedError(
                "failed_precondition",
                f"training round {round_id!r} is not open (stale or unknown)",
                reason="stale_round",
            )
        strangers = sorted(set(metrics) - set(r.participants))
        if strangers:
            raise UpdateRejectedError(
                "failed_precondition",
                f"agents {strangers} were not selected for round {round_id}",
                reason="not_selected",
            )
        if r.updates:
            raise UpdateRejectedError(
                "failed_precondition",
                f"round {round_id} already holds individual updates; a secure mean replaces "
                "them all",
            )
        for agent_metrics in metrics.values():
            check_training_metrics(agent_metrics)
        self._check_tensors(r, mean, r.expected)
        r.updates = {agent: (agent_metrics, {}) for agent, agent_metrics in metrics.items()}
        r.secure_mean = mean
        self._close_round(now_ms)

    def _validate(
        self, r: OpenRound, metrics: UpdateMetrics, tensors: dict[str, torch.Tensor]
    ) -> None:
        if r.evaluation:
            check_evaluation_answer(metrics, tensors)
            return
        check_training_metrics(metrics)
        if r.head_fit:
            check_head_statistics(tensors, r.round_id)
        expected = r.expected or {
            k: (tuple(v.shape), str(v.dtype))
            for k, v in next(iter(r.updates.values()), (None, {}))[1].items()
        }
        self._check_tensors(r, tensors, expected)
        c = self.config
        if c.norm_bound is not None and not r.head_fit:  # statistics are not a change
            start = round_start_state(
                tensors, self.window_state, c.params, self.start_layer, c.num_layers
            )
            check_norm(tensors, start, c.norm_bound)

    def _check_tensors(
        self, r: OpenRound, tensors: dict[str, torch.Tensor], expected: dict[str, tuple]
    ) -> None:
        """Names of the round's window, ``expected`` shapes and dtypes, finite values."""
        check_names(tensors, r.round_id, r.window, a_frozen=self.a_frozen)
        check_shapes(tensors, expected, r.round_id)
        check_finite(tensors)

    # -- status -----------------------------------------------------------------------

    def snapshot(self, now_ms: int | None = None) -> StatusSnapshot:
        """What ``chainfed status`` and the status page show, as of ``now_ms`` (default:
        the clock; it decides which agents are inactive)."""
        if now_ms is None:
            now_ms = int(time.time() * 1000)
        r = self.open_round
        return StatusSnapshot(
            phase=self.phase,
            num_layers=self.config.num_layers,
            start_layer=self.start_layer,
            stage_layer=self.stage_layer,
            window_layers=tuple(self.round_window()),
            final_layers=tuple(sorted(layers_of(self.final))),
            round_id=r.round_id if r else "",
            stage_rounds=self.convergence.rounds,
            total_rounds=len(self.history),
            agents=tuple(
                AgentStatus(
                    a,
                    e.capabilities,
                    e.last_seen_ms,
                    e.rounds_completed,
                    inactive=not self.is_active(a, now_ms),
                )
                for a, e in sorted(self.agents.items())
            ),
            history=tuple(self.history),
            dp_epsilon=self.dp_ledger.epsilon() if self.dp_ledger is not None else None,
            dp_delta=self.config.dp.delta if self.config.dp is not None else 0.0,
            dp_epsilon_budget=self.config.dp.epsilon_budget if self.config.dp else None,
            stop_reason=self.stop_reason,
            params=self.params,
        )


def stage_round_cap(
    budget_left: int, stages_left: int, *, head_rounds: int, min_rounds: int, max_rounds: int
) -> int:
    """Round cap of a stage entered with ``budget_left`` rounds of the budget unspent and
    ``stages_left`` stages to go (this one included): an equal share of what the head's
    ``head_rounds`` leave, within the ``min_rounds``/``max_rounds`` guards. The last
    stage's share is everything but the head's reserve."""
    share = (budget_left - head_rounds) // max(stages_left, 1)
    return max(min_rounds, min(max_rounds, share))


def _federated_metrics(metrics: list[UpdateMetrics]) -> UpdateMetrics:
    """Sample-weighted means of the agents' round metrics (validation by val samples)."""
    train_total = sum(m.train_samples for m in metrics)
    val_total = sum(m.val_samples for m in metrics)

    def by_val(attr: str) -> float:
        if val_total == 0:
            return sum(getattr(m, attr) for m in metrics) / len(metrics)
        return sum(getattr(m, attr) * m.val_samples for m in metrics) / val_total

    return UpdateMetrics(
        train_samples=train_total,
        val_samples=val_total,
        steps=max(m.steps for m in metrics),
        train_loss=(
            sum(m.train_loss * m.train_samples for m in metrics) / train_total
            if train_total
            else 0.0
        ),
        val_loss=by_val("val_loss"),
        val_metric=by_val("val_metric"),
        peak_memory_bytes=max(m.peak_memory_bytes for m in metrics),
        seconds=max(m.seconds for m in metrics),
    )


def _sample_weighted_mean(rows: list[tuple[float, ...]], reports: list[ProbeReport]) -> list[float]:
    """Per layer, the mean of ``rows`` (one per report, equal lengths) weighted by the
    reports' samples (equally when none has any). One report's row comes back exactly."""
    total = sum(r.num_samples for r in reports)
    weights = [r.num_samples / total if total > 0 else 1 / len(reports) for r in reports]
    return [
        sum(w * row[i] for w, row in zip(weights, rows, strict=True)) for i in range(len(rows[0]))
    ]
