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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from chainfed.agent.adapter_file import (
    AdapterFile,
    AdapterFileError,
    load_adapter_file,
    save_adapter_file,
)
from chainfed.agent.fingerprint import digest_files, digest_json, digest_tensors
from chainfed.agent.foat import choose_start_layer, probe_cka
from chainfed.agent.gpo import ExactForesight, ProxyBranch, parse_gpo
from chainfed.agent.heads import Batch, ClassifyObjective, LMObjective
from chainfed.agent.lora import (
    LoRAConfig,
    adapter_state,
    add_lora,
    load_adapter_state,
    trainable_adapter_params,
)
from chainfed.agent.memory_meter import PeakMemoryMeter
from chainfed.agent.model import StreamingModel
from chainfed.agent.prefix_cache import PrefixCache

MODES = ("chain", "e2e", "topk", "head")
DEFAULT_GPO_LAMBDA = {"bert": 0.1, "llama": 0.2}


@dataclass(frozen=True)
class ChainConfig:
    """How one device trains: mode, window, foresight, start layer, rounds, optimiser."""

    mode: str = "chain"
    """``chain`` (the method), or the baselines ``e2e``, ``topk``, ``head``."""
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
    foat_threshold: float = 0.8
    """FOAT starts the chain at the first layer with CKA below this."""
    foat_samples: int = 64
    """Training samples in the FOAT probe mini-batch."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Adapter rank, alpha, targets."""
    lr: float = 1e-3
    """AdamW learning rate for adapters, head and proxies."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    micro_batch: int = 16
    """Samples per forward/backward."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (effective batch = micro_batch × grad_accum)."""
    steps_per_round: int = 25
    """Optimiser steps between validations (one round)."""
    min_rounds: int = 1
    """Rounds every stage runs at least."""
    max_rounds: int = 3
    """Round cap per stage (1 = the move-every-round DLCT variant)."""
    patience: int = 1
    """Rounds without relative improvement > tolerance before a stage converges."""
    tolerance: float = 0.01
    """Relative validation-loss improvement that counts as progress."""
    baseline_rounds: int | None = None
    """Rounds of the single stage of e2e/topk/head; None = max_rounds × L."""
    seed: int = 0
    """Seeds data order, head and adapter initialisation."""
    cache_dtype: str = "float32"
    """Storage of the prefix cache: float32, float16 or bfloat16."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        for name in ("window", "micro_batch", "grad_accum", "steps_per_round", "max_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_rounds > self.max_rounds:
            raise ValueError("min_rounds must not exceed max_rounds")
        parse_gpo(self.gpo, 1)

    def to_dict(self) -> dict:
        return asdict(self)


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


@dataclass
class Evaluation:
    loss: float
    metric: float


StageHook = Callable[[StageReport], None]


class ChainTrainer:
    """Runs a whole chain (or a baseline) on one device; ``train()`` returns the report."""

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
        self.window_blocks: dict[int, nn.Module] = {}
        self.foat_scores: list[float] | None = None
        self.stages: list[StageReport] = []
        self.start_layer = 0
        self.resumed_from: int | None = None
        """Layer a restarted chain continued at (None: it started fresh)."""
        self._resume_window: list[int] = []

    # -- set-up ---------------------------------------------------------------------

    def choose_start(self) -> int:
        """FOAT start layer (probe on the first samples), unless configured."""
        if self.config.start_layer is not None:
            if not 0 <= self.config.start_layer < self.L:
                raise ValueError(f"start layer {self.config.start_layer} not in 0..{self.L - 1}")
            return self.config.start_layer
        n = min(self.config.foat_samples, len(self.train_data))
        batch = self.train_data.batch(slice(0, n))
        self.foat_scores = probe_cka(self.model, batch.input_ids, batch.attention_mask)
        return choose_start_layer(self.foat_scores, self.config.foat_threshold)

    @cached_property
    def _model_digest(self) -> str:
        return digest_files([self.model.model_dir / "config.json", *self.model.checkpoint.files])

    def _fingerprint(self, split: EncodedSplit) -> str:
        return digest_json(
            [self._model_digest, split.digest(), str(self.model.dtype), self.config.seed]
        )

    def _open_cache(self, name: str, split: EncodedSplit) -> PrefixCache:
        return PrefixCache.open(
            self.workdir / "cache" / name,
            fingerprint=self._fingerprint(split),
            num_samples=len(split),
            seq_len=split.input_ids.shape[1],
            hidden_size=self.model.config.hidden_size,
            dtype=getattr(torch, self.config.cache_dtype),
        )

    def _bring_cache_to(self, cache: PrefixCache, split: EncodedSplit, layer: int) -> None:
        """Reuse what is on disk when valid, then advance block by block to ``layer``."""
        digests = [
            digest_tensors(self._final_of(i)) if self._final_of(i) else "none" for i in range(layer)
        ]
        if not cache.usable_for(layer, digests):
            embeddings = self.model.load_embeddings()
            cache.write_initial(
                lambda sl: embeddings(split.input_ids[sl], split.attention_mask[sl]),
                layer=0,
                batch_size=self.config.micro_batch * 4,
            )
            del embeddings
        while cache.layer < layer:
            index = cache.layer
            block = self._frozen_block(index)
            cache.advance(
                lambda h, mask, block=block: block(
                    h.to(self.model.dtype), self.model.attention_context(mask)
                ),
                split.attention_mask,
                adapter_digest=digests[index],
                batch_size=self.config.micro_batch * 4,
            )

    def _final_of(self, layer: int) -> dict[str, torch.Tensor]:
        prefix = f"layers.{layer}."
        return {k: v for k, v in self.final_adapters.items() if k.startswith(prefix)}

    def _frozen_block(self, layer: int) -> nn.Module:
        """Block ``layer`` with its final adapter (if any), for inference."""
        block = self.model.load_block(layer)
        final = self._final_of(layer)
        if final:
            add_lora(block, layer, self.config.lora)
            load_adapter_state(block, layer, final)
        return block.eval()

    # -- one stage ------------------------------------------------------------------

    def _window_forward(
        self, h: torch.Tensor, batch: Batch, window: list[int]
    ) -> tuple[torch.Tensor, object]:
        ctx = self.model.attention_context(batch.attention_mask)
        for layer in window:
            h = self.window_blocks[layer](h, ctx)
        return h, ctx

    def _loss(self, h: torch.Tensor, batch: Batch, ctx, foresight: nn.Module | None):
        local = self.objective.loss(h, batch)
        if foresight is None:
            return local
        return local + self.gpo_lambda * self.objective.loss(foresight(h, ctx), batch)

    def _entry_states(self, cache: PrefixCache | None, split: EncodedSplit, idx) -> torch.Tensor:
        if cache is not None:
            return cache.read(idx).to(self.model.dtype)
        embeddings = self._embeddings
        return embeddings(split.input_ids[idx], split.attention_mask[idx])

    @torch.no_grad()
    def evaluate_window(self, cache: PrefixCache | None, window: list[int]) -> Evaluation:
        """Validation loss and metric with the head right after the window."""
        for block in self.window_blocks.values():
            block.eval()
        loss_sum, correct, count = 0.0, 0, 0
        n = len(self.val_data)
        for start in range(0, n, self.config.micro_batch * 4):
            idx = np.arange(start, min(n, start + self.config.micro_batch * 4))
            batch = self.val_data.batch(idx)
            h = self._entry_states(cache, self.val_data, idx)
            h, _ = self._window_forward(h, batch, window)
            s_loss, s_correct, s_count = self.objective.score(h, batch)
            loss_sum, correct, count = loss_sum + s_loss, correct + s_correct, count + s_count
        return Evaluation(loss_sum / max(count, 1), correct / max(count, 1))

    def train_stage(
        self,
        layer: int,
        window: list[int],
        train_cache: PrefixCache | None,
        val_cache: PrefixCache | None,
        foresight: nn.Module | None,
        max_rounds: int,
    ) -> StageReport:
        """Rounds of local steps on the window until validation loss converges."""
        started = time.perf_counter()
        params = [p for j in window for p in trainable_adapter_params(self.window_blocks[j])]
        params += [p for p in self.objective.parameters() if p.requires_grad]
        if foresight is not None:
            params += [p for p in foresight.parameters() if p.requires_grad]
        if not params:
            # Nothing to train (``head`` mode of an LM task: the untuned model): evaluate only.
            evaluation = self.evaluate_window(val_cache, window)
            return StageReport(
                layer=layer,
                window=list(window),
                steps=0,
                rounds=0,
                train_loss=math.nan,
                val_loss=evaluation.loss,
                val_metric=evaluation.metric,
                seconds=time.perf_counter() - started,
            )
        optimizer = torch.optim.AdamW(
            params, lr=self.config.lr, weight_decay=self.config.weight_decay
        )
        best, since_best, rounds, steps = math.inf, 0, 0, 0
        train_losses: list[float] = []
        evaluation = Evaluation(math.nan, math.nan)
        n = len(self.train_data)
        bar = tqdm(
            total=max_rounds * self.config.steps_per_round,
            desc=f"layer {layer} window {window[0]}-{window[-1]}" if window else "head",
            unit="step",
            disable=not self.progress,
            leave=False,
        )
        while rounds < max_rounds:
            for block in self.window_blocks.values():
                block.train()
            for _ in range(self.config.steps_per_round):
                optimizer.zero_grad(set_to_none=True)
                for _ in range(self.config.grad_accum):
                    idx = np.sort(
                        self.rng.choice(n, size=min(self.config.micro_batch, n), replace=False)
                    )
                    batch = self.train_data.batch(idx)
                    h = self._entry_states(train_cache, self.train_data, idx)
                    h, ctx = self._window_forward(h, batch, window)
                    loss = self._loss(h, batch, ctx, foresight) / self.config.grad_accum
                    loss.backward()
                    train_losses.append(loss.item() * self.config.grad_accum)
                optimizer.step()
                steps += 1
                bar.update()
                bar.set_postfix(loss=f"{train_losses[-1]:.4f}")
            rounds += 1
            evaluation = self.evaluate_window(val_cache, window)
            bar.set_postfix(
                val_loss=f"{evaluation.loss:.4f}", val_metric=f"{evaluation.metric:.4f}"
            )
            if evaluation.loss < best * (1 - self.config.tolerance):
                best, since_best = evaluation.loss, 0
            else:
                since_best += 1
            if rounds >= self.config.min_rounds and since_best >= self.config.patience:
                break
        bar.close()
        recent = train_losses[-self.config.steps_per_round * self.config.grad_accum :]
        return StageReport(
            layer=layer,
            window=list(window),
            steps=steps,
            rounds=rounds,
            train_loss=float(np.mean(recent)) if recent else math.nan,
            val_loss=evaluation.loss,
            val_metric=evaluation.metric,
            seconds=time.perf_counter() - started,
        )

    # -- whole runs -----------------------------------------------------------------

    def _load_window_block(self, layer: int) -> None:
        block = self.model.load_block(layer)
        add_lora(block, layer, self.config.lora)
        self.window_blocks[layer] = block

    def _finalise(self, layer: int) -> None:
        block = self.window_blocks.pop(layer)
        self.final_adapters.update(adapter_state(block, layer))

    def train(self, on_stage: StageHook | None = None) -> list[StageReport]:
        """Run the configured mode to the end; final adapters land in ``final_adapters``."""
        mode = self.config.mode
        if mode == "chain":
            self._train_chain(on_stage)
        else:
            self._train_single_stage(on_stage)
        return self.stages

    def _record(
        self, report: StageReport, meter: PeakMemoryMeter, on_stage: StageHook | None
    ) -> None:
        report.peak_mem_bytes = meter.reading.peak_bytes
        report.baseline_mem_bytes = meter.reading.baseline_bytes
        self.stages.append(report)
        if on_stage is not None:
            on_stage(report)

    def _train_chain(self, on_stage: StageHook | None) -> None:
        resumed = self._load_chain_state()
        if resumed is None:
            self.start_layer = self.choose_start()
        s, Q = self.start_layer, self.config.window
        foresight = self._make_foresight(s)
        first = s
        if resumed is not None:
            first, tensors = resumed
            self._restore_trainables(first, foresight, tensors)
        train_cache = self._open_cache("train", self.train_data)
        val_cache = self._open_cache("val", self.val_data)
        for layer in range(first, self.L):
            lo = max(s, layer - Q + 1)
            with PeakMemoryMeter(self.model.device) as meter:
                for old in [j for j in self.window_blocks if j < lo]:
                    self._finalise(old)
                self._bring_cache_to(train_cache, self.train_data, lo)
                self._bring_cache_to(val_cache, self.val_data, lo)
                self._load_window_block(layer)
                if foresight is not None:
                    foresight.retire_below(layer)
                stage_foresight = foresight if layer < self.L - 1 else None
                window = list(range(lo, layer + 1))
                report = self.train_stage(
                    layer, window, train_cache, val_cache, stage_foresight, self.config.max_rounds
                )
            self._record(report, meter, on_stage)
            self._save_chain_state(layer + 1, foresight)
        for old in sorted(self.window_blocks):
            self._finalise(old)

    # -- resuming an interrupted chain ---------------------------------------------------

    @property
    def _state_path(self) -> Path:
        return self.workdir / "chain_state.safetensors"

    def _state_key(self) -> str:
        return digest_json(
            [self.config.to_dict(), self._fingerprint(self.train_data), self.val_data.digest()]
        )

    def _save_chain_state(self, next_layer: int, foresight: nn.Module | None) -> None:
        """After every stage: everything needed to continue at ``next_layer`` (atomic)."""
        tensors = {f"final.{k}": v for k, v in self.final_adapters.items()}
        for layer, block in self.window_blocks.items():
            tensors.update({f"window.{k}": v for k, v in adapter_state(block, layer).items()})
        for name, param in self.objective.named_parameters():
            if param.requires_grad:
                tensors[f"objective.{name}"] = param.detach().clone()
        if foresight is not None:
            tensors.update(
                {f"foresight.{k}": v.detach().clone() for k, v in foresight.state_dict().items()}
            )
        info = {
            "key": self._state_key(),
            "next_layer": next_layer,
            "start_layer": self.start_layer,
            "window_layers": sorted(self.window_blocks),
            "foat_scores": self.foat_scores,
            "rng": self.rng.bit_generator.state,
            "stages": [asdict(r) for r in self.stages],
        }
        save_adapter_file(self._state_path, AdapterFile(tensors, info))

    def _load_chain_state(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(next layer, saved tensors) of a matching earlier run in ``workdir``, else None."""
        if not self._state_path.is_file():
            return None
        try:
            saved = load_adapter_file(self._state_path)
        except AdapterFileError:
            return None
        info = saved.info
        if info.get("key") != self._state_key() or info["next_layer"] >= self.L:
            return None
        self.start_layer = info["start_layer"]
        self.foat_scores = info["foat_scores"]
        self.rng.bit_generator.state = info["rng"]
        self.stages = [StageReport(**r) for r in info["stages"]]
        self.resumed_from = info["next_layer"]
        self._resume_window = info["window_layers"]
        return info["next_layer"], saved.tensors

    def _restore_trainables(
        self, next_layer: int, foresight: nn.Module | None, tensors: dict[str, torch.Tensor]
    ) -> None:
        self.final_adapters = {
            k.removeprefix("final."): v for k, v in tensors.items() if k.startswith("final.")
        }
        window_state = {
            k.removeprefix("window."): v for k, v in tensors.items() if k.startswith("window.")
        }
        for layer in self._resume_window:
            self._load_window_block(layer)
            load_adapter_state(self.window_blocks[layer], layer, window_state)
        objective_state = {
            k.removeprefix("objective."): v
            for k, v in tensors.items()
            if k.startswith("objective.")
        }
        with torch.no_grad():
            for name, param in self.objective.named_parameters():
                if name in objective_state:
                    param.copy_(objective_state[name])
        if foresight is not None:
            foresight.retire_below(next_layer - 1)
            foresight_state = {
                k.removeprefix("foresight."): v
                for k, v in tensors.items()
                if k.startswith("foresight.")
            }
            foresight.load_state_dict(foresight_state)

    def _make_foresight(self, start: int) -> nn.Module | None:
        if self.gpo_kind == "none" or self.gpo_lambda == 0:
            return None
        if self.gpo_kind == "proxy":
            return ProxyBranch(
                self.model.config.hidden_size,
                self.config.proxy_rank,
                range(start + 1, self.L),
                seed=self.config.seed,
            )
        return _DepthLimited(ExactForesight(self.model, range(start + 1, self.L)), self.gpo_depth)

    def _train_single_stage(self, on_stage: StageHook | None) -> None:
        mode, L = self.config.mode, self.L
        first = {"e2e": 0, "topk": L - min(self.config.topk, L), "head": L}[mode]
        self.start_layer = first
        rounds = self.config.baseline_rounds or self.config.max_rounds * L
        with PeakMemoryMeter(self.model.device) as meter:
            if mode == "e2e":
                self._embeddings = self.model.load_embeddings()
                train_cache = val_cache = None
            else:
                train_cache = self._open_cache("train", self.train_data)
                val_cache = self._open_cache("val", self.val_data)
                self._bring_cache_to(train_cache, self.train_data, first)
                self._bring_cache_to(val_cache, self.val_data, first)
            for layer in range(first, L):
                self._load_window_block(layer)
            window = list(range(first, L))
            report = self.train_stage(L - 1, window, train_cache, val_cache, None, rounds)
        self._record(report, meter, on_stage)
        for old in sorted(self.window_blocks):
            self._finalise(old)


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
    h = torch.cat(
        [
            model.load_embeddings()(
                data.input_ids[i : i + batch_size], data.attention_mask[i : i + batch_size]
            )
            for i in range(0, len(data), batch_size)
        ]
    )
    for layer in range(model.num_layers):
        block = model.load_block(layer)
        prefix = f"layers.{layer}."
        own = {k: v for k, v in adapters.items() if k.startswith(prefix)}
        if own:
            add_lora(block, layer, lora)
            load_adapter_state(block, layer, own)
        block.eval()
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
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, len(data), batch_size):
        s_loss, s_correct, s_count = objective.score(
            h[i : i + batch_size], data.batch(slice(i, i + batch_size))
        )
        loss_sum, correct, count = loss_sum + s_loss, correct + s_correct, count + s_count
    return Evaluation(loss_sum / max(count, 1), correct / max(count, 1))
