"""The chain's rules that agent and coordinator must apply alike (DESIGN.md §3).

A local run decides with them on its own validation loss and CKA scores; the
coordinator decides with them on the federated ones, so both freeze, start and window
the chain the same way. Pure Python: no tensors, no model.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

DEFAULT_GPO_LAMBDA = {"bert": 0.1, "llama": 0.2}
"""Weight λ of GPO's global loss by model family, when none is given."""

DEFAULT_PATIENCE = 1
"""Rounds in a row without improvement that end a stage, once its minimum has run."""
DEFAULT_TOLERANCE = 0.01
"""Relative improvement of the validation loss that counts as progress."""


def check_stage_rule(min_rounds: int, max_rounds: int, patience: int, tolerance: float) -> None:
    """ValueError naming the first setting under which ``StageConvergence`` could not judge
    a stage: a cap below one round, a minimum above the cap, a patience that never waits
    (below one round, every stage would end at its minimum), a tolerance outside [0, 1).
    One check for every config that carries the rule (the coordinator's, a local chain's)."""
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    if min_rounds > max_rounds:
        raise ValueError("min_rounds must not exceed max_rounds")
    if patience < 1:
        raise ValueError(f"patience must be >= 1 round, got {patience}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")


def add_stage_rule_arguments(
    group: argparse._ArgumentGroup | argparse.ArgumentParser, *, loss: str, minimum: str
) -> None:
    """``--patience`` and ``--tolerance``, ``StageConvergence``'s settings, worded once for
    every command that exposes them: ``loss`` names the validation loss the command judges,
    ``minimum`` its option of minimum rounds per stage. ``check_stage_rule`` refuses bad
    values where the command builds its config."""
    group.add_argument(
        "--patience",
        type=int,
        default=DEFAULT_PATIENCE,
        help=f"rounds in a row without improvement of the {loss} that end a stage, once "
        f"{minimum} have run (default {DEFAULT_PATIENCE})",
    )
    group.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"relative improvement of the {loss} that counts (default {DEFAULT_TOLERANCE})",
    )


@dataclass
class StageConvergence:
    """When a stage is done: the validation loss stopped improving or the cap was hit.

    The same rule serves a local run (local validation loss) and the coordinator
    (federated, sample-weighted validation loss), so both freeze at the same round.
    """

    min_rounds: int
    max_rounds: int
    patience: int
    tolerance: float
    rounds: int = 0
    best: float = math.inf
    since_best: int = 0

    def update(self, val_loss: float) -> bool:
        """Record one round's validation loss; True when the stage should end."""
        self.rounds += 1
        if val_loss < self.best * (1 - self.tolerance):
            self.best, self.since_best = val_loss, 0
        else:
            self.since_best += 1
        if self.rounds >= self.max_rounds:
            return True
        return self.rounds >= self.min_rounds and self.since_best >= self.patience


DEFAULT_FOAT_THRESHOLD = 0.8
"""FOAT's CKA threshold: the chain starts at the first block whose CKA with the family's
reference falls below it (``choose_start_layer``)."""
READOUT_LOSS_FACTOR = 2.0
"""How far above the last layer's readout loss a layer's may lie for a stage there to
train toward the model's own output (``first_readable_layer``)."""


def check_foat_rule(threshold: float, readout_factor: float) -> None:
    """ValueError naming the FOAT setting under which ``choose_start_layer`` could not
    judge: a threshold that is not a number, or a readout factor below 1 (the last layer,
    the model's own loss, would lie above its own bound). One check for every config that
    carries the rule (the coordinator's, a local chain's)."""
    if not math.isfinite(threshold):
        raise ValueError(f"foat_threshold must be a finite number, got {threshold}")
    if not (math.isfinite(readout_factor) and readout_factor >= 1):
        raise ValueError(f"foat_readout_factor must be a finite number >= 1, got {readout_factor}")


def add_foat_arguments(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """``--foat-threshold`` and ``--foat-readout-factor``, FOAT's settings, worded once for
    every command that lets FOAT choose the start layer. ``check_foat_rule`` refuses bad
    values where the command builds its config."""
    group.add_argument(
        "--foat-threshold",
        type=float,
        default=DEFAULT_FOAT_THRESHOLD,
        help="FOAT starts the chain at the first layer whose CKA with the reference falls "
        f"below this (default {DEFAULT_FOAT_THRESHOLD})",
    )
    group.add_argument(
        "--foat-readout-factor",
        type=float,
        default=READOUT_LOSS_FACTOR,
        help="lm task: FOAT starts no lower than the first layer from which the model's own "
        "output head reads every layer at a loss within this factor of the last layer's "
        f"(default {READOUT_LOSS_FACTOR:g})",
    )


def first_readable_layer(readout_losses: list[float], factor: float = READOUT_LOSS_FACTOR) -> int:
    """The lowest layer from which every layer's readout loss is at most ``factor`` times
    the last layer's (the model's own loss).

    The readout loss of layer i is the task loss with the model's own frozen output head
    (final norm + LM head) reading block i's output: what a chain stage whose newest
    layer is i trains toward (``LMObjective`` on the window's output). Where it is far
    above the model's loss, the head cannot read that layer (a decoder's middle layers,
    the logit lens's blind spot), and a stage there trains toward an objective the final
    model does not have."""
    if not readout_losses:
        raise ValueError("first_readable_layer needs one readout loss per layer, got none")
    bound = factor * readout_losses[-1]
    start = len(readout_losses) - 1
    while start > 0 and readout_losses[start - 1] <= bound:
        start -= 1
    return start


def choose_start_layer(
    scores: list[float],
    threshold: float = DEFAULT_FOAT_THRESHOLD,
    readout_losses: list[float] | None = None,
    readout_factor: float = READOUT_LOSS_FACTOR,
) -> int:
    """FOAT: the first block whose CKA with the family's reference is below ``threshold``
    (the last block if none is); with ``readout_losses`` (a task read by the model's own
    frozen output head), no lower than ``first_readable_layer`` at ``readout_factor``."""
    cka_start = next((i for i, s in enumerate(scores) if s < threshold), len(scores) - 1)
    if not readout_losses:
        return cka_start
    return max(cka_start, first_readable_layer(readout_losses, readout_factor))


def parse_gpo(spec: str, num_layers: int) -> tuple[str, int]:
    """``proxy`` / ``none`` / ``exact:K`` / ``exact:all`` -> (kind, depth)."""
    if spec in ("proxy", "none"):
        return spec, num_layers
    if spec.startswith("exact:"):
        depth = spec.split(":", 1)[1]
        if depth == "all":
            return "exact", num_layers
        if depth.isdigit() and int(depth) > 0:
            return "exact", int(depth)
    raise ValueError(f"--gpo must be proxy, none, exact:K (K>0) or exact:all; got {spec!r}")


def window_layers(start_layer: int, layer: int, window: int) -> list[int]:
    """DLCT: the layers trained in the stage whose newest layer is ``layer`` — the last
    ``window`` of them, never below the chain's start."""
    return list(range(max(start_layer, layer - window + 1), layer + 1))
