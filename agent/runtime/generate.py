"""Decoding (greedy or sampled) with our own blocks, for quick checks of a decoder and its
adapters.

Every block stays resident while decoding (a few hundred MiB for SmolLM2) and the whole
sequence is recomputed each step: no KV cache, which keeps this path a plain reuse of the
training blocks. It is a correctness tool, not a serving engine.
"""

from __future__ import annotations

import torch

from chainfed.agent.runtime.model import StreamingModel


@torch.no_grad()
def generate(
    model: StreamingModel,
    prompt_ids: list[int],
    *,
    max_new_tokens: int = 16,
    stop_ids: set[int] | None = None,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[int]:
    """The ids decoding appends to ``prompt_ids`` (stops after a stop id): greedy, or
    with ``temperature > 0`` sampled from ``softmax(logits / temperature)`` with a CPU
    generator seeded by ``seed`` (the float32 probabilities are drawn from on the CPU, so
    a seed samples alike on every device)."""
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    embeddings = model.load_embeddings()
    blocks = [model.load_block(i) for i in range(model.num_layers)]
    head = model.load_lm_head()
    ids = torch.tensor([prompt_ids], device=model.device)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        mask = torch.ones_like(ids)
        ctx = model.attention_context(mask)
        h = embeddings(ids, mask)  # (1, T, d)
        for block in blocks:
            h = block(h, ctx)
        logits = head(h[:, -1])  # (1, V): logits only at the last position
        if generator is None:
            next_id = int(logits.argmax(-1))
        else:
            probs = (logits.float() / temperature).softmax(-1).cpu()
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        generated.append(next_id)
        if stop_ids and next_id in stop_ids:
            break
        ids = torch.cat([ids, torch.tensor([[next_id]], device=model.device)], dim=1)
    return generated
