"""``ModelConfig``: the architecture facts the runtime needs, read from an HF ``config.json``.

Two families cover the supported models (DESIGN.md §2):

* ``bert``  — BERT, RoBERTa, XLM-R, MiniLM: post-LN, GELU, absolute positions.
* ``llama`` — LLaMA 2/3/3.1, Mistral, Qwen2 (qkv bias), SmolLM2 (tied embeddings):
  pre-RMSNorm, RoPE, grouped-query attention, SwiGLU.

Everything else is refused with a message naming what was found and what is supported.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chainfed.agent.errors import ModelLoadError

# HF ``model_type`` -> family.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model; immutable once read."""

    family: str
    """``"bert"`` or ``"llama"``: which block implementation runs the model."""
    model_type: str
    """The HF ``model_type`` the config declared (``bert``, ``roberta``, ``qwen2`` …)."""
    num_layers: int
    """Number of transformer blocks L; layers are indexed 0..L-1."""
    hidden_size: int
    """Residual stream width d."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (< num_heads for grouped-query attention)."""
    head_dim: int
    """Width of one attention head."""
    intermediate_size: int
    """Feed-forward inner width."""
    vocab_size: int
    """Rows of the token embedding."""
    norm_eps: float
    """Epsilon of LayerNorm (bert) or RMSNorm (llama)."""
    hidden_act: str
    """Feed-forward activation (``gelu`` for bert, ``silu`` for llama's SwiGLU)."""
    max_position_embeddings: int
    """Longest sequence the positions support."""
    pad_token_id: int | None = None
    """Padding id, if the config names one."""
    # bert family
    type_vocab_size: int = 0
    """Segment (token type) embedding rows; bert family only."""
    position_offset: int = 0
    """First position id: 0 for BERT, ``pad_token_id + 1`` for RoBERTa-style models."""
    # llama family
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: dict[str, Any] | None = None
    """HF ``rope_scaling`` (``rope_type`` linear or llama3 with its fields), or None."""
    qkv_bias: bool = False
    """Whether q/k/v projections carry a bias (Qwen2, or LLaMA with attention_bias)."""
    o_bias: bool = False
    """Whether the attention output projection carries a bias (LLaMA attention_bias)."""
    mlp_bias: bool = False
    """Whether the SwiGLU projections carry biases."""
    tie_word_embeddings: bool = False
    """LM head shares the token embedding matrix (SmolLM2)."""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The config.json as read, for export and fingerprints."""

    def __post_init__(self) -> None:
        if self.family not in ("bert", "llama"):
            raise ValueError(f"unknown family {self.family!r}")
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"activation {self.hidden_act!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )

    @property
    def q_size(self) -> int:
        """Output width of the query projection."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Output width of each of the key and value projections."""
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (without ``raw``)."""
        data = asdict(self)
        data.pop("raw")
        return data

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Read an HF config dict; ``source`` names the file in error messages."""
        model_type = hf.get("model_type")
        family = SUPPORTED_MODEL_TYPES.get(str(model_type))
        if family is None:
            archs = hf.get("architectures") or []
            raise ModelLoadError(
                f"{source}: unsupported architecture model_type={model_type!r} "
                f"(architectures={archs}); supported model types: "
                f"{', '.join(f'{t} ({f})' for t, f in SUPPORTED_MODEL_TYPES.items())}"
            )
        try:
            return cls._from_hf_family(hf, family, str(model_type))
        except KeyError as exc:
            raise ModelLoadError(f"{source}: required field {exc.args[0]!r} is missing") from exc
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{source}: invalid value: {exc}") from exc

    @classmethod
    def _from_hf_family(cls, hf: dict[str, Any], family: str, model_type: str) -> ModelConfig:
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        common = dict(
            family=family,
            model_type=model_type,
            num_layers=int(hf["num_hidden_layers"]),
            hidden_size=hidden,
            num_heads=heads,
            head_dim=int(hf.get("head_dim") or hidden // heads),
            intermediate_size=int(hf["intermediate_size"]),
            vocab_size=int(hf["vocab_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            pad_token_id=hf.get("pad_token_id"),
            raw=dict(hf),
        )
        if family == "bert":
            roberta_like = model_type in ("roberta", "xlm-roberta")
            pad = hf.get("pad_token_id")
            return cls(
                **common,
                num_kv_heads=heads,
                norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
                hidden_act=str(hf.get("hidden_act", "gelu")),
                type_vocab_size=int(hf.get("type_vocab_size", 2)),
                position_offset=int(pad) + 1 if roberta_like and pad is not None else 0,
            )
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"rope_scaling type {rope_type!r} is not supported; "
                    f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
                )
            rope_scaling = {**rope_scaling, "rope_type": rope_type}
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            **common,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            hidden_act=str(hf.get("hidden_act", "silu")),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling,
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )

    @classmethod
    def load(cls, model_dir: Path) -> ModelConfig:
        """Read ``model_dir/config.json``."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{path}: config.json not found (is {model_dir} a model folder?)")
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path}: cannot read config.json: {exc}") from exc
        if not isinstance(hf, dict):
            raise ModelLoadError(f"{path}: config.json is not a JSON object")
        return cls.from_hf(hf, source=str(path))
