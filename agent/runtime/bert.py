"""BERT-family blocks (BERT, RoBERTa, XLM-R, MiniLM): post-LN, GELU, absolute positions.

Notation: B batch, T sequence, d hidden, H heads, Dh head width, F feed-forward width.

Each block is a plain module whose linear layers carry our names (``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``, ``up_proj``, ``down_proj``) so LoRA targets read the same in both
families; ``*_tensors`` functions map those names to the checkpoint's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chainfed.agent.runtime.attention import AttentionContext, attend, padding_mask
from chainfed.agent.runtime.checkpoint import TensorSpec, uninitialised_embedding
from chainfed.agent.runtime.model_config import ModelConfig

CHECKPOINT_PREFIXES = ("", "bert.", "roberta.")

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class BertEmbeddings(nn.Module):
    """Token + position + segment embeddings, then LayerNorm."""

    def __init__(
        self,
        *,
        vocab_size: int,
        hidden_size: int,
        max_positions: int,
        type_vocab_size: int,
        position_offset: int,
        eps: float,
    ) -> None:
        super().__init__()
        self.word = uninitialised_embedding(vocab_size, hidden_size)
        self.position = uninitialised_embedding(max_positions, hidden_size)
        self.token_type = uninitialised_embedding(type_vocab_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.position_offset = position_offset

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = self.word.weight.device  # ids and mask may come from the CPU
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if self.position_offset:
            # RoBERTa: real tokens count up from pad_id + 1; padding keeps pad_id.
            mask = attention_mask.long()
            positions = torch.cumsum(mask, dim=1) * mask + (self.position_offset - 1)
        else:
            T = input_ids.shape[1]
            positions = torch.arange(T, device=input_ids.device)[None, :]  # (1, T)
        h = self.word(input_ids) + self.position(positions)  # (B, T, d)
        h = h + self.token_type.weight[0]  # single-segment input: type id 0 everywhere
        return self.norm(h)


class BertBlock(nn.Module):
    """Self-attention and feed-forward, each followed by residual add and LayerNorm."""

    def __init__(
        self, *, hidden_size: int, num_heads: int, intermediate_size: int, eps: float, act: str
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)
        self.attn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.up_proj = nn.Linear(hidden_size, intermediate_size)
        self.down_proj = nn.Linear(intermediate_size, hidden_size)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.act = _ACTIVATIONS[act]
        self.dropout = 0.0
        """Dropout probability in training mode, as BERT trains with its
        ``attention_probs_dropout_prob`` and ``hidden_dropout_prob``: on the attention
        probabilities and on each half's output before its residual add. 0 (the default,
        and always in eval mode) computes exactly the dropout-free block; a trainer sets it
        on the blocks it trains (``ChainConfig.backbone_dropout``)."""

    def forward(self, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return self.ffn_half(self.attention_half(h, ctx))

    def attention_half(self, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Self-attention, residual add and LayerNorm: (B, T, d) -> (B, T, d).

        A method of its own so that the chain's recompute can run backward through one
        half of the block at a time (``chainfed.agent.training.chain._RecomputedBlock``)."""
        B, T, d = h.shape
        heads = (B, T, self.num_heads, d // self.num_heads)
        q = self.q_proj(h).view(heads).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(h).view(heads).transpose(1, 2)
        v = self.v_proj(h).view(heads).transpose(1, 2)
        p = self._dropout_p()
        out = self.o_proj(attend(q, k, v, ctx.mask, dropout=p))  # (B, T, d)
        return self.attn_norm(h + _drop(out, p))

    def ffn_half(self, h: torch.Tensor) -> torch.Tensor:
        """Feed-forward, residual add and LayerNorm: (B, T, d) -> (B, T, d)."""
        out = self.down_proj(self.act(self.up_proj(h)))  # (B, T, d)
        return self.ffn_norm(h + _drop(out, self._dropout_p()))

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0


def _drop(x: torch.Tensor, p: float) -> torch.Tensor:
    """``x`` with dropout ``p``; ``x`` itself at 0 (no generator draw, no copy)."""
    return F.dropout(x, p) if p > 0 else x


def build_embeddings(cfg: ModelConfig) -> BertEmbeddings:
    return BertEmbeddings(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        max_positions=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        position_offset=cfg.position_offset,
        eps=cfg.norm_eps,
    )


def build_block(cfg: ModelConfig) -> BertBlock:
    return BertBlock(
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        eps=cfg.norm_eps,
        act=cfg.hidden_act,
    )


def embedding_tensors(cfg: ModelConfig, prefix: str) -> TensorSpec:
    d = cfg.hidden_size
    p = f"{prefix}embeddings."
    return {
        "word.weight": (f"{p}word_embeddings.weight", (cfg.vocab_size, d)),
        "position.weight": (
            f"{p}position_embeddings.weight",
            (cfg.max_position_embeddings, d),
        ),
        "token_type.weight": (f"{p}token_type_embeddings.weight", (cfg.type_vocab_size, d)),
        "norm.weight": (f"{p}LayerNorm.weight", (d,)),
        "norm.bias": (f"{p}LayerNorm.bias", (d,)),
    }


def block_tensors(cfg: ModelConfig, prefix: str, index: int) -> TensorSpec:
    d, f = cfg.hidden_size, cfg.intermediate_size
    p = f"{prefix}encoder.layer.{index}."
    linears = {
        "q_proj": ("attention.self.query", (d, d)),
        "k_proj": ("attention.self.key", (d, d)),
        "v_proj": ("attention.self.value", (d, d)),
        "o_proj": ("attention.output.dense", (d, d)),
        "up_proj": ("intermediate.dense", (f, d)),
        "down_proj": ("output.dense", (d, f)),
    }
    spec: TensorSpec = {}
    for ours, (theirs, shape) in linears.items():
        spec[f"{ours}.weight"] = (f"{p}{theirs}.weight", shape)
        spec[f"{ours}.bias"] = (f"{p}{theirs}.bias", shape[:1])
    for ours, theirs in (
        ("attn_norm", "attention.output.LayerNorm"),
        ("ffn_norm", "output.LayerNorm"),
    ):
        spec[f"{ours}.weight"] = (f"{p}{theirs}.weight", (d,))
        spec[f"{ours}.bias"] = (f"{p}{theirs}.bias", (d,))
    return spec


def attention_context(
    cfg: ModelConfig, attention_mask: torch.Tensor, dtype: torch.dtype
) -> AttentionContext:
    """Bidirectional attention over real tokens."""
    return AttentionContext(mask=padding_mask(attention_mask, dtype))


def embedding_key(prefix: str) -> str:
    """A tensor name that identifies the checkpoint prefix of this family."""
    return f"{prefix}embeddings.word_embeddings.weight"
