"""The chain trainer on one device: train, converge, freeze, next layer (DESIGN.md §3).

Layers 0..L-1; the chain runs from a start layer s (FOAT, or given) to L-1. Stage l makes
layer l the active layer; the DLCT window holds the Q most recent layers::

    frozen, final adapters    window (trained together)    foresight (GPO)
    [ 0 ... lo-1 ] --cache--> [ lo ... l ] --local head--> loss_local
                                     └──> proxies / exact blocks l+1..L-1 ──> head ──> loss_global

    loss = loss_local + lambda * loss_global   (last stage: the end-to-end loss alone)

When the window moves from l to l+1 it keeps Q-1 adapters; the one that leaves becomes
final and the prefix caches (train and validation) advance through it by exactly one
block forward. Baseline modes run through the same code: ``e2e`` (every layer resident
with LoRA, no cache, full backprop), ``topk`` (window = the last k layers, one stage),
``head`` (frozen backbone, head only).

Notation: N samples, B micro-batch, T sequence, d hidden, L layers, Q window.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from chainfed.agent.runtime.attention import AttentionContext
from chainfed.agent.runtime.fingerprint import digest_json, digest_tensors
from chainfed.agent.runtime.lora import (
    LoRAConfig,
    adapter_state,
    add_lora,
    load_adapted_block,
    load_adapter_state,
    trainable_adapter_params,
)
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.runtime.precision import LossScaler, host_copy
from chainfed.agent.training.foat import LayerProbe, probe_layers
from chainfed.agent.training.gpo import ExactForesight, ProxyBranch
from chainfed.agent.training.head_refit import HeadRefit, refit_head
from chainfed.agent.training.memory_meter import PeakMemoryMeter
from chainfed.agent.training.objectives import Batch, ClassifyObjective, LMObjective
from chainfed.agent.training.prefix_cache import PrefixCache
from chainfed.proto.adapter_file import (
    AdapterFile,
    AdapterFileError,
    load_adapter_file,
    save_adapter_file,
)
from chainfed.proto.chain_rules import (
    DEFAULT_FOAT_THRESHOLD,
    DEFAULT_GPO_LAMBDA,
    DEFAULT_PATIENCE,
    DEFAULT_TOLERANCE,
    READOUT_LOSS_FACTOR,
    StageConvergence,
    check_foat_rule,
    check_stage_rule,
    choose_start_layer,
    parse_gpo,
    window_layers,
)
from chainfed.proto.tensor_names import strip_prefix

MODES = ("chain", "e2e", "e2e-streamed", "topk", "head")


@dataclass(frozen=True)
class ChainConfig:
    """How one device trains: mode, window, foresight, start layer, rounds, optimiser."""

    mode: str = "chain"
    """``chain`` (the method), or the baselines ``e2e``, ``e2e-streamed``, ``topk``,
    ``head``. ``e2e-streamed`` is e2e's exact gradient for every adapter at the chain's
    memory class: every block recomputed in backward with its pages given back after each
    use (``recompute``), and the embedding output taken from a prefix cache on disk, so
    one block's weights and the L block inputs of a micro-batch are what it holds."""
    topk: int = 2
    """Layers trained by ``topk`` mode (the last k)."""
    window: int = 2
    """DLCT window Q: adapters trained together; 1 disables co-tuning."""
    gpo: str = "proxy"
    """``proxy``, ``exact:K``, ``exact:all`` or ``none``."""
    gpo_lambda: float | None = None
    """Weight of the global loss; None = 0.1 for bert, 0.2 for llama."""
    proxy_rank: int = 8
    """Rank of each GPO residual proxy."""
    start_layer: int | None = None
    """First trained layer; None lets FOAT choose."""
    foat_threshold: float = DEFAULT_FOAT_THRESHOLD
    """FOAT starts the chain at the first layer with CKA below this."""
    foat_readout_factor: float = READOUT_LOSS_FACTOR
    """lm task: FOAT starts no lower than the first layer the model's own output head
    reads within this factor of the last layer's loss (``first_readable_layer``)."""
    foat_samples: int = 64
    """Training samples in the FOAT probe mini-batch."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Adapter rank, alpha, targets."""
    lr: float = 1e-3
    """AdamW learning rate for adapters, head and proxies."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    backbone_dropout: float = 0.0
    """Dropout of the trained (window) blocks in training steps, BERT family only: on the
    attention probabilities and each half-block's output (``BertBlock.dropout``), as
    transformers trains BERT with ``hidden_dropout_prob``. Evaluation, the prefix cache and
    frozen blocks never drop; neither do the embeddings, which the chain reads from its
    prefix cache. 0 = none."""
    micro_batch: int = 16
    """Samples per forward/backward, and per evaluation batch: evaluation must fit the
    memory the budget planner chose for training."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (effective batch = micro_batch × grad_accum)."""
    steps_per_round: int = 25
    """Optimiser steps between validations (one round)."""
    epoch_passes: bool = False
    """Draw micro-batches in passes over the training rows (each row once per pass, a
    fresh seeded order per pass), as rounds counted in local epochs need; False draws
    each micro-batch independently at random."""
    min_rounds: int = 1
    """Rounds every stage runs at least."""
    max_rounds: int = 3
    """Round cap per stage (1 = the move-every-round DLCT variant)."""
    patience: int = DEFAULT_PATIENCE
    """Rounds without relative improvement > tolerance before a stage converges."""
    tolerance: float = DEFAULT_TOLERANCE
    """Relative validation-loss improvement that counts as progress."""
    baseline_rounds: int | None = None
    """Rounds of the single stage of e2e/topk/head; None = max_rounds × L."""
    head_refit_epochs: int = 0
    """After the last stage, passes of head-only steps over the training rows' pooled
    final features (``head_refit``); 0 = none. Classification only: an LM's head is
    the frozen vocabulary projection."""
    seed: int = 0
    """Seeds data order, head and adapter initialisation."""
    cache_dtype: str | None = None
    """Storage of the prefix cache: float32, float16 or bfloat16; None = the model's
    compute dtype."""
    recompute: bool = True
    """Training steps of ``chain`` and ``topk`` keep only each window block's input and
    recompute the block in backward, one half (attention, feed-forward) at a time
    (``_RecomputedBlock``): the stage holds one half-block's activations at a time
    instead of the window's, and the window's activations never coexist with those of
    the foresight and the loss. The arithmetic is the same, so losses and adapters do
    not change. Each window block's checkpoint pages are also given back after each use
    (``StreamingModel.release_pages``; a float32 checkpoint on the CPU is memory-mapped),
    so one window block's weights are resident at a time, not the window's. ``e2e`` never
    recomputes: it is the baseline as users run it."""
    recompute_chunks: int = 1
    """With ``recompute``: each window block runs a training micro-batch as this many
    chunks of consecutive samples, forward and recompute alike, so one chunk's
    activations and gradient transients exist at a time instead of the micro-batch's.
    Samples never interact inside a block, so outputs are the same function of the
    inputs; the adapters' gradients are summed chunk by chunk, a different order of the
    same float additions, so they are not bit-identical to 1 (the default)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.mode == "e2e-streamed" and not self.recompute:
            raise ValueError("e2e-streamed recomputes every block in backward; without it, use e2e")
        for name in (
            "topk",
            "window",
            "micro_batch",
            "grad_accum",
            "steps_per_round",
            "recompute_chunks",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.backbone_dropout < 1.0:
            raise ValueError(f"backbone_dropout must be in [0, 1), got {self.backbone_dropout}")
        check_stage_rule(self.min_rounds, self.max_rounds, self.patience, self.tolerance)
        check_foat_rule(self.foat_threshold, self.foat_readout_factor)
        if self.head_refit_epochs < 0:
            raise ValueError(f"head_refit_epochs must be >= 0, got {self.head_refit_epochs}")
        parse_gpo(self.gpo, 1)

    def to_dict(self) -> dict:
        return asdict(self)


_ADDED_SETTING_DEFAULTS = {
    "recompute_chunks": 1,
    "backbone_dropout": 0.0,
    "foat_readout_factor": READOUT_LOSS_FACTOR,
}
"""ChainConfig fields newer than the resumable-state format, with their defaults."""
_NO_DEFAULT = object()


@dataclass
class EncodedSplit:
    """Token tensors of one split, all (N, T) or (N,)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, index: np.ndarray | slice) -> Batch:
        lm = None if self.loss_mask is None else self.loss_mask[index]
        return Batch(self.input_ids[index], self.attention_mask[index], self.labels[index], lm)

    def digest(self) -> str:
        tensors = {"ids": self.input_ids, "mask": self.attention_mask, "labels": self.labels}
        if self.loss_mask is not None:
            tensors["loss_mask"] = self.loss_mask
        return digest_tensors(tensors)


