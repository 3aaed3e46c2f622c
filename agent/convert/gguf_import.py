"""Turn a LLaMA-family GGUF checkpoint into an HF-layout model folder (DESIGN.md §2).

``chainfed convert-gguf`` lands here. Everything comes from the GGUF file itself; nothing is
fetched from a model hub and ``transformers`` is not imported (it is the test-only reference).

What the folder holds::

    out_dir/
      config.json              LlamaConfig fields, read from the GGUF metadata
      model.safetensors        HF tensor names, float32, dequantised with the `gguf` package
      tokenizer.json           byte-level BPE rebuilt from the GGUF vocabulary and merges
      tokenizer_config.json    special token strings, add_bos/add_eos flags, chat template
      generation_config.json   bos / eos / pad ids
      gguf_import.json         provenance: which file this folder was converted from

Choices, each made to match what ``transformers`` builds when it loads the same file with
``from_pretrained(folder, gguf_file=name)``, so that our tensors and token ids equal the ones the
parity tests compare against:

* **Q and K rows.** llama.cpp permutes the rows of ``attn_q`` / ``attn_k`` so that its RoPE
  rotates adjacent pairs ``(x0, x1), (x2, x3), ...``; HF rotates the two halves of each head. Per
  head, llama.cpp stores at row ``2i + j`` what HF has at row ``j * head_dim/2 + i``;
  :func:`unpermute_rope_rows` undoes it (for K with the number of KV heads).
* **Tied embeddings.** llama.cpp writes ``output.weight`` only when the LM head is not the
  embedding matrix, so its absence means ``tie_word_embeddings: true`` and no ``lm_head.weight``.
* **Floats.** GGUF stores rms_norm_eps, rope_theta and scaling factors as float32. We write the
  shortest decimal that round-trips to the same float32 (``1e-05``, not ``9.999999747378752e-06``
  as transformers does); both are the same float32, so the arithmetic is identical.
* **Tokenizer.** Rebuilt by :mod:`chainfed.agent.convert.gguf_tokenizer` (see there): only
  byte-level BPE (``tokenizer.ggml.model == "gpt2"``: SmolLM2, Llama 3, ...) is supported;
  sentencepiece GGUFs (LLaMA 2, Mistral 7B) raise :class:`ModelLoadError`. That module also
  documents the one known deviation from llama.cpp (how ``smollm`` splits a whitespace run
  before a digit), kept on purpose for parity with transformers.

Safety: the folder is written into a hidden temporary folder next to ``out_dir`` and renamed into
place at the end, so a failed or interrupted conversion never leaves ``out_dir`` looking valid.
An existing ``out_dir`` is replaced only when it is empty or a previous conversion (it holds
``gguf_import.json``); any other non-empty folder is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from chainfed.agent.convert.gguf_tokenizer import build_tokenizer
from chainfed.agent.convert.staged_folder import staged_folder
from chainfed.agent.errors import ModelLoadError
from chainfed.agent.runtime.safetensors_io import header_bytes

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)
"""Values of the GGUF key ``general.architecture`` this importer converts."""

MARKER_FILE = "gguf_import.json"
"""Written into every converted folder; its presence lets a later conversion replace the folder."""

_GGUF_MAGIC = b"GGUF"

# GGUF name -> HF name, outside the blocks and inside block i (``blk.{i}.<key>``).
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(.+)")


def convert_gguf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Convert a LLaMA-family GGUF file into an HF-layout folder; return its absolute path.

    Args:
        gguf_path: the ``.gguf`` checkpoint (any tensor type the ``gguf`` package dequantises).
        out_dir: folder to create. It may exist if it is empty or a previous conversion (holds
            ``gguf_import.json``); it is then replaced as a whole, atomically.
        progress: show a tqdm bar over the tensors while they are dequantised and written.

    Raises:
        ModelLoadError: the file is missing, not a GGUF, truncated or corrupt, of an unsupported
            architecture / tokenizer / tensor layout, or ``out_dir`` is a non-empty folder that is
            not a previous conversion. The message names the path and the problem.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir).resolve()
    started = time.perf_counter()
    source = _GgufFile.open(gguf_path)
    config = _llama_config(source)
    tensors = _plan_tensors(source, config)
    tokenizer, tokenizer_config = build_tokenizer(source)
    with staged_folder(
        out_dir, marker=MARKER_FILE, what="a previous GGUF conversion", error=ModelLoadError
    ) as staging:
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(staging / "tokenizer_config.json", tokenizer_config)
        _write_json(staging / "generation_config.json", _generation_config(config))
        _write_safetensors(staging / "model.safetensors", tensors, source, progress=progress)
        _write_json(staging / "config.json", config)
        _write_json(staging / MARKER_FILE, _provenance(source))
    logger.info(
        "converted %s -> %s (%d tensors) in %.1f s",
        gguf_path,
        out_dir,
        len(tensors),
        time.perf_counter() - started,
    )
    return out_dir


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's RoPE row permutation of a Q or K projection (rows = n_heads * head_dim).

    llama.cpp's converter does ``w.reshape(n_heads, 2, head_dim // 2, ...).swapaxes(1, 2)``; this is
    its inverse, the same operation transformers' GGUF loader applies.
    """
    half = weight.shape[0] // n_heads // 2
    rows = weight.reshape(n_heads, half, 2, *weight.shape[1:])  # (h, hd/2, 2, d)
    return rows.swapaxes(1, 2).reshape(weight.shape)  # (h, 2, hd/2, d) -> (h*hd, d)


