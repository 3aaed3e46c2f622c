"""``StreamingModel``: a model folder whose parts are built on demand and released after.

Only the part in use is in memory. ``hidden_states`` shows the pattern every consumer
(prefix cache, FOAT probe, foresight) follows::

    embeddings ──> h0 ──> block 0 ──> h1 ──> ... ──> block L-1 ──> hL ──> head
       load/drop        load/drop                     load/drop       load/drop

Streamed passes go through ``stream_blocks``: its ``BlockLoader`` reads block l+1 on a
background thread while block l computes, and the caller drops block l before the next
(``chainfed.agent.runtime.block_loader``).

Modules are created on the ``meta`` device and receive the checkpoint's tensors by
assignment, so building a block allocates its weights once, never twice: in the compute
dtype, on the compute device (``chainfed.agent.runtime.precision`` says which). Token ids
and masks may come from the CPU; the embeddings and ``attention_context`` move them.

With ``weights="int8"`` a block's linear layers are ``Int8Linear`` modules whose int8
weights and per-output-channel scales come from the model's int8 cache
(``chainfed.agent.runtime.int8_cache``, quantised on first use); the block's norms and
biases, the embeddings and the LM head are read as with float weights. The fingerprint
stays the float checkpoint's: int8 is a local storage choice, like the compute dtype, and
agents of either kind federate together.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from types import ModuleType

import torch
from tokenizers import Tokenizer
from torch import nn

from chainfed.agent.errors import ModelLoadError
from chainfed.agent.runtime import bert, llama
from chainfed.agent.runtime.attention import AttentionContext
from chainfed.agent.runtime.block_loader import BlockLoader, BlockRead
from chainfed.agent.runtime.checkpoint import Checkpoint, TensorSpec
from chainfed.agent.runtime.fingerprint import digest_files
from chainfed.agent.runtime.int8_cache import Int8WeightCache, QuantisedLinear
from chainfed.agent.runtime.lm_head import StreamedLMHead
from chainfed.agent.runtime.mapped_pages import drop_pages, file_mapped_ranges
from chainfed.agent.runtime.model_config import ModelConfig
from chainfed.agent.runtime.precision import resolve_weights
from chainfed.kernels import Int8Linear
from chainfed.proto.model_spec import ModelSpec
from chainfed.proto.seeded_init import linear_in_features

_FAMILIES: dict[str, ModuleType] = {"bert": bert, "llama": llama}


class StreamingModel:
    """A model folder (HF layout) opened for layer-by-layer use.

    Opening reads ``config.json`` and the safetensors headers only; it checks that the
    checkpoint holds the embeddings of the declared family so a wrong folder fails here,
    not halfway through a run.
    """

    def __init__(
        self,
        model_dir: Path | str,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        prefetch: bool = True,
        weights: str = "float",
    ) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ModelLoadError(f"{self.model_dir}: model folder not found or not a directory")
        self.config = ModelConfig.load(self.model_dir)
        self.checkpoint = Checkpoint(self.model_dir)
        self.dtype = dtype
        """Compute dtype of the frozen weights and activations."""
        self.device = torch.device(device)
        """Where every part is built and every activation lives."""
        self.weights = resolve_weights(weights)
        """Storage of the blocks' linear weights: ``float`` or ``int8``."""
        self._family = _FAMILIES[self.config.family]
        self._prefix = self._find_prefix()
        self.loader = BlockLoader(prefetch=prefetch)
        """Reads the next streamed block while the current one computes (``stream_blocks``)."""
        self.resident_blocks = 0
        """Blocks built by ``load_block`` that still exist (window blocks included)."""
        self.peak_resident_blocks = 0
        """Most blocks that existed at once since opening (or ``reset_peak_resident``)."""
        self._residency = threading.Lock()
        self._int8: Int8WeightCache | None = None
        self._int8_opening = threading.Lock()

    def _find_prefix(self) -> str:
        for prefix in self._family.CHECKPOINT_PREFIXES:
            if self._family.embedding_key(prefix) in self.checkpoint:
                return prefix
        expected = self._family.embedding_key(self._family.CHECKPOINT_PREFIXES[0])
        raise ModelLoadError(
            f"{self.model_dir}: tensor {expected!r} not found in "
            f"{[str(f) for f in self.checkpoint.files]}; the checkpoint does not match "
            f"its {self.config.model_type} config"
        )

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @cached_property
    def fingerprint(self) -> str:
        """Digest of ``config.json`` and every weight file (names and bytes): what agents
        and coordinator compare, and what prefix caches and adapter files are keyed by."""
        return digest_files([self.model_dir / "config.json", *self.checkpoint.files])

    def spec(self) -> ModelSpec:
        """What the coordinator needs to know of this model (reads no weights beyond the
        fingerprint's hashing)."""
        return ModelSpec(
            num_layers=self.num_layers,
            family=self.config.family,
            fingerprint=self.fingerprint,
            lora_in_features=linear_in_features(self.block_tensor_spec(0)),
        )

    def tokenizer(self) -> Tokenizer:
        """The folder's ``tokenizer.json``, with any padding/truncation it declares switched off.

        Some files (MiniLM's) pad every encoding to 128; batching and truncation are the
        data layer's job, so encodings here are exactly the text's tokens.
        """
        path = self.model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{path}: tokenizer.json not found")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ModelLoadError(f"{path}: cannot read tokenizer: {exc}") from exc
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return tokenizer

    def _materialise(
        self, module: nn.Module, spec: TensorSpec, given: dict[str, torch.Tensor] | None = None
    ) -> nn.Module:
        """Assign ``module`` its tensors: those in ``given`` as they are, the rest of
        ``spec`` read from the checkpoint in the compute dtype."""
        given = given or {}
        read = {ours: src for ours, src in spec.items() if ours not in given}
        tensors = self.checkpoint.load(
            {name: shape for name, shape in read.values()}, dtype=self.dtype, device=self.device
        )
        state = {ours: tensors[theirs] for ours, (theirs, _) in read.items()} | given
        module.load_state_dict(state, strict=True, assign=True)
        module.requires_grad_(False)
        return module.eval()

    def load_embeddings(self) -> nn.Module:
        """Embedding module: ``(input_ids, attention_mask) -> (B, T, d)``."""
        with torch.device("meta"):
            module = self._family.build_embeddings(self.config)
        return self._materialise(module, self._family.embedding_tensors(self.config, self._prefix))

    def block_tensor_spec(self, index: int) -> TensorSpec:
        """Checkpoint names and shapes behind block ``index``."""
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range 0..{self.num_layers - 1}")
        return self._family.block_tensors(self.config, self._prefix, index)

    def load_block(self, index: int) -> nn.Module:
        """Frozen block ``index``: ``(h, AttentionContext) -> h``; with int8 weights its
        linear layers are ``Int8Linear`` (see the module docstring). Safe to call from the
        loader's thread."""
        spec = self.block_tensor_spec(index)
        with torch.device("meta"):
            module = self._family.build_block(self.config)
        if self.weights == "float":
            module = self._materialise(module, spec)
        else:
            names = _linear_names(module)
            for name in names:
                setattr(module, name, Int8Linear.like(getattr(module, name)))
            if index not in self.int8_weights().layers:  # the checkpoint's own error
                self.checkpoint.load({name: shape for name, shape in spec.values()})
            quantised = self.int8_weights().load(index, names, self.device)
            module = self._materialise(module, spec, quantised)
        with self._residency:
            self.resident_blocks += 1
            self.peak_resident_blocks = max(self.peak_resident_blocks, self.resident_blocks)
        weakref.finalize(module, self._block_released)
        return module

    def release_pages(self, block: nn.Module) -> None:
        """Give back the resident pages of ``block``'s frozen tensors that are mapped from
        the checkpoint (``chainfed.agent.runtime.mapped_pages``), keeping the block: its
        next use reads them in again, with the same values. Nothing to give back for a
        block whose tensors were copied on loading (another dtype or device, int8)."""
        frozen = [t for t in (*block.parameters(), *block.buffers()) if not t.requires_grad]
        drop_pages(file_mapped_ranges(frozen))

    def _block_released(self) -> None:
        with self._residency:
            self.resident_blocks -= 1

    def reset_peak_resident(self) -> None:
        """Start counting ``peak_resident_blocks`` from the blocks that exist now."""
        with self._residency:
            self.peak_resident_blocks = self.resident_blocks

    def stream_blocks(
        self,
        layers: Sequence[int],
        read: Callable[[int], nn.Module] | None = None,
        *,
        tag: str = "base",
        then: tuple[Hashable, BlockRead] | None = None,
    ) -> Iterator[tuple[int, nn.Module]]:
        """``(layer, block)`` for ``layers`` in order, block l+1 read in the background
        while the caller computes with block l (``read(layer)``, default ``load_block``).

        The caller drops each block before asking for the next (``del block`` at the end
        of the loop body): then at most two streamed blocks exist at once. ``tag`` tells
        apart different builds of one layer (``loader`` keys are ``(tag, layer)``).
        ``then`` = (key, read): what to read while the last block computes, for whoever
        takes ``key`` from ``loader`` next."""
        read = self.load_block if read is None else read
        try:
            for position, layer in enumerate(layers):
                block = self.loader.take((tag, layer), lambda layer=layer: read(layer))
                if position + 1 < len(layers):
                    following = layers[position + 1]
                    self.loader.prefetch((tag, following), lambda j=following: read(j))
                elif then is not None:
                    self.loader.prefetch(*then)
                yield layer, block
                del block
        finally:
            self.loader.discard((tag, layer) for layer in layers)

    def int8_weights(self) -> Int8WeightCache:
        """The checked int8 cache of the linear weights of every block the checkpoint
        holds, quantised from it and written next to it the first time it is asked for. (A
        checkpoint may hold only some blocks, e.g. the memory benchmark's slice of a large
        config; loading another block then fails as it does with float weights.)"""
        with self._int8_opening:
            if self._int8 is None:
                self._int8 = self._open_int8_weights()
        return self._int8

    def _open_int8_weights(self) -> Int8WeightCache:
        with torch.device("meta"):
            names = _linear_names(self._family.build_block(self.config))
        linears = []
        for index in range(self.num_layers):
            spec = self.block_tensor_spec(index)
            sources = [spec[f"{name}.weight"] for name in names]
            if all(source in self.checkpoint for source, _ in sources):
                linears += [
                    QuantisedLinear(index, name, source, (shape[0], shape[1]))
                    for name, (source, shape) in zip(names, sources, strict=True)
                ]
        return Int8WeightCache(self.model_dir, self.fingerprint, linears, self.checkpoint)

    def _require_decoder(self) -> None:
        if self.config.family != "llama":
            raise ModelLoadError(
                f"{self.model_dir}: {self.config.model_type} is an encoder and has no LM head"
            )

    def load_lm_head(self) -> nn.Module:
        """Final norm + LM head of a decoder, held whole: ``(B, T, d) -> (B, T, V)``.

        For generation; losses use ``streamed_lm_head``."""
        self._require_decoder()
        with torch.device("meta"):
            module = self._family.build_head(self.config)
        return self._materialise(module, self._family.head_tensors(self.config, self._prefix))

    def streamed_lm_head(self) -> StreamedLMHead:
        """Final norm + LM head for losses: the head is read in vocabulary slices when
        used, never held whole (see ``chainfed.agent.runtime.lm_head``)."""
        self._require_decoder()
        spec = self._family.head_tensors(self.config, self._prefix)
        weight_name, shape = spec["lm_head.weight"]
        if self.checkpoint.shape(weight_name) != shape:
            raise ModelLoadError(
                f"{self.model_dir}: tensor {weight_name!r} has shape "
                f"{list(self.checkpoint.shape(weight_name))} but the config implies {list(shape)}"
            )
        with torch.device("meta"):
            norm = self._family.build_head(self.config).norm
        norm = self._materialise(norm, {"weight": spec["norm.weight"]})
        return StreamedLMHead(
            norm, self.checkpoint, weight_name, dtype=self.dtype, device=self.device
        )

    def attention_context(self, attention_mask: torch.Tensor) -> AttentionContext:
        """Mask (and RoPE tables) shared by every block for this batch."""
        return self._family.attention_context(
            self.config, attention_mask.to(self.device), self.dtype
        )


def _linear_names(block: nn.Module) -> list[str]:
    """A block's linear children: the layers int8 weights quantise and LoRA may wrap."""
    return [name for name, child in block.named_children() if isinstance(child, nn.Linear)]


@torch.no_grad()
def hidden_states(
    model_dir: Path | str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    weights: str = "float",
) -> list[torch.Tensor]:
    """The L+1 hidden states of a batch, computed by streaming one block at a time.

    Same convention as transformers' ``output_hidden_states``: element 0 is the
    embedding output, element i the output of block i-1. ``input_ids`` and
    ``attention_mask`` are (B, T), right padded. Only the embeddings, or the block computing
    and the next one being read, are resident at any moment besides the returned states.
    """
    model = StreamingModel(model_dir, dtype=dtype, device=device, weights=weights)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ctx = model.attention_context(attention_mask)
    embeddings = model.load_embeddings()
    states = [embeddings(input_ids, attention_mask)]
    del embeddings
    for _, block in model.stream_blocks(range(model.num_layers)):
        states.append(block(states[-1], ctx))
        del block
    return states