@dataclass
class StageReport:
    """What one stage did; the unit of the ``chainfed train`` report."""

    layer: int
    window: list[int]
    steps: int
    rounds: int
    train_loss: float
    val_loss: float
    val_metric: float
    seconds: float
    peak_mem_bytes: int = 0
    baseline_mem_bytes: int = 0
    reserved_mem_bytes: int = 0
    """CUDA: the allocator's peak reserve (0 on CPU)."""
    host_peak_mem_bytes: int = 0
    """CUDA: the process RSS peak beside the device's (0 on CPU, where peak_mem_bytes is it)."""


@dataclass
class Evaluation:
    loss: float
    metric: float


@dataclass
class RoundResult:
    """One round of local steps on the current window."""

    steps: int
    samples: int
    train_loss: float


StageHook = Callable[[StageReport], None]


class ChainTrainer:
    """Layer-by-layer training on one device.

    ``train()`` runs a whole chain (or baseline) locally. The same steps are public for a
    federated agent, whose coordinator decides instead of the local loop::

        trainer.set_start_layer(s)              # or choose_start() (FOAT)
        window = trainer.enter_stage(layer)     # finalise leaving adapters, advance caches
        trainer.load_trainable_state(aggregate) # the round's starting point
        trainer.train_round()                   # steps_per_round local steps
        trainer.evaluate_window(), trainer.trainable_state()
    """

    def __init__(
        self,
        model: StreamingModel,
        objective: ClassifyObjective | LMObjective,
        train: EncodedSplit,
        val: EncodedSplit,
        config: ChainConfig,
        workdir: Path,
        *,
        progress: bool = True,
    ) -> None:
        if config.backbone_dropout > 0 and model.config.family != "bert":
            raise ValueError(
                f"backbone_dropout is for the bert family; this model is {model.config.family}"
            )
        self.model, self.objective, self.config = model, objective, config
        self.train_data, self.val_data = train, val
        self.workdir = Path(workdir)
        self.progress = progress
        self.L = model.num_layers
        self.gpo_kind, self.gpo_depth = parse_gpo(config.gpo, self.L)
        self.gpo_lambda = (
            config.gpo_lambda
            if config.gpo_lambda is not None
            else DEFAULT_GPO_LAMBDA[model.config.family]
        )
        self.rng = np.random.default_rng(config.seed)
        self.final_adapters: dict[str, torch.Tensor] = {}
        """Adapters of layers that left the window, by saved name; never changed after."""
        self.window_blocks: dict[int, nn.Module] = {}
        """Blocks of the current window, with trainable adapters."""
        self.window: list[int] = []
        self.layer: int | None = None
        self.foat_scores: list[float] | None = None
        self.readout_losses: list[float] | None = None
        """FOAT's probe (``probe``), kept for the report; None when no probe ran."""
        self.head_refit: HeadRefit | None = None
        """What the head refit after the last stage did, when one ran."""
        self.stages: list[StageReport] = []
        self.start_layer: int | None = None
        self.resumed_from: int | None = None
        """Layer a restarted chain continued at (None: it started fresh)."""
        self.foresight: nn.Module | None = None
        self._caches: tuple[PrefixCache, PrefixCache] | None = None
        self._embeddings: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._pass_order = np.empty(0, dtype=np.int64)
        """Training rows of the current pass, in its random order; ``_pass_at`` is the next."""
        self._pass_at = 0
        self._scaler = LossScaler(model.dtype, model.device)

    # -- set-up ---------------------------------------------------------------------

    def probe(self) -> LayerProbe:
        """FOAT's per-layer statistics (``probe_layers``) on the first training samples."""
        n = min(self.config.foat_samples, len(self.train_data))
        probe = probe_layers(self.model, self.train_data.batch(slice(0, n)), self.objective)
        self.foat_scores, self.readout_losses = probe.cka_scores, probe.readout_losses
        return probe

    def choose_start(self) -> int:
        """The configured start layer, else FOAT's choice."""
        if self.config.start_layer is not None:
            return self.config.start_layer
        probe = self.probe()
        return choose_start_layer(
            probe.cka_scores,
            self.config.foat_threshold,
            probe.readout_losses,
            self.config.foat_readout_factor,
        )

    def set_start_layer(self, layer: int) -> None:
        """Fix where the chain starts; creates the GPO foresight for the layers above."""
        if not 0 <= layer < self.L:
            raise ValueError(f"start layer {layer} not in 0..{self.L - 1}")
        self.start_layer = layer
        self.foresight = self._make_foresight(layer)

    def _fingerprint(self, split: EncodedSplit) -> str:
        """Key of a split's prefix cache. int8 weights change every hidden state, so they
        are part of it; float weights add nothing, so existing caches stay valid."""
        parts = [self.model.fingerprint, split.digest(), str(self.model.dtype), self.config.seed]
        if self.model.weights != "float":
            parts.append(self.model.weights)
        return digest_json(parts)

    def _open_cache(self, name: str, split: EncodedSplit) -> PrefixCache:
        dtype = self.config.cache_dtype
        return PrefixCache.open(
            self.workdir / "cache" / name,
            fingerprint=self._fingerprint(split),
            num_samples=len(split),
            seq_len=split.input_ids.shape[1],
            hidden_size=self.model.config.hidden_size,
            dtype=self.model.dtype if dtype is None else getattr(torch, dtype),
        )

    @property
    def caches(self) -> tuple[PrefixCache, PrefixCache]:
        """(train, validation) prefix caches, opened on first use."""
        if self._caches is None:
            self._caches = (
                self._open_cache("train", self.train_data),
                self._open_cache("val", self.val_data),
            )
        return self._caches

    def _bring_caches_to(
        self, pairs: list[tuple[PrefixCache, EncodedSplit]], layer: int, then: int | None
    ) -> None:
        """Reuse what is on disk when valid, then advance block by block to ``layer``.

        One streamed pass serves every cache: each block is read once (the next one in
        the background) and advances each cache standing at it. While the last block
        runs, window block ``then`` (a new window layer) is read for ``enter_stage``."""
        digests = _adapter_digests(self.final_adapters, layer)
        stale = [(cache, split) for cache, split in pairs if not cache.usable_for(layer, digests)]
        if stale:
            embeddings = self.model.load_embeddings()
            for cache, split in stale:
                cache.write_initial(
                    lambda sl, split=split: embeddings(
                        split.input_ids[sl], split.attention_mask[sl]
                    ),
                    layer=0,
                    batch_size=self.config.micro_batch,
                )
            del embeddings
        window_read = None
        if then is not None:
            window_read = (("window", then), lambda: self.model.load_block(then))
        start = min(cache.layer for cache, _ in pairs)
        blocks = self.model.stream_blocks(
            range(start, layer), self._frozen_block, tag="final", then=window_read
        )
        for index, block in blocks:
            for cache, split in pairs:
                if cache.layer != index:
                    continue
                cache.advance(
                    lambda h, mask, block=block: block(
                        h.to(self.model.device, self.model.dtype),
                        self.model.attention_context(mask),
                    ),
                    split.attention_mask,
                    adapter_digest=digests[index],
                    batch_size=self.config.micro_batch,
                )
            del block

    def _final_of(self, layer: int) -> dict[str, torch.Tensor]:
        return _adapters_of(self.final_adapters, layer)

    def cached_rows(self, adapters: dict[str, torch.Tensor]) -> PrefixCache | None:
        """The training rows' prefix cache when its states went through exactly the
        adapters of ``adapters`` below the layer it stands at (a federation's final model
        agrees there with what this trainer froze), so ``pooled_features_streaming`` may
        start from it; None when there is none (e2e) or it went through other adapters."""
        if self.config.mode == "e2e" or self._caches is None:
            return None
        cache = self._caches[0]
        usable = cache.usable_for(cache.layer, _adapter_digests(adapters, cache.layer))
        return cache if usable else None

    def _frozen_block(self, layer: int) -> nn.Module:
        """Block ``layer`` with its final adapter (if any), for inference."""
        return load_adapted_block(self.model, layer, self.final_adapters, self.config.lora)

    def _make_foresight(self, start: int) -> nn.Module | None:
        if self.config.mode != "chain" or self.gpo_kind == "none" or self.gpo_lambda == 0:
            return None
        if self.gpo_kind == "proxy":
            return ProxyBranch(
                self.model.config.hidden_size,
                self.config.proxy_rank,
                range(start + 1, self.L),
                seed=self.config.seed,
                device=self.model.device,
            )
        return _DepthLimited(ExactForesight(self.model, range(start + 1, self.L)), self.gpo_depth)

    # -- stages ---------------------------------------------------------------------

    def stage_window(self, layer: int) -> list[int]:
        """Layers trained in the stage whose newest layer is ``layer``."""
        if self.config.mode != "chain":
            return list(range(self._baseline_first, self.L))
        return window_layers(self.start_layer, layer, self.config.window)

    @property
    def _baseline_first(self) -> int:
        L = self.L
        first = {"e2e": 0, "e2e-streamed": 0, "topk": L - min(self.config.topk, L), "head": L}
        return first[self.config.mode]

    def enter_stage(
        self,
        layer: int,
        window: list[int] | None = None,
        *,
        final: dict[str, torch.Tensor] | None = None,
    ) -> list[int]:
        """Make ``layer`` the active layer: adapters leaving the window become final, the
        prefix caches advance to the window's bottom, new window blocks are loaded.
        ``window`` (a federated task's) overrides the locally computed one. ``final`` (the
        federation's final adapters) is adopted first, so the caches climb through those
        values rather than this agent's last local ones."""
        if final is not None:
            self._adopt_final_adapters(final)
        window = self.stage_window(layer) if window is None else list(window)
        for old in [j for j in self.window_blocks if j not in window]:
            self._finalise(old)
        if self.config.mode == "e2e":
            if self._embeddings is None:
                self._embeddings = self.model.load_embeddings()
        else:
            bottom = window[0] if window else self.L
            train_cache, val_cache = self.caches
            pairs = [(val_cache, self.val_data)]
            if window or any(p.requires_grad for p in self.objective.parameters()):
                # (an LM head-mode run trains nothing: only validation states are needed)
                pairs.insert(0, (train_cache, self.train_data))
            new = [j for j in window if j not in self.window_blocks]
            self._bring_caches_to(pairs, bottom, then=new[0] if new else None)
        for j in window:
            if j not in self.window_blocks:
                self._load_window_block(j)
        if self.foresight is not None:
            self.foresight.retire_below(layer)
        self.window, self.layer = window, layer
        self.restart_optimizer()
        self._pass_order, self._pass_at = np.empty(0, dtype=np.int64), 0
        return window

    def restart_optimizer(self) -> None:
        """A fresh AdamW (zero moments) over the stage's trainable tensors.

        Called at stage entry, and by a federated agent each time a round's aggregate
        changes its weights: moments accumulated along the agent's own trajectory do not
        describe the aggregate, and carried over they push every agent further along its
        own skew. One device keeps them for the whole stage, and so does a one-agent
        federation, whose aggregate is the agent's own update."""
        params = [p for j in self.window for p in trainable_adapter_params(self.window_blocks[j])]
        params += [p for p in self.objective.parameters() if p.requires_grad]
        if self._stage_foresight is not None:
            params += [p for p in self._stage_foresight.parameters() if p.requires_grad]
        self._optimizer = (
            torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
            if params
            else None
        )

    @property
    def _stage_foresight(self) -> nn.Module | None:
        # The last stage's window output is the network's output: the end-to-end loss.
        return self.foresight if self.layer is not None and self.layer < self.L - 1 else None

    def _load_window_block(self, layer: int) -> None:
        block = self.model.loader.take(("window", layer), lambda: self.model.load_block(layer))
        add_lora(block, layer, self.config.lora)
        if self.config.backbone_dropout > 0:
            block.dropout = self.config.backbone_dropout
        self.window_blocks[layer] = block

    def _finalise(self, layer: int) -> None:
        block = self.window_blocks.pop(layer)
        self.final_adapters.update(adapter_state(block, layer))

    def finish(self) -> None:
        """End of the chain: every adapter still in the window becomes final."""
        for old in sorted(self.window_blocks):
            self._finalise(old)

    # -- the federated unit: the window's trainable state --------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Window adapters, task head and GPO proxies: what a round changes and uploads."""
        state = {}
        for layer in self.window:
            state.update(adapter_state(self.window_blocks[layer], layer))
        for name, param in self.objective.named_parameters():
            if param.requires_grad:
                state[f"objective.{name}"] = host_copy(param)
        if self._stage_foresight is not None:
            for name, tensor in self._stage_foresight.state_dict().items():
                state[f"foresight.{name}"] = host_copy(tensor)
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> bool:
        """Overwrite the window's trainable tensors with those present in ``state`` (e.g.
        the round's aggregate); True when any value changed. Absent ones keep their value:
        at the start of a stage the new layer's adapter is not in the aggregate yet and
        starts from the shared seed."""
        current = self.trainable_state()
        with torch.no_grad():
            for layer in self.window:
                for name, module in self.window_blocks[layer].named_children():
                    if not hasattr(module, "adapter_params"):
                        continue
                    for param_name, param in module.adapter_params().items():
                        key = f"layers.{layer}.{name}.{param_name}"
                        if key in state:
                            param.copy_(state[key])
            for name, param in self.objective.named_parameters():
                if param.requires_grad and f"objective.{name}" in state:
                    param.copy_(state[f"objective.{name}"])
            if self._stage_foresight is not None:
                for name, tensor in self._stage_foresight.state_dict().items():
                    if f"foresight.{name}" in state:
                        tensor.copy_(state[f"foresight.{name}"])
        # proxies of layers the chain has reached are retired here; ignore their values
        unknown = {k for k in set(state) - set(current) if not k.startswith("foresight.")}
        if unknown:
            raise ValueError(f"tensors not part of the current window: {sorted(unknown)[:5]}")
        return any(
            not torch.equal(state[key].to(current[key].dtype), current[key])
            for key in state.keys() & current.keys()
        )

    def _adopt_final_adapters(self, final: dict[str, torch.Tensor]) -> None:
        """Take the federation's final adapters; window blocks of those layers are dropped
        (the coordinator's frozen values win over this agent's last local ones)."""
        self.final_adapters = dict(final)
        for layer in [j for j in self.window_blocks if self._final_of(j)]:
            del self.window_blocks[layer]

    # -- compute ----------------------------------------------------------------------

    def _entry_states(self, split: EncodedSplit, idx, train: bool) -> torch.Tensor:
        if self.config.mode == "e2e":
            return self._embeddings(split.input_ids[idx], split.attention_mask[idx])
        cache = self.caches[0 if train else 1]
        return cache.read(idx).to(self.model.device, self.model.dtype)

    @property
    def recomputes(self) -> bool:
        """Whether training steps recompute the window blocks in backward
        (``ChainConfig.recompute``; never for ``e2e``, always for ``e2e-streamed``)."""
        return self.config.recompute and self.config.mode != "e2e"

    def _window_forward(self, h: torch.Tensor, batch: Batch):
        ctx = self.model.attention_context(batch.attention_mask)
        recompute = self.recomputes and torch.is_grad_enabled()
        for layer in self.window:
            block = self.window_blocks[layer]
            if recompute:
                params = trainable_adapter_params(block)
                chunks = self.config.recompute_chunks
                h = _RecomputedBlock.apply(h, block, ctx, chunks, self.model.release_pages, *params)
            else:
                h = block(h, ctx)
            if self.recomputes:
                self.model.release_pages(block)
        return h, ctx

    def train_round(self, steps: int | None = None) -> RoundResult:
        """``steps`` optimiser steps (default: steps_per_round), each on the next
        micro-batch(es) of the current pass over the training rows."""
        steps = self.config.steps_per_round if steps is None else steps
        if self._optimizer is None:
            return RoundResult(0, 0, math.nan)
        for block in self.window_blocks.values():
            block.train()
        foresight = self._stage_foresight
        losses, samples = [], 0
        bar = tqdm(
            total=steps,
            desc=f"layer {self.layer} window {self.window[0]}-{self.window[-1]}"
            if self.window
            else "head",
            unit="step",
            disable=not self.progress,
            leave=False,
        )
        for _ in range(steps):
            self._optimizer.zero_grad(set_to_none=True)
            for _ in range(self.config.grad_accum):
                idx = self._next_rows()
                batch = self.train_data.batch(idx).to(self.model.device)
                h, ctx = self._window_forward(self._entry_states(self.train_data, idx, True), batch)
                loss = self.objective.loss(h, batch)
                if foresight is not None:
                    global_loss = self.objective.loss(foresight(h, ctx), batch)
                    loss = loss + self.gpo_lambda * global_loss
                self._scaler.backward(loss / self.config.grad_accum)
                losses.append(loss.item())
                samples += len(idx)
            self._scaler.step(self._optimizer)
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        return RoundResult(steps, samples, float(np.mean(losses)))

    def _next_rows(self) -> np.ndarray:
        """The next micro-batch's training rows, sorted, from the trainer's seeded
        generator. With ``epoch_passes``: passes over the data in a fresh random order
        each, the last batch of a pass holding what is left, so ``ceil(N / B)``
        micro-batches see every row once (a stage starts a new pass); otherwise an
        independent random draw."""
        if not self.config.epoch_passes:
            n = len(self.train_data)
            return np.sort(self.rng.choice(n, size=min(self.config.micro_batch, n), replace=False))
        if self._pass_at >= len(self._pass_order):
            self._pass_order, self._pass_at = self.rng.permutation(len(self.train_data)), 0
        rows = self._pass_order[self._pass_at : self._pass_at + self.config.micro_batch]
        self._pass_at += len(rows)
        return np.sort(rows)

    @torch.no_grad()
    def evaluate_window(self) -> Evaluation:
        """Validation loss and metric with the head right after the current window."""
        loss_sum, correct, count = 0.0, 0, 0
        for h, batch in self._window_outputs(self.val_data):
            s_loss, s_correct, s_count = self.objective.score(h, batch)
            loss_sum, correct, count = loss_sum + s_loss, correct + s_correct, count + s_count
        return Evaluation(loss_sum / max(count, 1), correct / max(count, 1))

    # -- the local loop ---------------------------------------------------------------

    def run_stage(self, layer: int, rounds_cap: int) -> StageReport:
        """One stage, under one memory meter: enter it, then rounds of local steps and
        validation until the stage converges or ``rounds_cap`` rounds have run."""
        started = time.perf_counter()
        with PeakMemoryMeter(self.model.device) as meter:
            window = self.enter_stage(layer)
            rule = StageConvergence(
                self.config.min_rounds, rounds_cap, self.config.patience, self.config.tolerance
            )
            steps, losses = 0, []
            while True:
                result = self.train_round()
                evaluation = self.evaluate_window()
                steps += result.steps
                losses.append(result.train_loss)
                if result.steps == 0 or rule.update(evaluation.loss):
                    break
        return StageReport(
            layer=layer,
            window=window,
            steps=steps,
            rounds=rule.rounds,
            train_loss=losses[-1],
            val_loss=evaluation.loss,
            val_metric=evaluation.metric,
            seconds=time.perf_counter() - started,
            peak_mem_bytes=meter.reading.peak_bytes,
            baseline_mem_bytes=meter.reading.baseline_bytes,
            reserved_mem_bytes=meter.reading.reserved_bytes,
            host_peak_mem_bytes=meter.reading.host_peak_bytes,
        )

    def train(self, on_stage: StageHook | None = None) -> list[StageReport]:
        """Run the configured mode to the end; final adapters land in ``final_adapters``.

        A chain interrupted after a stage resumes there when run again with the same
        workdir, config and data (state saved atomically after every stage).
        """
        chain = self.config.mode == "chain"
        first = self._resume() if chain else None
        if first is None and chain:
            self.set_start_layer(self.choose_start())
            first = self.start_layer
        elif first is None:
            self.start_layer, first = self._baseline_first, self.L - 1
        rounds_cap = (
            self.config.max_rounds
            if chain
            else self.config.baseline_rounds or self.config.max_rounds * self.L
        )
        for layer in range(first, self.L):
            report = self.run_stage(layer, rounds_cap)
            self.stages.append(report)
            if on_stage is not None:
                on_stage(report)
            if chain:
                self._save_chain_state(layer + 1)
        if self.config.head_refit_epochs > 0 and isinstance(self.objective, ClassifyObjective):
            self.head_refit = self.refit_head(self.config.head_refit_epochs)
        self.finish()
        return self.stages

    def refit_head(self, epochs: int) -> HeadRefit:
        """Head-only passes over the pooled final features of the training rows, with the
        window at the top of the model (before ``finish``)."""
        assert isinstance(self.objective, ClassifyObjective)
        return refit_head(
            self.objective.head,
            self.pooled_features(self.train_data),
            self.train_data.labels,
            epochs=epochs,
            batch_size=self.config.micro_batch,
            lr=self.config.lr,
            weight_decay=self.config.weight_decay,
            rng=self.rng,
        )

    @torch.no_grad()
    def pooled_features(self, split: EncodedSplit) -> torch.Tensor:
        """``(N, d)`` float32: what the head reads for every row of ``split`` (the train or
        validation split) after the current window, computed in micro-batches."""
        assert isinstance(self.objective, ClassifyObjective)
        objective = self.objective
        return torch.cat([objective.features(h, batch) for h, batch in self._window_outputs(split)])

    def _window_outputs(self, split: EncodedSplit) -> Iterator[tuple[torch.Tensor, Batch]]:
        """The current window's output and its batch for every micro-batch of ``split``
        (the train or validation split), in row order, with the window in eval mode; the
        caller decides on gradients."""
        for block in self.window_blocks.values():
            block.eval()
        n, size = len(split), self.config.micro_batch
        for start in range(0, n, size):
            idx = np.arange(start, min(n, start + size))
            batch = split.batch(idx).to(self.model.device)
            entry = self._entry_states(split, idx, split is self.train_data)
            yield self._window_forward(entry, batch)[0], batch

    # -- resuming an interrupted chain ---------------------------------------------------

    @property
    def _state_path(self) -> Path:
        return self.workdir / "chain_state.safetensors"

    def _state_key(self) -> str:
        """Digest of what a saved chain must match to be resumed. Settings added after
        the file format was fixed are left out at their default values, so a chain saved
        before they existed still resumes when they are not used."""
        settings = {
            name: value
            for name, value in self.config.to_dict().items()
            if _ADDED_SETTING_DEFAULTS.get(name, _NO_DEFAULT) != value
        }
        return digest_json([settings, self._fingerprint(self.train_data), self.val_data.digest()])

    def _save_chain_state(self, next_layer: int) -> None:
        """After every stage: everything needed to continue at ``next_layer`` (atomic)."""
        tensors = {f"final.{k}": v for k, v in self.final_adapters.items()}
        for layer, block in self.window_blocks.items():
            tensors.update({f"window.{k}": v for k, v in adapter_state(block, layer).items()})
        for name, param in self.objective.named_parameters():
            if param.requires_grad:
                tensors[f"objective.{name}"] = host_copy(param)
        if self.foresight is not None:
            for name, tensor in self.foresight.state_dict().items():
                tensors[f"foresight.{name}"] = host_copy(tensor)
        info = {
            "key": self._state_key(),
            "next_layer": next_layer,
            "start_layer": self.start_layer,
            "window_layers": sorted(self.window_blocks),
            "foat_scores": self.foat_scores,
            "readout_losses": self.readout_losses,
            "rng": self.rng.bit_generator.state,
            "stages": [asdict(r) for r in self.stages],
        }
        save_adapter_file(self._state_path, AdapterFile(tensors, info))

    def _resume(self) -> int | None:
        """Restore a matching earlier run from ``workdir``; the layer to continue at, or None."""
        if not self._state_path.is_file():
            return None
        try:
            saved = load_adapter_file(self._state_path)
        except AdapterFileError:
            return None
        info, tensors = saved.info, saved.tensors
        if info.get("key") != self._state_key() or info["next_layer"] >= self.L:
            return None
        self.set_start_layer(info["start_layer"])
        self.foat_scores = info["foat_scores"]
        self.readout_losses = info.get("readout_losses")
        self.rng.bit_generator.state = info["rng"]
        self.stages = [StageReport(**r) for r in info["stages"]]
        self.final_adapters = strip_prefix(tensors, "final.")
        window_state = strip_prefix(tensors, "window.")
        for layer in info["window_layers"]:
            self._load_window_block(layer)
            load_adapter_state(self.window_blocks[layer], layer, window_state)
        with torch.no_grad():
            for name, param in self.objective.named_parameters():
                if param.requires_grad:
                    param.copy_(tensors[f"objective.{name}"])
        if self.foresight is not None:
            self.foresight.retire_below(info["next_layer"] - 1)
            self.foresight.load_state_dict(strip_prefix(tensors, "foresight."))
        self.resumed_from = info["next_layer"]
        return self.resumed_from