# --------------------------------------------------------------------------- reading the file


@dataclass
class _GgufFile:
    """An opened GGUF file with metadata accessors whose errors name the file (it is the
    ``GgufMetadata`` that ``gguf_tokenizer.build_tokenizer`` reads)."""

    path: Path
    reader: Any  # gguf.GGUFReader

    @classmethod
    def open(cls, path: Path) -> _GgufFile:
        import gguf  # imported here: the module is cheap to import where GGUF is never used

        if not path.exists():
            raise ModelLoadError(f"{path}: GGUF file not found")
        if not path.is_file():
            raise ModelLoadError(f"{path}: not a file")
        with path.open("rb") as handle:
            magic = handle.read(len(_GGUF_MAGIC))
        if magic != _GGUF_MAGIC:
            raise ModelLoadError(
                f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')"
            )
        try:
            reader = gguf.GGUFReader(path)
        except Exception as error:  # the reader signals a short/corrupt file with assorted errors
            raise ModelLoadError(f"{path}: truncated or corrupt GGUF file ({error})") from error
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ModelLoadError(
                    f"{path}: truncated GGUF file (tensor {tensor.name} ends past EOF)"
                )
        return cls(path=path, reader=reader)

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as error:
            raise ModelLoadError(
                f"{self.path}: unreadable GGUF metadata {key!r} ({error})"
            ) from error

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelLoadError(f"{self.path}: GGUF metadata has no {key!r}")
        return value

    def require_int(self, key: str, *, minimum: int = 1) -> int:
        value = self.get_int(key, minimum=minimum)
        if value is None:
            raise ModelLoadError(f"{self.path}: GGUF metadata has no {key!r}")
        return value

    def get_int(self, key: str, default: int | None = None, *, minimum: int = 0) -> int | None:
        """An integer entry of at least ``minimum``; anything else names the key."""
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, list):  # e.g. a per-layer KV head count
            raise ModelLoadError(f"{self.path}: per-layer {key!r} is not supported (got a list)")
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ModelLoadError(f"{self.path}: GGUF metadata {key!r} is {value!r}, not an integer")
        if value < minimum:
            raise ModelLoadError(f"{self.path}: GGUF metadata {key!r} is {value}, below {minimum}")
        return int(value)

    def get_float(self, key: str, default: float | None = None) -> float | None:
        """A finite number entry (stored as float32: its shortest round-tripping decimal)."""
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise ModelLoadError(f"{self.path}: GGUF metadata {key!r} is {value!r}, not a number")
        if not math.isfinite(value):
            raise ModelLoadError(f"{self.path}: GGUF metadata {key!r} is {value}")
        return _f32(value)

    def get_str(self, key: str) -> str | None:
        value = self.get(key)
        if value is not None and not isinstance(value, str):
            raise ModelLoadError(f"{self.path}: GGUF metadata {key!r} is {value!r}, not a string")
        return value

    def get_list(self, key: str, kind: type, *, required: bool = False) -> list | None:
        """A list entry whose elements are all ``kind`` (``int`` or ``str``)."""
        value = self.require(key) if required else self.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(
            isinstance(v, kind) and not isinstance(v, bool) for v in value
        ):
            raise ModelLoadError(
                f"{self.path}: GGUF metadata {key!r} is not a list of {kind.__name__}"
            )
        return value


