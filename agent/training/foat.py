"""Function-Oriented Adaptive Tuning: where the chain starts (DESIGN.md §3).

One streaming forward pass over a mini-batch computes, per block i, the linear CKA
between block i's output and the embedding output over the real tokens. Layers whose
output still resembles the embeddings are general-purpose and stay frozen; the chain
starts at the first block whose CKA falls below the threshold. The scores are returned
so a coordinator can average them across agents (weighted by samples).
"""

from __future__ import annotations

import torch

from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.cka import linear_cka, masked_token_rows


@torch.no_grad()
def probe_cka(
    model: StreamingModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> list[float]:
    """CKA(output of block i, embedding output) for i = 0..L-1, one block resident at a time."""
    ctx = model.attention_context(attention_mask)
    h = model.load_embeddings()(input_ids, attention_mask)  # (B, T, d)
    reference = masked_token_rows(h, attention_mask)
    scores = []
    for index in range(model.num_layers):
        h = model.load_block(index)(h, ctx)
        scores.append(linear_cka(masked_token_rows(h, attention_mask), reference))
    return scores