class _RecomputedBlock(torch.autograd.Function):
    """A window block that keeps only its input for backward and runs again there, one
    half at a time, and optionally one chunk of samples at a time.

    Forward: run under no_grad, chunk by chunk (``ChainConfig.recompute_chunks``), save
    h_in and the RNG state at the start of each chunk (LoRA dropout draws from it).
    Backward, per chunk, from that chunk's RNG state on a forked generator: run the
    attention half under no_grad to get its output h_mid; run the feed-forward half on
    h_mid with grad and backpropagate dL/dout to dL/dh_mid and its adapter gradients;
    free that graph; reset the RNG state, run the attention half again with grad and
    backpropagate dL/dh_mid to dL/dh_in and its adapter gradients. Only one half's
    activations and gradient transients of one chunk are alive at once — on
    roberta-large at 16×128 the feed-forward half's (B, T, 4096) tensors no longer
    coexist with the attention probabilities — for one more attention-half forward per
    block and micro-batch. With one chunk the dropout draws, the kernels and the order in
    which gradients accumulate are those of a plain backward (autograd finishes
    dL/dh_mid before it enters the attention half there too), so gradients are
    identical; with more, each chunk's draws are those its forward made, and adapter
    gradients are summed chunk by chunk. Every block family provides ``attention_half``
    and ``ffn_half`` (``chainfed.agent.runtime.bert``, ``.llama``). After its backward the
    block's checkpoint pages are given back (``release``), as the trainer does after its
    forward. ``torch.utils.checkpoint`` is not used: its first call imports about 70 MiB of torch
    modules that stay.
    """

    @staticmethod
    def forward(
        ctx,
        h: torch.Tensor,
        block: nn.Module,
        attn: AttentionContext,
        chunks: int,
        release: Callable[[nn.Module], None],
        *params: nn.Parameter,
    ):
        ctx.block, ctx.attn, ctx.input_needs_grad = block, attn, h.requires_grad
        ctx.release = release
        ctx.pieces = _sample_chunks(h.shape[0], chunks)
        ctx.rng_states, outs = [], []
        for piece in ctx.pieces:
            cuda_rng = torch.cuda.get_rng_state(h.device) if h.is_cuda else None
            ctx.rng_states.append((torch.get_rng_state(), cuda_rng))
            outs.append(block(h[piece], _chunk_context(attn, piece, h.shape[0])))
        ctx.save_for_backward(h)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (h,) = ctx.saved_tensors
        params = trainable_adapter_params(ctx.block)
        grad_in = torch.empty_like(h) if ctx.input_needs_grad and len(ctx.pieces) > 1 else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        for piece, rng_state in zip(ctx.pieces, ctx.rng_states, strict=True):
            attn = _chunk_context(ctx.attn, piece, h.shape[0])
            piece_in, piece_grads = _RecomputedBlock._chunk_backward(
                ctx, h[piece], attn, grad_out[piece], params, rng_state
            )
            if len(ctx.pieces) == 1:
                grad_in = piece_in
            elif grad_in is not None:
                grad_in[piece] = piece_in
            grads = [_sum(total, g) for total, g in zip(grads, piece_grads, strict=True)]
        ctx.release(ctx.block)
        return grad_in, None, None, None, None, *grads

    @staticmethod
    def _chunk_backward(
        ctx,
        h: torch.Tensor,
        attn: AttentionContext,
        grad_out: torch.Tensor,
        params: list[nn.Parameter],
        rng_state: tuple[torch.Tensor, torch.Tensor | None],
    ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """dL/dh and the adapter gradients of one chunk, one half-block at a time."""
        block = ctx.block
        cuda = [h.device.index or 0] if rng_state[1] is not None else []
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
            _restore_rng(rng_state, h.device)
            with torch.no_grad():
                h_mid = block.attention_half(h, attn)
            with torch.enable_grad():
                h_mid.requires_grad_(True)
                out = block.ffn_half(h_mid)
                grad_mid, *ffn_grads = torch.autograd.grad(
                    out, [h_mid, *params], grad_out, allow_unused=True
                )
                del out, h_mid
                _restore_rng(rng_state, h.device)
                h_in = h.detach().requires_grad_(ctx.input_needs_grad)
                out = block.attention_half(h_in, attn)
                wrt = ([h_in] if ctx.input_needs_grad else []) + params
                attn_grads = list(torch.autograd.grad(out, wrt, grad_mid, allow_unused=True))
        grad_in = attn_grads.pop(0) if ctx.input_needs_grad else None
        return grad_in, [_sum(f, a) for f, a in zip(ffn_grads, attn_grads, strict=True)]


def _sample_chunks(batch: int, chunks: int) -> list[slice]:
    """``chunks`` runs of consecutive samples covering 0..batch-1, as even as they come
    (fewer when the batch is smaller)."""
    bounds = np.linspace(0, batch, min(chunks, batch) + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _chunk_context(attn: AttentionContext, piece: slice, batch: int) -> AttentionContext:
    """The attention context of samples ``piece``: the mask has one row per sample (or
    one shared row); the RoPE tables are per position and stay whole."""
    if piece == slice(0, batch) or attn.mask.shape[0] != batch:
        return attn
    return replace(attn, mask=attn.mask[piece])


def _sum(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """``a + b`` where either may be absent (a parameter one part of the graph misses)."""
    return b if a is None else a if b is None else a + b


def _restore_rng(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    """The generator state a chunk's forward started from, so that each recomputed half
    draws the dropout masks it drew there."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class _DepthLimited(nn.Module):
    """``exact:k``: only the next k blocks above the window, then the head."""

    def __init__(self, foresight: ExactForesight, depth: int) -> None:
        super().__init__()
        self.inner, self.depth = foresight, depth

    def retire_below(self, layer: int) -> None:
        self.inner.retire_below(layer)

    def forward(self, h: torch.Tensor, ctx) -> torch.Tensor:
        layers = self.inner.layers
        limited = range(layers.start, min(layers.stop, layers.start + self.depth))
        return ExactForesight(self.inner.model, limited)(h, ctx)


def _final_states(
    model: StreamingModel,
    adapters: dict[str, torch.Tensor],
    lora: LoRAConfig,
    data: EncodedSplit,
    batch_size: int,
    entry: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """``(N, T, d)`` last hidden states of every row of ``data`` through the whole
    network with ``adapters``, streamed layer-major (each block read once); with
    ``entry`` = (states, layer c), the rows' states entering block c, only blocks
    c..L-1 run."""
    if entry is None:
        first = 0
        h = torch.cat(
            [
                model.load_embeddings()(
                    data.input_ids[i : i + batch_size], data.attention_mask[i : i + batch_size]
                )
                for i in range(0, len(data), batch_size)
            ]
        )
    else:
        h, first = entry
    blocks = model.stream_blocks(
        range(first, model.num_layers),
        lambda layer: load_adapted_block(model, layer, adapters, lora),
        tag="adapted",
    )
    for _, block in blocks:
        h = torch.cat(
            [
                block(
                    h[i : i + batch_size],
                    model.attention_context(data.attention_mask[i : i + batch_size]),
                )
                for i in range(0, len(data), batch_size)
            ]
        )
        del block
    return h


@torch.no_grad()
def evaluate_streaming(
    model: StreamingModel,
    objective: ClassifyObjective | LMObjective,
    adapters: dict[str, torch.Tensor],
    lora: LoRAConfig,
    data: EncodedSplit,
    *,
    batch_size: int = 64,
) -> Evaluation:
    """Loss and metric of the whole network with ``adapters``, streamed layer-major.

    The same arithmetic for ``chainfed train``'s final figure and ``--eval-only``, so the
    two agree bit for bit. Hidden states of all samples are held (N × T × d) — validation
    sets are small; training data never passes through here.
    """
    objective.eval()
    h = _final_states(model, adapters, lora, data, batch_size)
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, len(data), batch_size):
        batch = data.batch(slice(i, i + batch_size)).to(model.device)
        s_loss, s_correct, s_count = objective.score(h[i : i + batch_size], batch)
        loss_sum, correct, count = loss_sum + s_loss, correct + s_correct, count + s_count
    return Evaluation(loss_sum / max(count, 1), correct / max(count, 1))


POOLED_CHUNK_BATCHES = 4
"""Micro-batches of rows ``pooled_features_streaming`` carries through the network at
once (each block read once per chunk). It pools every training row, which may be many:
chunks keep its hidden states to a few micro-batches' worth, so the closed-form head's
round stays under the peak of a chain stage (in the demo, 512-row chunks raised the
agents' peak from 142 to 223 MiB above the idle process)."""


@torch.no_grad()
def pooled_features_streaming(
    model: StreamingModel,
    objective: ClassifyObjective,
    adapters: dict[str, torch.Tensor],
    lora: LoRAConfig,
    data: EncodedSplit,
    *,
    batch_size: int = 64,
    cache: PrefixCache | None = None,
) -> torch.Tensor:
    """``(N, d)`` float32: what ``objective``'s head reads for every row of ``data`` after
    the whole network with ``adapters`` (none: the base model), streamed layer-major in
    chunks of ``POOLED_CHUNK_BATCHES`` micro-batches of ``batch_size`` rows; the same
    states ``evaluate_streaming`` scores.

    ``cache``: a prefix cache of ``data``'s rows that went through ``adapters`` below its
    layer c (``ChainTrainer.cached_rows`` checks that): the rows start from its states, so
    only blocks c..L-1 run, the same blocks on the same states as the full pass."""
    pooled = []
    rows = POOLED_CHUNK_BATCHES * batch_size
    for start in range(0, len(data), rows):
        chunk = data.batch(slice(start, start + rows))
        part = EncodedSplit(chunk.input_ids, chunk.attention_mask, chunk.labels)
        entry = None
        if cache is not None:
            index = np.arange(start, min(start + rows, len(data)))
            entry = (cache.read(index).to(model.device, model.dtype), cache.layer)
        h = _final_states(model, adapters, lora, part, batch_size, entry)
        pooled.append(objective.features(h, chunk.to(model.device)))
    return torch.cat(pooled)


def _adapters_of(adapters: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """The tensors of ``adapters`` that belong to layer ``layer`` (``layers.{layer}.*``)."""
    prefix = f"layers.{layer}."
    return {k: v for k, v in adapters.items() if k.startswith(prefix)}


def _adapter_digests(adapters: dict[str, torch.Tensor], layers: int) -> list[str]:
    """What a prefix cache records of the adapters its states went through, for layers
    0..``layers``-1: each layer's ``digest_tensors``, ``"none"`` for a layer without one."""
    return [
        digest_tensors(own) if (own := _adapters_of(adapters, i)) else "none" for i in range(layers)
    ]
