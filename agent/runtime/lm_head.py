"""``StreamedLMHead``: a decoder's final norm + LM head with the vocabulary read in slices.

The LM head is a small decoder's largest tensor (SmolLM2-135M: 49152 × 576, 108 MiB in
fp32, tied to the embeddings) and is frozen. Holding it for a whole chain made it the
larger part of a stage's peak memory, though the loss needs it only at the few positions
that carry loss. So the head is never held whole:

* ``cross_entropy`` reads the vocabulary ``rows_per_slice`` rows at a time, keeps a running
  log-sum-exp and the target logits, and reads the slices again in backward to form
  ``(softmax - onehot) · W``. Saved for backward: the n normed states and n log-sum-exps.
* ``token_logits`` reads only the rows of the tokens asked for (label words).

Guaranteed: the same loss and gradients as ``F.cross_entropy`` over the full head, up to
fp32 summation order; at most one slice of the head (and its mapped file pages) resident.
Logits are float32 whatever the compute dtype: the normed states and each slice are
upcast for the product (a slice's fp32 copy is transient).

Notation: n positions, d hidden, V vocabulary, S rows per slice.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from chainfed.agent.runtime.checkpoint import Checkpoint

SLICE_BYTES = 4 * 2**20
"""Bytes of one slice in the compute dtype: a slice and its mapped file pages are a
transient of every step, so the slice is kept small (SmolLM2's head: 27 slices)."""


class StreamedLMHead(nn.Module):
    """Frozen final norm (held) + LM head weight ``weight_name`` (read in slices)."""

    def __init__(
        self,
        norm: nn.Module,
        checkpoint: Checkpoint,
        weight_name: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        slice_bytes: int = SLICE_BYTES,
    ) -> None:
        super().__init__()
        self.norm = norm.requires_grad_(False)
        self.checkpoint = checkpoint
        self.weight_name = weight_name
        self.vocab_size, hidden = checkpoint.shape(weight_name)
        self.dtype, self.device = dtype, device
        self.rows_per_slice = max(1, slice_bytes // (hidden * dtype.itemsize))

    def slices(self) -> Iterator[tuple[int, int]]:
        """(start, stop) row ranges covering the vocabulary in order."""
        for start in range(0, self.vocab_size, self.rows_per_slice):
            yield start, min(start + self.rows_per_slice, self.vocab_size)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Head rows ``start:stop`` (S, d), freshly read."""
        return self.checkpoint.load_rows(
            self.weight_name, start, stop, dtype=self.dtype, device=self.device
        )

    def token_logits(self, h: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """(n, d) states -> (n, k) float32 logits of the k tokens ``token_ids`` only."""
        weight = torch.stack([self.rows(int(t), int(t) + 1)[0] for t in token_ids])  # (k, d)
        return self.norm(h).float() @ weight.float().T

    def cross_entropy(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(n, d) states, (n,) target ids -> (n,) per-position cross-entropy (fp32)."""
        return _StreamedCrossEntropy.apply(self.norm(h), targets, self)


class _StreamedCrossEntropy(torch.autograd.Function):
    """-log softmax(x Wᵀ)[target] with W read slice by slice, in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, targets: torch.Tensor, head: StreamedLMHead):
        n = x.shape[0]
        running_max = x.new_full((n,), float("-inf"), dtype=torch.float32)
        running_sum = x.new_zeros((n,), dtype=torch.float32)
        target_logit = x.new_zeros((n,), dtype=torch.float32)
        x32 = x.float()
        for start, stop in head.slices():
            logits = x32 @ head.rows(start, stop).float().T  # (n, S)
            new_max = torch.maximum(running_max, logits.max(1).values)
            running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(
                logits - new_max[:, None]
            ).sum(1)
            running_max = new_max
            inside = (targets >= start) & (targets < stop)
            target_logit[inside] = logits[inside, targets[inside] - start]
        lse = running_max + torch.log(running_sum)  # (n,)
        ctx.head = head
        ctx.save_for_backward(x, targets, lse)
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        x, targets, lse = ctx.saved_tensors
        x32 = x.float()
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for start, stop in ctx.head.slices():
            weight = ctx.head.rows(start, stop).float()  # (S, d)
            probs = torch.exp(x32 @ weight.T - lse[:, None])  # (n, S)
            inside = (targets >= start) & (targets < stop)
            probs[inside, targets[inside] - start] -= 1.0
            grad_x += (probs * grad_loss[:, None]) @ weight
        return grad_x.to(x.dtype), None, None
