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
"""

from __future__ import annotations

import torch

from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.cka import linear_cka, masked_token_rows


@torch.no_grad()
def probe_cka(
    model: StreamingModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> list[float]:
    """CKA(output of block i, reference) for i = 0..L-1, streamed (``stream_blocks``);
    the reference is the embedding output (bert) or block 0's output (llama)."""
    decoder = model.config.family == "llama"

    def rows(hidden: torch.Tensor) -> torch.Tensor:
        token_rows = masked_token_rows(hidden, attention_mask)
        return rms_normalised(token_rows) if decoder else token_rows

    ctx = model.attention_context(attention_mask)
    h = model.load_embeddings()(input_ids, attention_mask)  # (B, T, d)
    reference = None if decoder else rows(h)
    scores = []
    for _, block in model.stream_blocks(range(model.num_layers)):
        h = block(h, ctx)
        del block
        current = rows(h)
        if reference is None:
            reference = current
        scores.append(linear_cka(current, reference))
    return scores


def rms_normalised(token_rows: torch.Tensor) -> torch.Tensor:
    """Each row ``(n, d)`` divided by its root mean square, in float32: what a pre-norm
    block reads, without the norm's learned gain."""
    x = token_rows.float()
    return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True).clamp_min(1e-12))
