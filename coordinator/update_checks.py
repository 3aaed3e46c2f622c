"""What an update must be before it can touch a round's aggregate (DESIGN.md §5): pure
checks, each raising ``UpdateRejectedError`` with the gRPC status the service answers
and a message naming the problem. A rejected update never reaches the aggregate.
"""

from __future__ import annotations

import math

import torch

from chainfed.proto.closed_form_head import check_statistics
from chainfed.proto.dp_mechanism import update_norm
from chainfed.proto.messages import UpdateMetrics
from chainfed.proto.tensor_names import LORA_A_SUFFIX, tensor_owner

Spec = tuple[tuple[int, ...], str]
"""(shape, dtype) of a tensor an update must carry."""


class UpdateRejectedError(Exception):
    """An update or report that must not touch the round; ``code`` picks the gRPC status,
    ``reason`` names the check it failed (the label of the rejection metrics)."""

    def __init__(self, code: str, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        """``invalid_argument``, ``failed_precondition`` or ``not_found``."""
        self.reason = reason or code
        """A short, fixed label: ``stale_round``, ``wrong_shape``, ``not_finite``, ...
        (the gRPC code's name when the raiser gave none)."""


def expected_tensors(
    window_state: dict[str, torch.Tensor],
    final: dict[str, torch.Tensor],
    layer: int,
    window: list[int],
) -> dict[str, Spec]:
    """(shape, dtype) of every tensor a round at ``layer`` must upload, from the current
    aggregate (``window_state``, and the ``final`` adapters, as sent); the new layer's
    adapter is shaped like the layer below's. Empty before the chain's first aggregate of
    adapters (nothing known, or only a closed-form head): the first update then sets it.
    An empty ``window`` (a head round) expects the head alone."""
    known = {**final, **window_state}
    if not known:
        return {}
    expected = {}
    for name, tensor in window_state.items():
        kind, index = tensor_owner(name)
        if (
            (kind == "layers" and index in window)
            or kind == "objective"
            or (kind == "foresight" and index > layer)
        ):
            expected[name] = (tuple(tensor.shape), str(tensor.dtype))
    if window and layer not in {i for k, i in map(tensor_owner, expected) if k == "layers"}:
        layers = [i for k, i in map(tensor_owner, known) if k == "layers"]
        if not layers:
            return {}  # the head alone (a closed-form fit): the first update sets the rest
        below = max(layers)
        for name, tensor in known.items():
            if name.startswith(f"layers.{below}."):
                new = f"layers.{layer}." + name.removeprefix(f"layers.{below}.")
                expected[new] = (tuple(tensor.shape), str(tensor.dtype))
    return expected


def check_evaluation_answer(metrics: UpdateMetrics, tensors: dict[str, torch.Tensor]) -> None:
    """An evaluation answer: no tensors, validation samples and a finite loss."""
    if tensors or metrics.val_samples <= 0 or not math.isfinite(metrics.val_loss):
        raise UpdateRejectedError(
            "invalid_argument",
            "an evaluation answer carries no tensors, val_samples > 0 and a finite val_loss",
            reason="bad_evaluation",
        )


def check_training_metrics(metrics: UpdateMetrics) -> None:
    """A training update: trained on some samples, finite losses."""
    if metrics.train_samples <= 0:
        raise UpdateRejectedError(
            "invalid_argument", "an update must report train_samples > 0", reason="bad_metrics"
        )
    if not (math.isfinite(metrics.val_loss) and math.isfinite(metrics.train_loss)):
        raise UpdateRejectedError(
            "invalid_argument", "train_loss and val_loss must be finite", reason="bad_metrics"
        )


def check_head_statistics(tensors: dict[str, torch.Tensor], round_id: str) -> None:
    """A closed-form head round's answer: exactly the two statistics, shaped as
    ``chainfed.proto.closed_form_head`` defines them, finite."""
    try:
        check_statistics(tensors)
    except ValueError as exc:
        raise UpdateRejectedError(
            "invalid_argument", f"round {round_id}: {exc}", reason="bad_head_statistics"
        ) from None


def check_names(
    tensors: dict[str, torch.Tensor], round_id: str, window: list[int], *, a_frozen: bool
) -> None:
    """Only the round's window adapters (B alone when A is frozen), the head and proxies."""
    for name in tensors:
        if a_frozen and name.endswith(LORA_A_SUFFIX):
            raise UpdateRejectedError(
                "invalid_argument",
                f"unexpected tensor {name!r}: round {round_id} keeps every A frozen at "
                "its seeded init (ffa); an update carries B, not A",
                reason="unexpected_tensor",
            )
        kind, index = tensor_owner(name)
        if (
            kind == "layers"
            and index not in window
            or kind not in ("layers", "objective", "foresight")
        ):
            raise UpdateRejectedError(
                "invalid_argument",
                f"unexpected tensor {name!r}: round {round_id} trains layers {window}",
                reason="unexpected_tensor",
            )


def check_shapes(
    tensors: dict[str, torch.Tensor], expected: dict[str, Spec], round_id: str
) -> None:
    """Exactly the ``expected`` names, shapes and dtypes (nothing to check when empty)."""
    if not expected:
        return
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise UpdateRejectedError(
            "invalid_argument",
            f"update tensors do not match round {round_id}: missing {missing[:5]}, "
            f"unexpected {extra[:5]}",
            reason="wrong_shape",
        )
    for name, tensor in tensors.items():
        shape, dtype = expected[name]
        if tuple(tensor.shape) != shape or str(tensor.dtype) != dtype:
            raise UpdateRejectedError(
                "invalid_argument",
                f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, "
                f"expected {dtype} {list(shape)}",
                reason="wrong_shape",
            )


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """No NaN or infinity anywhere."""
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise UpdateRejectedError(
                "invalid_argument", f"tensor {name!r} has NaN or Inf values", reason="not_finite"
            )


def check_norm(
    tensors: dict[str, torch.Tensor], start: dict[str, torch.Tensor], bound: float
) -> None:
    """``--norm-bound``: the update's change from the round's start ``start``."""
    norm = update_norm(tensors, start)
    if norm > bound:
        raise UpdateRejectedError(
            "invalid_argument",
            f"update norm {norm:.4g} (its change from the round's start) exceeds the bound {bound}",
            reason="norm_bound",
        )
