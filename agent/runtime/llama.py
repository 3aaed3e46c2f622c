"""LLaMA-family blocks (LLaMA 2/3/3.1, Mistral, Qwen2, SmolLM2): pre-RMSNorm, RoPE, GQA, SwiGLU.

Notation: B batch, T sequence, d hidden, H query heads, Hkv key/value heads, Dh head
width, F feed-forward width, V vocabulary.

::

    h ─┬─ RMSNorm ─ q/k/v ─ RoPE ─ attention ─ o_proj ─(+)─┬─ RMSNorm ─ SwiGLU ─(+)─> h
       └──────────────────────────────────────────────────┘└────────────────────┘
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chainfed.agent.runtime.attention import (
    AttentionContext,
    apply_rope,
    attend,
    causal_padding_mask,
    rope_inverse_frequencies,
    rope_tables,
)
from chainfed.agent.runtime.checkpoint import TensorSpec, uninitialised_embedding
from chainfed.agent.runtime.model_config import ModelConfig

CHECKPOINT_PREFIXES = ("model.", "")


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 whatever the input dtype."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LlamaEmbeddings(nn.Module):
    """Token embedding lookup (positions enter through RoPE inside attention)."""

    def __init__(self, *, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.word = uninitialised_embedding(vocab_size, hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.word(input_ids.to(self.word.weight.device))  # (B, T, d)


class LlamaBlock(nn.Module):
    """One decoder layer: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        intermediate_size: int,
        eps: float,
        qkv_bias: bool,
        o_bias: bool,
        mlp_bias: bool,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.attn_norm = RMSNorm(hidden_size, eps)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        self.ffn_norm = RMSNorm(hidden_size, eps)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=mlp_bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=mlp_bias)

    def forward(self, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return self.ffn_half(self.attention_half(h, ctx))

    def attention_half(self, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """h + attn(norm(h)): (B, T, d) -> (B, T, d).

        A method of its own so that the chain's recompute can run backward through one
        half of the block at a time (``chainfed.agent.training.chain._RecomputedBlock``)."""
        B, T, _ = h.shape
        x = self.attn_norm(h)
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B,H,T,Dh)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = ctx.rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return h + self.o_proj(attend(q, k, v, ctx.mask))  # (B, T, d)

    def ffn_half(self, h: torch.Tensor) -> torch.Tensor:
        """h + mlp(norm(h)): (B, T, d) -> (B, T, d)."""
        x = self.ffn_norm(h)
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, d)


class LlamaHead(nn.Module):
    """Final RMSNorm and LM head: (B, T, d) -> (B, T, V)."""

    def __init__(self, *, hidden_size: int, vocab_size: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))


def build_embeddings(cfg: ModelConfig) -> LlamaEmbeddings:
    return LlamaEmbeddings(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size)


def build_block(cfg: ModelConfig) -> LlamaBlock:
    return LlamaBlock(
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        eps=cfg.norm_eps,
        qkv_bias=cfg.qkv_bias,
        o_bias=cfg.o_bias,
        mlp_bias=cfg.mlp_bias,
    )


def build_head(cfg: ModelConfig) -> LlamaHead:
    return LlamaHead(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, eps=cfg.norm_eps)


def embedding_tensors(cfg: ModelConfig, prefix: str) -> TensorSpec:
    return {"word.weight": (f"{prefix}embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))}


def block_tensors(cfg: ModelConfig, prefix: str, index: int) -> TensorSpec:
    d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    p = f"{prefix}layers.{index}."
    spec: TensorSpec = {
        "attn_norm.weight": (f"{p}input_layernorm.weight", (d,)),
        "ffn_norm.weight": (f"{p}post_attention_layernorm.weight", (d,)),
    }
    linears = {
        "q_proj": ("self_attn.q_proj", (q, d), cfg.qkv_bias),
        "k_proj": ("self_attn.k_proj", (kv, d), cfg.qkv_bias),
        "v_proj": ("self_attn.v_proj", (kv, d), cfg.qkv_bias),
        "o_proj": ("self_attn.o_proj", (d, q), cfg.o_bias),
        "gate_proj": ("mlp.gate_proj", (f, d), cfg.mlp_bias),
        "up_proj": ("mlp.up_proj", (f, d), cfg.mlp_bias),
        "down_proj": ("mlp.down_proj", (d, f), cfg.mlp_bias),
    }
    for ours, (theirs, shape, has_bias) in linears.items():
        spec[f"{ours}.weight"] = (f"{p}{theirs}.weight", shape)
        if has_bias:
            spec[f"{ours}.bias"] = (f"{p}{theirs}.bias", shape[:1])
    return spec


def head_tensors(cfg: ModelConfig, prefix: str) -> TensorSpec:
    shape = (cfg.vocab_size, cfg.hidden_size)
    lm_head = f"{prefix}embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    return {
        "norm.weight": (f"{prefix}norm.weight", (cfg.hidden_size,)),
        "lm_head.weight": (lm_head, shape),
    }


def attention_context(
    cfg: ModelConfig, attention_mask: torch.Tensor, dtype: torch.dtype
) -> AttentionContext:
    """Causal attention over real tokens, with RoPE tables for positions 0..T-1."""
    inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    return AttentionContext(
        mask=causal_padding_mask(attention_mask, dtype),
        rope=rope_tables(attention_mask.shape[1], inv_freq, dtype, attention_mask.device),
    )


def embedding_key(prefix: str) -> str:
    """A tensor name that identifies the checkpoint prefix of this family."""
    return f"{prefix}embed_tokens.weight"
