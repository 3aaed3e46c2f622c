"""The command-line options of an agent's local training, declared once.

``chainfed train`` (one device), ``chainfed simulate`` and ``chainfed coordinator`` (which
sends them to every agent in ``TrainingParams``) take these options under the same
names, with the same meaning and help; ``chainfed simulate`` starts a coordinator
process with them by name, so the names are part of what the two ends agree on. Each
command keeps its own defaults: it passes an object with one attribute per option
(``LocalTrainingDefaults``, or its own config dataclass). The coordinator imports only
``proto``, which is why the declaration lives here.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Protocol

from chainfed.proto.messages import LORA_TARGETS


class LocalTrainingSettings(Protocol):
    """Anything that holds a default for every option (attribute = option's dest)."""

    lr: float
    weight_decay: float
    micro_batch: int
    grad_accum: int
    rank: int
    alpha: float
    targets: str
    lora_dropout: float
    backbone_dropout: float


@dataclass(frozen=True)
class LocalTrainingDefaults:
    """The defaults of ``chainfed train`` and ``chainfed coordinator``."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    micro_batch: int = 16
    grad_accum: int = 1
    rank: int = 8
    alpha: float = 16.0
    targets: str = "all"
    lora_dropout: float = 0.0
    backbone_dropout: float = 0.0


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0, for the learning rate (0 or below trains
    nothing, or away from the data, without a word; infinity gives NaN weights) and for
    the coordinator's other positive amounts, such as ``--poll-seconds``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return value


def add_local_training_arguments(
    group: argparse._ArgumentGroup | argparse.ArgumentParser,
    defaults: LocalTrainingSettings = LocalTrainingDefaults(),
) -> None:
    """Add the options to ``group``, each defaulting to ``defaults``' attribute of its dest."""
    d = defaults
    group.add_argument(
        "--lr", type=positive_float, default=d.lr, help=f"AdamW learning rate (default {d.lr})"
    )
    group.add_argument(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help=f"AdamW weight decay (default {d.weight_decay})",
    )
    group.add_argument(
        "--micro-batch",
        type=int,
        default=d.micro_batch,
        help=f"samples per micro-batch (default {d.micro_batch})",
    )
    group.add_argument(
        "--grad-accum",
        type=int,
        default=d.grad_accum,
        help=f"micro-batches per optimiser step (default {d.grad_accum})",
    )
    group.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    group.add_argument(
        "--alpha",
        type=float,
        default=d.alpha,
        help=f"LoRA alpha, scale alpha/rank (default {d.alpha:g})",
    )
    group.add_argument(
        "--targets",
        choices=LORA_TARGETS,
        default=d.targets,
        help="adapted linears of each block: qv (query, value), attention (q/k/v/o) or all "
        f"(default {d.targets})",
    )
    group.add_argument(
        "--lora-dropout",
        type=float,
        default=d.lora_dropout,
        help=f"dropout on the adapter input (default {d.lora_dropout})",
    )
    group.add_argument(
        "--backbone-dropout",
        type=float,
        default=d.backbone_dropout,
        help="dropout of the trained blocks in training steps, bert family: attention "
        f"probabilities and half-block outputs, as BERT trains (default {d.backbone_dropout})",
    )
