"""Task objectives placed after a stack of blocks: classification and causal LM.

* ``ClassifyObjective``: pooled hidden state -> linear head, trained in every stage.
  Pooling is the mean over real tokens for encoders (how all-MiniLM-L6-v2 was trained)
  and the last real token for decoders.
* ``LMObjective``: the model's own final norm + LM head, frozen. The loss covers response
  tokens only, and logits are computed only at positions that carry loss, with the head
  read in vocabulary slices (``StreamedLMHead``), so neither the (B, T, V) logits nor the
  whole head is ever in memory. Accuracy: whether the label word the model
  ranks first (among the label words' first tokens) is the right one.

Precision (``chainfed.agent.runtime.precision``): hidden states arrive in the compute
dtype on the model's device, with the batch moved there (``Batch.to``); the head is a
float32 master weight, and logits, losses and metrics are float32.

Notation: B batch, T sequence, d hidden, C classes, V vocabulary, n loss positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chainfed.agent.runtime.lm_head import StreamedLMHead
from chainfed.agent.runtime.model import StreamingModel
from chainfed.proto.seeded_init import initial_head


@dataclass
class Batch:
    """One mini-batch of encoded samples."""

    input_ids: torch.Tensor
    """(B, T) token ids, right padded."""
    attention_mask: torch.Tensor
    """(B, T) 1 for real tokens."""
    labels: torch.Tensor
    """(B,) class index (classify) or label-word index (lm; -1 when unknown)."""
    loss_mask: torch.Tensor | None = None
    """(B, T) 1 on response tokens (lm only)."""

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device`` (itself when it is there already)."""
        loss_mask = None if self.loss_mask is None else self.loss_mask.to(device)
        moved = (t.to(device) for t in (self.input_ids, self.attention_mask, self.labels))
        return Batch(*moved, loss_mask)


def pool(h: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, d) -> (B, d): mean over real tokens, or the last real token."""
    if pooling == "mean":
        weights = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        return (h * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    last = attention_mask.sum(1) - 1  # (B,)
    return h[torch.arange(h.shape[0], device=h.device), last]


class ClassifyObjective(nn.Module):
    """Linear head over the pooled state; cross-entropy; accuracy."""

    def __init__(self, hidden_size: int, num_labels: int, pooling: str, seed: int = 0) -> None:
        super().__init__()
        self.pooling = pooling
        self.head = nn.Linear(hidden_size, num_labels)
        weight, bias = initial_head(hidden_size, num_labels, seed)
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)

    def features(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(B, d) float32: what the head reads, pooled in float32."""
        return pool(h.float(), batch.attention_mask, self.pooling)

    def logits(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(B, C) float32: the pooled features through the float32 head."""
        return self.head(self.features(h, batch))

    def loss(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(h, batch), batch.labels)

    @torch.no_grad()
    def score(self, h: torch.Tensor, batch: Batch) -> tuple[float, int, int]:
        """(summed loss, correct, count) for evaluation."""
        logits = self.logits(h, batch)
        loss = F.cross_entropy(logits, batch.labels, reduction="sum").item()
        correct = int((logits.argmax(-1) == batch.labels).sum())
        return loss, correct, batch.labels.numel()


class LMObjective(nn.Module):
    """Frozen final norm + LM head (streamed); loss on response tokens; label-word accuracy."""

    def __init__(self, lm_head: StreamedLMHead, label_token_ids: list[int]) -> None:
        super().__init__()
        self.lm_head = lm_head.requires_grad_(False)
        ids = torch.tensor(label_token_ids, device=lm_head.device)
        self.register_buffer("label_token_ids", ids, persistent=False)

    def _positions(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        # position p predicts token p+1: loss where token p+1 is a response token
        carries = batch.loss_mask[:, 1:].bool()  # (B, T-1)
        rows, cols = carries.nonzero(as_tuple=True)
        return rows, cols

    def _position_losses(self, h: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(n,) cross-entropy at every loss position, and (n,) the sample each belongs to."""
        rows, cols = self._positions(batch)
        targets = batch.input_ids[rows, cols + 1]  # (n,)
        return self.lm_head.cross_entropy(h[rows, cols], targets), rows

    def loss(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        losses, _ = self._position_losses(h, batch)
        return losses.sum() / max(losses.shape[0], 1)

    @torch.no_grad()
    def score(self, h: torch.Tensor, batch: Batch) -> tuple[float, int, int]:
        """(summed per-sample mean loss, correct label words, count)."""
        first = (
            batch.loss_mask.float().argmax(1) - 1
        )  # (B,) position predicting the 1st response token
        rows = torch.arange(h.shape[0], device=h.device)
        logits = self.lm_head.token_logits(h[rows, first], self.label_token_ids)  # (B, labels)
        correct = int((logits.argmax(-1) == batch.labels).sum())
        losses, owners = self._position_losses(h, batch)
        zeros = torch.zeros(h.shape[0], device=h.device)
        per_sample = zeros.index_add(0, owners, losses.float())
        counts = zeros.index_add(0, owners, torch.ones_like(losses.float()))
        loss = float((per_sample / counts.clamp_min(1.0)).sum())
        return loss, correct, h.shape[0]


def build_objective(
    model: StreamingModel,
    task: str,
    *,
    num_labels: int,
    label_token_ids: list[int] | None = None,
    seed: int = 0,
) -> ClassifyObjective | LMObjective:
    """The objective a run of ``task`` trains on ``model``: a linear head over the mean of
    the real tokens (encoders) or the last real token (decoders), drawn from ``seed``, on
    the model's device; or, for ``lm``, the model's own frozen, streamed LM head scoring
    ``label_token_ids``. Trainable tensors are float32 master weights."""
    if task == "classify":
        pooling = "mean" if model.config.family == "bert" else "last"
        head = ClassifyObjective(model.config.hidden_size, num_labels, pooling, seed=seed)
        return head.to(model.device)
    return LMObjective(model.streamed_lm_head(), label_token_ids)
