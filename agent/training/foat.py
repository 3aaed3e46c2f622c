"""Function-Oriented Adaptive Tuning: where the chain starts (DESIGN.md §3).

One streaming forward pass over a mini-batch computes, per block i, the linear CKA
between block i's output and a reference representation over the real tokens. Layers
whose output still resembles the reference are general-purpose and stay frozen; the
chain starts at the first block whose CKA falls below the threshold. The scores are
returned so a coordinator can average them across agents (weighted by samples).

The reference and what is compared depend on the family, because the raw rule only
works for encoders:

* **bert** (post-norm): every block output is already layer-normalised, which is what
  the next block reads; the reference is the embedding output.
* **llama** (pre-norm decoders): a block reads ``RMSNorm(h)``, so the scale of each
  token's residual state carries nothing the model uses, yet a few tokens (the first
  position, delimiters) hold *massive activations* hundreds of times the median norm
  that own a raw linear CKA: on SmolLM2 it reads ~0.05 at every layer from 11 to 28.
  So every compared row is RMS-normalised per token. And the first block of a decoder
  turns token embeddings (tied to the output vocabulary on SmolLM2) into the residual
  basis every later block uses: even normalised, its output scores only ~0.73 against
  the embeddings, so the rule would always start at layer 0. The reference is that
  first block's output, whose score is 1 by construction (block 0 always stays frozen
  unless ``--start-layer`` says otherwise).

CKA says where a layer stops being general-purpose, not whether a stage there can train
toward the task. When the task is read by the model's own frozen output head (``lm``),
a stage whose newest layer is i trains block i's output to be read by that head, and a
decoder's middle layers are unreadable by it (on SmolLM2, CKA falls below 0.8 at layer
10, while the head reads the label words from block i's output only from layer 24 on:
benchmarks/README.md, "FOAT on SmolLM2"). So the same pass also records each layer's
**readout loss**, and ``choose_start_layer`` starts no lower than the first layer from
which every layer is readable (``first_readable_layer``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.cka import linear_cka, masked_token_rows
from chainfed.agent.training.objectives import Batch, ClassifyObjective, LMObjective


@dataclass(frozen=True)
class LayerProbe:
    """FOAT's per-layer statistics of one mini-batch, i = 0..L-1."""

    cka_scores: list[float]
    """CKA(output of block i, the family's reference)."""
    readout_losses: list[float]
    """The task loss with the model's own frozen output head reading block i's output;
    empty when the task head is trained (classify): it reads nothing before it is."""


@torch.no_grad()
def probe_layers(
    model: StreamingModel, batch: Batch, objective: ClassifyObjective | LMObjective
) -> LayerProbe:
    """One streamed pass (``stream_blocks``) over ``batch``: CKA of every block's output
    against the reference (the embedding output on bert, block 0's output on llama), and,
    for an ``LMObjective``, every block's readout loss."""
    batch = batch.to(model.device)
    input_ids, attention_mask = batch.input_ids, batch.attention_mask
    decoder = model.config.family == "llama"
    reads = isinstance(objective, LMObjective)

    def rows(hidden: torch.Tensor) -> torch.Tensor:
        token_rows = masked_token_rows(hidden, attention_mask)
        return rms_normalised(token_rows) if decoder else token_rows

    ctx = model.attention_context(attention_mask)
    h = model.load_embeddings()(input_ids, attention_mask)  # (B, T, d)
    reference = None if decoder else rows(h)
    scores, readouts = [], []
    for _, block in model.stream_blocks(range(model.num_layers)):
        h = block(h, ctx)
        del block
        current = rows(h)
        if reference is None:
            reference = current
        scores.append(linear_cka(current, reference))
        if reads:
            readouts.append(float(objective.loss(h, batch)))
    return LayerProbe(scores, readouts)


def rms_normalised(token_rows: torch.Tensor) -> torch.Tensor:
    """Each row ``(n, d)`` divided by its root mean square, in float32: what a pre-norm
    block reads, without the norm's learned gain."""
    x = token_rows.float()
    return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True).clamp_min(1e-12))