def _f32(value: float) -> float:
    """The shortest decimal that round-trips to the same float32 (GGUF floats are float32)."""
    return float(str(np.float32(value)))


def _llama_config(source: _GgufFile) -> dict[str, Any]:
    """HF LlamaConfig fields from the GGUF metadata."""
    path = source.path
    architecture = source.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: unsupported GGUF architecture {architecture!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def key(name: str) -> str:
        return f"{architecture}.{name}"

    hidden = source.require_int(key("embedding_length"))
    n_heads = source.require_int(key("attention.head_count"))
    n_kv_heads = source.get_int(key("attention.head_count_kv"), n_heads, minimum=1)
    head_dim = source.get_int(key("attention.key_length"), hidden // n_heads, minimum=1)
    value_dim = source.get_int(key("attention.value_length"), head_dim)
    rope_dim = source.get_int(key("rope.dimension_count"), head_dim)
    if value_dim != head_dim or rope_dim != head_dim:
        raise ModelLoadError(
            f"{path}: head_dim {head_dim} with value length {value_dim} and rotary width "
            f"{rope_dim} is not a plain LLaMA layout (partial RoPE and distinct value heads "
            "are not supported)"
        )
    if n_heads % n_kv_heads:
        raise ModelLoadError(
            f"{path}: {n_heads} attention heads not divisible by {n_kv_heads} KV heads"
        )
    if head_dim % 2:
        raise ModelLoadError(f"{path}: odd head_dim {head_dim} cannot carry RoPE")

    tensor_names = {tensor.name for tensor in source.reader.tensors}
    embedding = next((t for t in source.reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ModelLoadError(f"{path}: no token_embd.weight tensor")
    vocab_size = int(embedding.shape[-1])  # ggml shape is (hidden, vocab)
    stated_vocab = source.get_int(key("vocab_size"))
    if stated_vocab is not None and stated_vocab != vocab_size:
        raise ModelLoadError(
            f"{path}: {key('vocab_size')}={stated_vocab} but token_embd.weight has "
            f"{vocab_size} rows"
        )

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": source.require_int(key("feed_forward_length")),
        "num_hidden_layers": source.require_int(key("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": source.get_float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": source.get_float(key("rope.freq_base"), 10000.0),
        "vocab_size": vocab_size,
        "max_position_embeddings": source.require_int(key("context_length")),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": source.get_int("tokenizer.ggml.bos_token_id"),
        "eos_token_id": source.get_int("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    if config["rms_norm_eps"] is None:
        raise ModelLoadError(
            f"{path}: GGUF metadata has no {key('attention.layer_norm_rms_epsilon')!r}"
        )
    pad_id = source.get_int("tokenizer.ggml.padding_token_id")
    if pad_id is not None:
        config["pad_token_id"] = pad_id
    rope_scaling = _rope_scaling(source, architecture)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(source: _GgufFile, architecture: str) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from ``<arch>.rope.scaling.*`` (none, linear or yarn)."""

    def key(name: str) -> str:
        return f"{architecture}.rope.{name}"

    if any(tensor.name == "rope_freqs.weight" for tensor in source.reader.tensors):
        raise ModelLoadError(
            f"{source.path}: per-dimension RoPE frequency factors (rope_freqs.weight, Llama 3.1+ "
            "'llama3' rope scaling) are not supported"
        )
    kind = source.get_str(key("scaling.type"))
    factor = source.get_float(key("scaling.factor"))
    if kind is None and source.get(key("scale_linear")) is not None:  # older files
        kind, factor = "linear", source.get_float(key("scale_linear"))
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        if factor is None:
            raise ModelLoadError(
                f"{source.path}: yarn RoPE scaling without {key('scaling.factor')!r}"
            )
        scaling = {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": source.require_int(
                key("scaling.original_context_length")
            ),
        }
        for gguf_key, hf_key in (
            ("scaling.attn_factor", "attention_factor"),
            ("scaling.yarn_beta_fast", "beta_fast"),
            ("scaling.yarn_beta_slow", "beta_slow"),
        ):
            if (value := source.get_float(key(gguf_key))) is not None:
                scaling[hf_key] = value
        return scaling
    raise ModelLoadError(
        f"{source.path}: unsupported RoPE scaling type {kind!r} (supported: linear, yarn)"
    )


# --------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class _TensorPlan:
    """One output tensor: its GGUF index, HF name and shape, and the RoPE heads to unpermute."""

    index: int  # position in reader.tensors
    name: str
    shape: tuple[int, ...]
    rope_heads: int | None


def _plan_tensors(source: _GgufFile, config: dict[str, Any]) -> list[_TensorPlan]:
    """Map every GGUF tensor to its HF name and check the set and the shapes against the config."""
    path = source.path
    n_layers = config["num_hidden_layers"]
    if n_layers * len(_BLOCK_TENSORS) > len(source.reader.tensors):
        raise ModelLoadError(
            f"{path}: block_count {n_layers} needs {n_layers * len(_BLOCK_TENSORS)} block "
            f"tensors; the file holds {len(source.reader.tensors)} tensors in all"
        )
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    expected_block = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_rows, hidden),
        "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden),
        "self_attn.o_proj.weight": (hidden, q_rows),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    expected = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        expected["lm_head.weight"] = (vocab, hidden)
    for layer in range(n_layers):
        for suffix, shape in expected_block.items():
            expected[f"model.layers.{layer}.{suffix}"] = shape

    plans: list[_TensorPlan] = []
    for index, tensor in enumerate(source.reader.tensors):
        name = _GLOBAL_TENSORS.get(tensor.name)
        if name is None and (match := _BLOCK_NAME.fullmatch(tensor.name)):
            suffix = _BLOCK_TENSORS.get(match[2])
            name = f"model.layers.{int(match[1])}.{suffix}" if suffix else None
        if name is None or name not in expected:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} has no place in a plain LLaMA model "
                "(biases, MoE experts and extra tensors are not supported)"
            )
        shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists dimensions fastest-first
        if shape != expected[name]:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} has shape {shape}, expected {expected[name]}"
            )
        rope_heads = None
        if name.endswith("q_proj.weight"):
            rope_heads = config["num_attention_heads"]
        elif name.endswith("k_proj.weight"):
            rope_heads = config["num_key_value_heads"]
        plans.append(_TensorPlan(index=index, name=name, shape=shape, rope_heads=rope_heads))

    missing = sorted(set(expected) - {plan.name for plan in plans})
    if missing or len(plans) != len(expected):
        raise ModelLoadError(
            f"{path}: missing or duplicated tensors for a {n_layers}-layer LLaMA: {missing[:5]}"
        )
    return plans


def _write_safetensors(
    path: Path, plans: list[_TensorPlan], source: _GgufFile, *, progress: bool
) -> None:
    """Write float32 tensors one at a time: the header is known from the shapes up front.

    Only one tensor is ever dequantised in memory; the GGUF data stays memory-mapped.
    """
    import gguf

    bar = tqdm(plans, desc=f"convert-gguf {source.path.name}", unit="tensor", disable=not progress)
    with path.open("wb") as handle:
        handle.write(header_bytes([(plan.name, "F32", plan.shape) for plan in plans]))
        for plan in bar:
            tensor = source.reader.tensors[plan.index]
            weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            if plan.rope_heads is not None:
                weight = unpermute_rope_rows(weight, plan.rope_heads)
            weight = np.ascontiguousarray(weight, dtype="<f4")
            if weight.shape != plan.shape:
                raise ModelLoadError(
                    f"{source.path}: tensor {tensor.name!r} dequantised to {weight.shape}, "
                    f"expected {plan.shape}"
                )
            handle.write(memoryview(weight).cast("B"))
        handle.flush()
        os.fsync(handle.fileno())


# --------------------------------------------------------------------------- the folder


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    return {
        key: config[key]
        for key in ("bos_token_id", "eos_token_id", "pad_token_id")
        if config.get(key) is not None
    }


def _provenance(source: _GgufFile) -> dict[str, Any]:
    return {
        "converter": "chainfed.agent.convert.gguf_import",
        "format_version": 1,
        "source": str(source.path.resolve()),
        "source_bytes": source.path.stat().st_size,
        "general.name": source.get("general.name"),
        "general.file_type": source.get("general.file_type"),
    }


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
