"""Peak memory per stage of ``chain`` vs ``e2e`` vs ``topk`` training (DESIGN.md §3, §7).

What runs. For each shape and mode, the product's ``ChainTrainer`` (``chainfed train``'s
code path) trains a few optimiser steps on synthetic token data and its
``PeakMemoryMeter`` measures every stage. Each run (shape, mode, depth) is its own fresh
Python process, so one mode's heap, allocator state and file mappings never show up in
another's figures; every worker gets the same environment (allocator settings included),
which the report records.

::

    parent: write random checkpoints ──> per shape and run: spawn a worker ──> JSON, MD, PNG
    worker: imports ─> process_baseline() ─> model, data, objective ─> ChainTrainer stages
                                                                        └ per stage: malloc_trim,
                                                                          reset peak, measure

Shapes (``--shapes``):

* ``minilm``  all-MiniLM-L6-v2, real packaged weights (6 layers, d=384), classification.
* ``smollm2`` SmolLM2-135M-Instruct, real packaged weights (30 layers, d=576), causal LM.
* ``roberta-large``  random-weight safetensors written from the real config (24 layers,
  d=1024), classification. Memory does not depend on weight values.
* ``llama2-7b``  random-weight safetensors from the real config (32 layers, d=4096),
  causal LM. On CPU only a slice of it runs (``--layers N``, default 4; see "Slice").

Stages. ``chain`` runs the chain from layer 0 (every layer trained; FOAT not run), so the
prefix cache is built and advanced through every layer: one round of ``--steps``
optimiser steps per stage (``max_rounds`` 1), window ``--window``, GPO ``--gpo``. ``e2e``
(LoRA on every layer, full backprop) and ``topk`` (LoRA on the last ``--topk`` layers,
prefix cache below them) are one stage of one round; so is ``e2e-streamed`` (only when
``--modes`` names it: e2e's gradient with every block recomputed in backward and its pages
given back after each use, from the cached embedding output). Every stage ends with the trainer's
validation pass. Objectives: bert shapes, a linear head on the mean-pooled state over 3
classes; llama shapes, the model's own frozen final norm + LM head with the loss on the
second half of every sequence (the "response"). Tokens are uniform random ids (ids < 3,
the special tokens, excluded), every token real (no padding).

Measured. CPU: the kernel's RSS high-water mark per stage (``proc_vmhwm``) minus the
process baseline, the RSS of the idle worker after its imports and before the model is
touched (``process_baseline()``). The figure holds everything the stage needs: weights,
activations, gradients, optimiser state, the LM head, the prefix-cache pass, memory the
allocator kept, and torch library code paged in on first use (reported separately).
CUDA: ``max_memory_allocated`` per stage (tensors only, baseline 0). A mode's figure is
the maximum over its stages; the headline is ``e2e / chain``. Compute dtype ``--dtype``
(the shared device option: float32 on CPU, bfloat16 on a CUDA device that has it);
trainable tensors float32 in every case (``chainfed.agent.runtime.precision``).

Where the bytes go. Every stage also records its peak's parts (``account_stages``):
frozen weights (the most blocks that existed at once, counted by ``StreamingModel``),
saved activations (the peak of what autograd held for backward, through
``saved_tensors_hooks``), adapters + AdamW state, one micro-batch of the prefix cache, and
the rest (the peak less those: backward transients, the validation pass, allocator
leftovers, library pages).

Comparisons (``--compare``, ``COMPARISONS``). Beside the chain run, the chain's first
``--compare-stages`` (3) stages run again in their own worker with one setting changed —
``no recompute`` (``ChainConfig.recompute`` off: every window block keeps its activations)
and ``no prefetch`` (``StreamingModel(prefetch=False)``: blocks read on the compute
thread) — and are set against the same stages of the chain run: peak ratio and
stage-time ratio, from one run on one machine.

Samples. Each split has ``--samples`` sequences (default one micro-batch): every step
sees one micro-batch, and the prefix-cache and validation passes (which the trainer runs
at up to 4 x micro-batch under ``no_grad``) run at one micro-batch. ``--samples`` = 4 x
batch measures those passes at their full batch (slower).

Slice (a ``slice_on_cpu`` shape on CPU, i.e. ``llama2-7b``). Weights are written for the
first N = ``--layers`` blocks only (plus embeddings, final norm and LM head), and:

* ``chain`` runs with the real config (32 layers: GPO proxies for every later layer, as at
  full depth) for its first N stages, which need blocks 0..N-1 only (and the next K with
  ``--gpo exact:K``, whose weights are then written too): measured, not extrapolated.
  Later stages, not run, hold a window of the same size and no more foresight.
* ``e2e`` (and ``e2e-streamed``) runs at N/2 and N layers (the real config with
  ``num_hidden_layers`` set) and is extrapolated as affine in depth:
  ``P(L) = P(N) + (L - N) * (P(N) - P(N/2)) / (N - N/2)``; the slope is one block's weights plus
  its saved activations (and allocator retention).
* ``topk`` runs at N layers; its stage holds the last k blocks at any depth, so that
  figure stands for full depth.

On CUDA every shape runs at full depth, nothing extrapolated.

Usage::

    python benchmarks/memory.py                       # all four shapes (~8-20 min, 2 CPU cores)
    python benchmarks/memory.py --shapes roberta-large --batch 16 --seq 128
    python benchmarks/memory.py --shapes llama2-7b --layers 4 --rank 16 --out runs/mem

Outputs in ``--out`` (default ``benchmarks/results/memory-<timestamp>``): ``memory.json``
(every stage of every run), ``memory.md`` (the tables, also printed) and ``memory.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from chainfed.agent.app.options import add_device_arguments, device_setup_from_args
from chainfed.agent.convert.synthetic_checkpoint import checkpoint_layout, write_random_checkpoint
from chainfed.agent.errors import ChainFedError
from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.runtime.model_config import ModelConfig
from chainfed.agent.runtime.precision import DTYPES, dtype_name
from chainfed.agent.training.chain import ChainConfig, ChainTrainer, EncodedSplit, StageReport
from chainfed.agent.training.memory_meter import (
    CUDA,
    SAMPLING,
    VMHWM,
    malloc_trim,
    process_baseline,
    release_large_frees_to_os,
    vmhwm_supported,
)
from chainfed.agent.training.objectives import build_objective
from chainfed.proto.chain_rules import parse_gpo
from chainfed.proto.units import format_bytes

# FacebookAI/roberta-large, config.json as published on the Hugging Face hub.
ROBERTA_LARGE = {
    "architectures": ["RobertaForMaskedLM"],
    "model_type": "roberta",
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "hidden_act": "gelu",
    "vocab_size": 50265,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "layer_norm_eps": 1e-5,
}

# meta-llama/Llama-2-7b-hf, config.json as published on the Hugging Face hub.
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 11008,
    "hidden_act": "silu",
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

DEFAULT_MODES = ("chain", "e2e", "topk")
MODES = (*DEFAULT_MODES, "e2e-streamed")
"""``e2e-streamed`` (every block recomputed in backward, pages given back after each use)
runs only when ``--modes`` names it."""
COMPARISONS: dict[str, dict[str, Any]] = {
    "no recompute": {"recompute": False},
    "no prefetch": {"prefetch": False},
}
"""Variants of the chain run, each the first ``--compare-stages`` stages in its own
worker, compared with the same stages of the chain run: name -> ``RunSpec`` fields.
Frozen-weight storage (``--weights``) is not a comparison: it applies to every run of the
invocation, e2e included, so each ratio stays like for like."""
NUM_CLASSES = 3
LABEL_TOKENS = [3, 4, 5]
"""Label-word token ids for the LM objective's accuracy (values do not matter here)."""
FIRST_ORDINARY_ID = 3
"""Synthetic token ids start here: ids 0-2 are pad/bos/eos in these vocabularies."""
SHARD_BYTES = 1 << 30


@dataclass(frozen=True)
class Shape:
    """One model the benchmark measures, with its default micro-batch, sequence and rank."""

    name: str
    batch: int
    seq: int
    rank: int
    task: str
    """``classify`` (bert family) or ``lm`` (llama family)."""
    packaged: str | None = None
    """Alias of a packaged model with real weights (``minilm``, ``smollm2``) ..."""
    hf_config: dict[str, Any] | None = None
    """... or the HF config random weights are written from."""
    slice_on_cpu: bool = False
    """On CPU, run a slice of ``--layers`` blocks (see the module docstring)."""
    paper_ratio: float | None = None
    """The e2e/chain peak-memory ratio the method's paper reports for this model."""


SHAPES = {
    "minilm": Shape("minilm", batch=16, seq=128, rank=8, task="classify", packaged="minilm"),
    "smollm2": Shape("smollm2", batch=8, seq=64, rank=8, task="lm", packaged="smollm2"),
    "roberta-large": Shape(
        "roberta-large",
        batch=16,
        seq=128,
        rank=8,
        task="classify",
        hf_config=ROBERTA_LARGE,
        paper_ratio=16.87,
    ),
    "llama2-7b": Shape(
        "llama2-7b",
        batch=4,
        seq=256,
        rank=16,
        task="lm",
        hf_config=LLAMA2_7B,
        slice_on_cpu=True,
        paper_ratio=4.5,
    ),
}


@dataclass(frozen=True)
class Options:
    """Settings shared by every run of one benchmark."""

    modes: tuple[str, ...] = DEFAULT_MODES
    layers: int = 4
    """Blocks of the CPU slice of ``slice_on_cpu`` shapes."""
    window: int = 2
    """DLCT window Q of ``chain``."""
    topk: int = 2
    """Layers ``topk`` trains."""
    gpo: str = "proxy"
    """GPO foresight of ``chain``."""
    steps: int = 2
    """Optimiser steps per stage."""
    samples: int | None = None
    """Sequences per split; None = one micro-batch."""
    device: str = "cpu"
    dtype: str = "float32"
    """Compute dtype of the frozen weights and activations."""
    weights: str = "float"
    """Storage of the frozen block weights (``--weights``): ``float`` or ``int8``."""
    seed: int = 0
    tmp_dir: str | None = None
    """Where random checkpoints and prefix caches go (None: the system temp folder)."""
    compare: tuple[str, ...] = tuple(COMPARISONS)
    """``COMPARISONS`` run beside the chain."""
    compare_stages: int = 3
    """Chain stages each comparison runs (stage 0 builds the cache; later ones hold a full
    window)."""
    recompute_chunks: int = 1
    """``ChainConfig.recompute_chunks`` of chain and topk runs (e2e never recomputes)."""


@dataclass(frozen=True)
class RunSpec:
    """One worker process: one mode of one model at one depth."""

    shape: str
    mode: str
    model_dir: str
    layers: int
    """Depth of the model's config."""
    task: str
    batch: int
    seq: int
    rank: int
    samples: int
    window: int
    topk: int
    gpo: str
    steps: int
    device: str
    workdir: str
    seed: int = 0
    dtype: str = "float32"
    weights: str = "float"
    stages: int | None = None
    """Run only the chain's first ``stages`` stages (None: ``ChainTrainer.train()``)."""
    recompute: bool = True
    """``ChainConfig.recompute`` of the run (e2e never recomputes)."""
    recompute_chunks: int = 1
    """``ChainConfig.recompute_chunks`` of the run."""
    prefetch: bool = True
    """``StreamingModel(prefetch=...)``: streamed blocks read ahead on a background thread."""
    variant: str | None = None
    """Name of the ``COMPARISONS`` entry this run measures (None: the mode as configured)."""

    def chain_config(self) -> ChainConfig:
        return ChainConfig(
            mode=self.mode,
            topk=self.topk,
            window=self.window,
            gpo=self.gpo,
            start_layer=0,
            lora=LoRAConfig(rank=self.rank, seed=self.seed),
            micro_batch=self.batch,
            steps_per_round=self.steps,
            min_rounds=1,
            max_rounds=1,
            baseline_rounds=1,
            seed=self.seed,
            recompute=self.recompute,
            recompute_chunks=self.recompute_chunks,
        )


@dataclass
class ShapeResult:
    """All runs of one shape and what they add up to at full depth."""

    shape: str
    weights: str
    task: str
    batch: int
    seq: int
    rank: int
    full_layers: int
    slice_layers: int | None
    """Blocks with weights on CPU for a sliced shape (None: the whole model ran)."""
    model_bytes: dict[str, int]
    runs: list[dict[str, Any]]
    full_depth: dict[str, dict[str, Any]] = field(default_factory=dict)
    """mode -> {"peak_above_baseline", "how"} (+ "at_depth", "slope_per_layer" when
    extrapolated); "how" is ``measured``, ``first_stages``, ``extrapolated`` or
    ``depth_independent``."""
    ratio_e2e_chain: float | None = None
    ratio_e2e_topk: float | None = None
    paper_ratio: float | None = None
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    """Per ``COMPARISONS`` run: its first stages against the same stages of the chain run
    (peaks above baseline, stage seconds, and their ratios)."""


# -- the worker: one mode in a fresh process --------------------------------------------


def synthetic_split(cfg: ModelConfig, task: str, n: int, seq: int, seed: int) -> EncodedSplit:
    """``n`` random sequences of ``seq`` real tokens; for ``lm`` the loss covers the second
    half of every sequence."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_ORDINARY_ID, cfg.vocab_size, (n, seq), generator=generator)
    mask = torch.ones(n, seq, dtype=torch.long)  # (N, T)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)  # (N,)
    if task == "classify":
        return EncodedSplit(ids, mask, labels)
    loss_mask = torch.zeros(n, seq, dtype=torch.long)
    loss_mask[:, seq // 2 :] = 1
    return EncodedSplit(ids, mask, labels, loss_mask)


def _on_device(split: EncodedSplit, device: str) -> EncodedSplit:
    loss_mask = None if split.loss_mask is None else split.loss_mask.to(device)
    tensors = (split.input_ids, split.attention_mask, split.labels)
    return EncodedSplit(*(t.to(device) for t in tensors), loss_mask)


def measure(spec: RunSpec) -> dict[str, Any]:
    """Train ``spec.mode`` in this process; per-stage peaks as the trainer measured them.

    Call it in a process that has touched no model yet: the baseline is recorded first.
    """
    release_large_frees_to_os()
    baseline = process_baseline()
    libraries_start = library_rss()
    cuda = torch.device(spec.device).type == "cuda"
    model = StreamingModel(
        spec.model_dir,
        device=spec.device,
        dtype=DTYPES[spec.dtype],
        prefetch=spec.prefetch,
        weights=spec.weights,
    )
    train = synthetic_split(model.config, spec.task, spec.samples, spec.seq, spec.seed)
    val = synthetic_split(model.config, spec.task, spec.samples, spec.seq, spec.seed + 1)
    if cuda:  # token tensors where the model is; the trainer indexes them per micro-batch
        train, val = _on_device(train, spec.device), _on_device(val, spec.device)
    objective = build_objective(
        model, spec.task, num_labels=NUM_CLASSES, label_token_ids=LABEL_TOKENS, seed=spec.seed
    )
    trainer = ChainTrainer(
        model, objective, train, val, spec.chain_config(), Path(spec.workdir), progress=False
    )
    accounts = account_stages(trainer, spec)
    started = time.perf_counter()
    reports = trainer.train() if spec.stages is None else first_stages(trainer, spec.stages)
    seconds = time.perf_counter() - started
    stages = []
    for r, account in zip(reports, accounts, strict=True):
        above = r.peak_mem_bytes - r.baseline_mem_bytes
        rest = above - sum(account.values())
        stages.append(
            {
                "layer": r.layer,
                "window": r.window,
                "peak_bytes": r.peak_mem_bytes,
                "above_baseline": above,
                "seconds": r.seconds,
                "bytes": {**account, "rest": rest},
            }
        )
    top = max(stages, key=lambda s: s["above_baseline"])
    libraries_end = library_rss()
    return {
        "shape": spec.shape,
        "mode": spec.mode,
        "layers": model.num_layers,
        "method": CUDA if cuda else (VMHWM if vmhwm_supported() else SAMPLING),
        "baseline_bytes": 0 if cuda else baseline,
        "peak_bytes": top["peak_bytes"],
        "peak_above_baseline": top["above_baseline"],
        "peak_stage": top["layer"],
        "library_pages_bytes": (
            None if libraries_start is None else libraries_end - libraries_start
        ),
        "seconds": seconds,
        "stages": stages,
        "block_reads": sum(model.loader.reads.values()),
        "spec": asdict(spec),
    }


class SavedTensors:
    """Bytes autograd holds for backward, as they come and go: a ``saved_tensors_hooks``
    pair whose packed handle counts its storage while it lives (each storage once, however
    many nodes save it; frozen weights, which are parameters, not counted)."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def pack(self, tensor: torch.Tensor) -> Any:
        if isinstance(tensor, torch.nn.Parameter):
            return tensor
        return _Saved(self, tensor)

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _add(self, key: int, nbytes: int) -> None:
        self._refs[key] = self._refs.get(key, 0) + 1
        if self._refs[key] == 1:
            self.live += nbytes
            self.peak = max(self.peak, self.live)

    def _drop(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= nbytes


class _Saved:
    def __init__(self, counter: SavedTensors, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        self.counter, self.tensor = counter, tensor
        self.key, self.nbytes = storage.data_ptr(), storage.nbytes()
        counter._add(self.key, self.nbytes)

    def __del__(self) -> None:
        self.counter._drop(self.key, self.nbytes)


def account_stages(trainer: ChainTrainer, spec: RunSpec) -> list[dict[str, int]]:
    """Wrap ``trainer.run_stage`` so that each stage also records where its bytes went;
    the returned list fills as stages run. Per stage:

    * ``frozen_weights``: the most frozen blocks that existed at once (``StreamingModel``
      counts them) × one block's bytes in the compute dtype, plus the embeddings for e2e
      (held all stage) — chain and topk hold them only to build the prefix cache;
    * ``saved_activations``: the peak of tensors held for backward (``SavedTensors``);
    * ``adapter_state``: every trainable tensor (adapters, head, proxies) with its
      gradient and two AdamW moments, float32;
    * ``cache_batch``: one micro-batch of prefix-cache states (chain and topk).

    ``rest`` (filled by ``measure``) is the stage's peak above baseline less these: the
    transients of backward, the validation pass, the LM head slices, the allocator's
    leftovers and library pages paged in. Each part is its own maximum over the stage, not
    its value at the moment of the peak, so ``rest`` can come out negative: a block that
    exists need not be resident (the checkpoint is memory-mapped; its pages come in when
    the block first computes).
    """
    model = trainer.model
    cfg = model.config
    groups = checkpoint_layout(cfg)
    itemsize = model.dtype.itemsize
    block_bytes = sum(math.prod(shape) for _, shape in groups[1].values()) * itemsize
    embedding_bytes = sum(math.prod(shape) for _, shape in groups[0].values()) * itemsize
    accounts: list[dict[str, int]] = []
    saved = SavedTensors()
    run_stage = trainer.run_stage

    def accounted(layer: int, rounds_cap: int) -> StageReport:
        model.reset_peak_resident()
        saved.reset_peak()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            report = run_stage(layer, rounds_cap)
        trainables = trainer.trainable_state().values()
        frozen = model.peak_resident_blocks * block_bytes
        if spec.mode == "e2e":
            frozen += embedding_bytes
        cache = 0 if spec.mode == "e2e" else spec.batch * spec.seq * cfg.hidden_size
        accounts.append(
            {
                "frozen_weights": frozen,
                "saved_activations": saved.peak,
                "adapter_state": 4 * 4 * sum(p.numel() for p in trainables),
                "cache_batch": cache * itemsize,
            }
        )
        return report

    trainer.run_stage = accounted
    return accounts


def first_stages(trainer: ChainTrainer, count: int) -> list[StageReport]:
    """The chain's first ``count`` stages, one round each, as ``ChainTrainer.train`` runs
    a stage (``ChainTrainer.run_stage``)."""
    trainer.set_start_layer(trainer.choose_start())
    first = trainer.start_layer
    return [trainer.run_stage(layer, rounds_cap=1) for layer in range(first, first + count)]


def library_rss() -> int | None:
    """Resident bytes of the shared libraries mapped into this process (torch's kernels
    are paged in on first use); None where ``/proc/self/smaps`` is unavailable."""
    total, in_library = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                first = line.split(maxsplit=1)[0]
                if "-" in first and not first.endswith(":"):  # a mapping's header line
                    in_library = ".so" in line.rsplit("/", 1)[-1]
                elif in_library and first == "Rss:":
                    total += int(line.split()[1]) * 1024
    except OSError:
        return None
    return total


def worker_main(spec_path: str, result_path: str) -> int:
    spec = RunSpec(**json.loads(Path(spec_path).read_text()))
    result = measure(spec)
    Path(result_path).write_text(json.dumps(result, indent=2))
    return 0


def run_isolated(spec: RunSpec) -> dict[str, Any]:
    """``measure(spec)`` in a fresh interpreter; a failed run comes back with ``error``."""
    workdir = Path(spec.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = workdir / "spec.json", workdir / "result.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", spec_path, result_path]
    env = dict(os.environ)
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - started
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if done.returncode != 0 or not result_path.is_file():
        why = "killed (out of memory?)" if done.returncode < 0 else done.stderr.strip()[-2000:]
        return {
            "shape": spec.shape,
            "mode": spec.mode,
            "layers": spec.layers,
            "error": f"exit {done.returncode}: {why}",
            "spec": asdict(spec),
        }
    return {**json.loads(result_path.read_text()), "process_seconds": wall, "cpu_seconds": cpu}


# -- the parent: models, runs, extrapolation, report ------------------------------------


def full_depth_config(shape: Shape) -> dict[str, Any]:
    if shape.hf_config is not None:
        return shape.hf_config
    from chainfed.agent.convert.assets import resolve_model

    return json.loads((resolve_model(shape.packaged) / "config.json").read_text())


@dataclass(frozen=True)
class PlannedRun:
    """One worker to start: mode, depth of the model config, chain stages to run."""

    mode: str
    layers: int
    stages: int | None = None
    variant: str | None = None


def plan_runs(shape: Shape, options: Options, full: int) -> tuple[list[PlannedRun], int | None]:
    """The runs of ``shape`` and the number of blocks that need weights (None: all).

    Full depth for every mode, except a ``slice_on_cpu`` shape on CPU (module docstring,
    "Slice"): chain on the real depth for its first N stages, e2e at N/2 and N layers,
    topk at N layers.
    """
    n = options.layers
    sliced = shape.slice_on_cpu and torch.device(options.device).type == "cpu" and n < full
    compared = []
    if "chain" in options.modes:
        stages = min(options.compare_stages, n if sliced else full)
        compared = [PlannedRun("chain", full, stages, variant) for variant in options.compare]
    if not sliced:
        return [PlannedRun(mode, full) for mode in options.modes] + compared, None
    runs = []
    for mode in options.modes:
        if mode == "chain":
            runs.append(PlannedRun("chain", full, stages=n))
        elif mode in ("e2e", "e2e-streamed"):
            runs += [PlannedRun(mode, n // 2), PlannedRun(mode, n)]
        else:
            runs.append(PlannedRun(mode, n))
    return runs + compared, n


def prepare_models(
    shape: Shape,
    depths: set[int],
    weight_blocks: int | None,
    tmp: Path,
    weights: str = "float",
    dtype: str = "float32",
) -> dict[int, Path]:
    """A model folder per config depth. Packaged: its folder. Random: weights written once
    for ``weight_blocks`` blocks (or the full depth) in the compute ``dtype``, as a real
    checkpoint of that dtype would hold them (the stages read any dtype into the compute
    dtype; a float32 llama2-7b is twice the bytes to write). Every depth's folder holds its
    own config.json and links to those files (a block a run never reaches needs no weights).
    With int8 weights each folder's int8 cache is built here, so the one-time quantisation
    is in no worker's figures."""
    dirs = _model_dirs(shape, depths, weight_blocks, tmp, DTYPES[dtype])
    if weights == "int8":
        for folder in set(dirs.values()):
            StreamingModel(folder, weights="int8").int8_weights()
        malloc_trim()
    return dirs


def _model_dirs(
    shape: Shape, depths: set[int], weight_blocks: int | None, tmp: Path, dtype: torch.dtype
) -> dict[int, Path]:
    if shape.packaged is not None:
        from chainfed.agent.convert.assets import resolve_model

        return {depth: resolve_model(shape.packaged, progress=False) for depth in depths}
    blocks = weight_blocks or max(depths)
    weights = tmp / f"{shape.name}-weights-{blocks}"
    write_random_checkpoint(
        {**shape.hf_config, "num_hidden_layers": blocks},
        weights,
        dtype=dtype,
        max_shard_bytes=SHARD_BYTES,
    )
    malloc_trim()
    dirs = {}
    for depth in sorted(depths):
        folder = tmp / f"{shape.name}-L{depth}"
        folder.mkdir(parents=True, exist_ok=True)
        for path in weights.glob("*.safetensors*"):
            (folder / path.name).symlink_to(path)
        config = {**shape.hf_config, "num_hidden_layers": depth}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        dirs[depth] = folder
    return dirs


def model_bytes(hf_config: dict[str, Any], task: str, rank: int) -> dict[str, int]:
    """float32 sizes of the model's parts, from its tensor layout."""
    cfg = ModelConfig.from_hf(hf_config)
    groups = checkpoint_layout(cfg)

    def size(group) -> int:
        return sum(math.prod(shape) for _, shape in group.values()) * 4

    d = cfg.hidden_size
    head = (cfg.vocab_size * d + d) * 4 if task == "lm" else (NUM_CLASSES * d + NUM_CLASSES) * 4
    block = groups[1]
    adapter = sum(rank * sum(shape) for _, shape in block.values() if len(shape) == 2)
    return {
        "embeddings": size(groups[0]),
        "block": size(block),
        "head": head,
        "adapter_per_block": adapter * 4,
    }


def extrapolate(at_depth: dict[int, int], full: int) -> tuple[int, float]:
    """Affine in depth through the two measured points: (value at ``full``, slope/layer)."""
    (l1, p1), (l2, p2) = sorted(at_depth.items())
    slope = (p2 - p1) / (l2 - l1)
    return round(p2 + slope * (full - l2)), slope


def summarise(result: ShapeResult) -> ShapeResult:
    """Fill ``full_depth`` and the ratios from the runs."""
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for run in result.runs:
        if "error" not in run and variant_of(run) is None:
            by_mode.setdefault(run["mode"], []).append(run)
    for mode, runs in by_mode.items():
        at = {r["layers"]: r["peak_above_baseline"] for r in runs}
        if result.slice_layers is None:
            entry = {"peak_above_baseline": at[result.full_layers], "how": "measured"}
        elif mode == "chain":
            entry = {"peak_above_baseline": at[result.full_layers], "how": "first_stages"}
        elif mode in ("e2e", "e2e-streamed"):
            if len(at) != 2:
                continue
            value, slope = extrapolate(at, result.full_layers)
            entry = {
                "peak_above_baseline": value,
                "how": "extrapolated",
                "slope_per_layer": slope,
                "at_depth": at,
            }
        else:
            entry = {"peak_above_baseline": at[result.slice_layers], "how": "depth_independent"}
        result.full_depth[mode] = entry
    chain = by_mode.get("chain", [None])[0]
    for run in result.runs:
        if chain is not None and "error" not in run and variant_of(run) is not None:
            result.comparisons.append(compare_runs(run, chain))
    peak = {m: v["peak_above_baseline"] for m, v in result.full_depth.items()}
    if "e2e" in peak and peak.get("chain", 0) > 0:
        result.ratio_e2e_chain = peak["e2e"] / peak["chain"]
    if "e2e" in peak and peak.get("topk", 0) > 0:
        result.ratio_e2e_topk = peak["e2e"] / peak["topk"]
    return result


def variant_of(run: dict[str, Any]) -> str | None:
    return run.get("spec", {}).get("variant")


def compare_runs(variant: dict[str, Any], chain: dict[str, Any]) -> dict[str, Any]:
    """A comparison run against the same stages of the chain run."""
    layers = {s["layer"] for s in variant["stages"]}
    same = [s for s in chain["stages"] if s["layer"] in layers]
    peak = max(s["above_baseline"] for s in variant["stages"])
    chain_peak = max(s["above_baseline"] for s in same)
    seconds = sum(s["seconds"] for s in variant["stages"])
    chain_seconds = sum(s["seconds"] for s in same)
    return {
        "variant": variant_of(variant),
        "stages": sorted(layers),
        "peak_above_baseline": peak,
        "chain_peak_above_baseline": chain_peak,
        "peak_ratio": peak / chain_peak if chain_peak > 0 else None,
        "seconds": seconds,
        "chain_seconds": chain_seconds,
        "time_ratio": chain_seconds / seconds if seconds > 0 else None,
        "block_reads": variant.get("block_reads"),
    }


def bench_shape(shape: Shape, options: Options, tmp: Path, log=print) -> ShapeResult:
    """Every planned run of ``shape``, each in its own worker process."""
    hf = full_depth_config(shape)
    full = int(hf["num_hidden_layers"])
    planned, weight_blocks = plan_runs(shape, options, full)
    log(f"{shape.name}: preparing model ({'packaged' if shape.packaged else 'random'} weights)")
    if weight_blocks is not None:  # exact foresight streams the K blocks above the window
        kind, depth = parse_gpo(options.gpo, full)
        weight_blocks = min(full, weight_blocks + (depth if kind == "exact" else 0))
    dirs = prepare_models(
        shape, {p.layers for p in planned}, weight_blocks, tmp, options.weights, options.dtype
    )
    runs = []
    for p in planned:
        spec = RunSpec(
            shape=shape.name,
            mode=p.mode,
            model_dir=str(dirs[p.layers]),
            layers=p.layers,
            task=shape.task,
            batch=shape.batch,
            seq=shape.seq,
            rank=shape.rank,
            samples=options.samples or shape.batch,
            window=options.window,
            topk=options.topk,
            gpo=options.gpo,
            steps=options.steps,
            device=options.device,
            workdir=str(tmp / f"{shape.name}-L{p.layers}-{p.mode}-{p.variant or 'main'}"),
            seed=options.seed,
            dtype=options.dtype,
            weights=options.weights,
            stages=p.stages,
            variant=p.variant,
            recompute_chunks=options.recompute_chunks,
            **COMPARISONS.get(p.variant, {}),
        )
        started = time.perf_counter()
        run = run_isolated(spec)
        what = f"  {p.mode:5s} {run_label(run)}:"
        if "error" in run:
            log(f"{what} FAILED {run['error']}")
        else:
            peak = format_bytes(run["peak_above_baseline"])
            log(
                f"{what} peak {peak} above baseline (stage {run['peak_stage']}), "
                f"{time.perf_counter() - started:.0f} s ({run.get('cpu_seconds', 0):.0f} s CPU)"
            )
        runs.append(run)
    result = ShapeResult(
        shape=shape.name,
        weights=f"packaged {shape.packaged} (real)" if shape.packaged else "random, real config",
        task=shape.task,
        batch=shape.batch,
        seq=shape.seq,
        rank=shape.rank,
        full_layers=full,
        slice_layers=options.layers if weight_blocks is not None else None,
        model_bytes=model_bytes(hf, shape.task, shape.rank),
        runs=runs,
        paper_ratio=shape.paper_ratio,
    )
    return summarise(result)


def run_label(run: dict[str, Any]) -> str:
    """``24 layers``, or ``32 layers, stages 0-3`` for a chain cut short."""
    stages = run.get("spec", {}).get("stages")
    label = f"{run['layers']} layers"
    if stages is not None and run["mode"] == "chain":
        label += f", stages 0-{stages - 1}"
    if variant_of(run) is not None:
        label += f", {variant_of(run)}"
    return label


def worker_env_summary(options: Options) -> dict[str, str]:
    """The allocator and threading settings every worker ran under."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.startswith(("MALLOC_", "GLIBC_TUNABLES", "OMP_", "MKL_", "PYTORCH_"))
    }
    return env


def machine_info(options: Options) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": options.device,
        "dtype": options.dtype,
        "weights": options.weights,
        "worker_env": worker_env_summary(options),
    }
    if torch.device(options.device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(options.device)
    return info


def run_benchmark(
    shapes: list[Shape], options: Options, out_dir: Path, *, command: str = "", log=print
) -> dict[str, Any]:
    """Measure every shape, write ``memory.json``, ``memory.md``, ``memory.png`` to
    ``out_dir`` and return the report (``command``: the command line, for the record)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if options.tmp_dir is not None:
        Path(options.tmp_dir).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = []
    for shape in shapes:  # one temporary folder per shape: its checkpoint goes when it is done
        with tempfile.TemporaryDirectory(prefix="chainfed-membench-", dir=options.tmp_dir) as tmp:
            results.append(bench_shape(shape, options, Path(tmp), log))
    report = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine_info(options),
        "options": asdict(options),
        "seconds": time.perf_counter() - started,
        "shapes": [asdict(r) for r in results],
    }
    (out_dir / "memory.json").write_text(json.dumps(report, indent=2))
    (out_dir / "memory.md").write_text(markdown(report))
    plot(report, out_dir / "memory.png")
    return report


# -- report -----------------------------------------------------------------------------


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _env_text(env: dict[str, str]) -> str:
    if not env:
        return "glibc defaults (no MALLOC_* / thread variables set)"
    return ", ".join(f"`{k}={v}`" for k, v in sorted(env.items()))


HOW = {
    "measured": "measured",
    "first_stages": "measured, first stages",
    "extrapolated": "extrapolated",
    "depth_independent": "as at the slice",
}


def markdown(report: dict[str, Any]) -> str:
    """The tables of ``memory.md``."""
    machine, options = report["machine"], report["options"]
    method = next(
        (r["method"] for s in report["shapes"] for r in s["runs"] if "method" in r), "n/a"
    )
    lines = [
        "# Peak memory: chain vs e2e vs topk",
        "",
        f"`{report.get('command') or 'python benchmarks/memory.py'}` — {report.get('date', '')}",
        "",
        f"{machine['device']} ({machine['cpu_count']} CPUs, torch {machine['torch']}), "
        f"{machine.get('dtype', 'float32')}, {machine.get('weights', 'float')} frozen weights, "
        f"method `{method}`; each run in its own fresh process; peak = max over the run's "
        "stages, above the process baseline (the idle worker after imports, before the model "
        f"is touched). chain: window {options['window']}, GPO {options['gpo']}, from layer 0; "
        f"topk: last {options['topk']} layers; {options['steps']} optimiser steps per stage. "
        f"Allocator settings of every worker: {_env_text(machine['worker_env'])}. One run, "
        "one machine: compare the ratios.",
        "",
        "| shape | weights | mode | layers run | B × T, r | peak above baseline "
        "| at full depth | e2e / mode | paper e2e / chain |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for s in report["shapes"]:
        for mode in options["modes"]:
            runs = [r for r in s["runs"] if r["mode"] == mode and variant_of(r) is None]
            measured = ", ".join(
                "failed" if "error" in r else format_bytes(r["peak_above_baseline"]) for r in runs
            )
            full = s["full_depth"].get(mode)
            at_full = (
                f"{format_bytes(full['peak_above_baseline'])} ({s['full_layers']} layers, "
                f"{HOW[full['how']]})"
                if full
                else "—"
            )
            e2e = s["full_depth"].get("e2e")
            ratio = (
                e2e["peak_above_baseline"] / full["peak_above_baseline"]
                if e2e and full and mode != "e2e" and full["peak_above_baseline"] > 0
                else None
            )
            lines.append(
                f"| {s['shape']} | {s['weights']} | {mode} "
                f"| {'; '.join(run_label(r) for r in runs)} "
                f"| {s['batch']} × {s['seq']}, {s['rank']} | {measured} | {at_full} "
                f"| {_ratio(ratio)} | {_ratio(s['paper_ratio']) if mode == 'chain' else ''} |"
            )
    lines += [
        "",
        "## e2e / chain peak memory above baseline",
        "",
        "| shape | ours | how | paper |",
        "|---|---:|---|---:|",
    ]
    for s in report["shapes"]:
        lines.append(
            f"| {s['shape']} | {_ratio(s['ratio_e2e_chain'])} | {_how_ratio(s)} "
            f"| {_ratio(s['paper_ratio'])} |"
        )
    for s in report["shapes"]:
        if s["slice_layers"] is not None:
            lines += ["", *_slice_notes(s, options["gpo"])]
    lines += [
        "",
        "## What the figures contain",
        "",
        "| shape | process baseline | embeddings | one block | head | library pages paged in "
        "(chain run) | chain's peak stage |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in report["shapes"]:
        b = s["model_bytes"]
        chain = next(
            (
                r
                for r in s["runs"]
                if r["mode"] == "chain" and "error" not in r and variant_of(r) is None
            ),
            None,
        )
        libraries = chain.get("library_pages_bytes") if chain else None
        stage = "—"
        if chain:
            top = next(st for st in chain["stages"] if st["layer"] == chain["peak_stage"])
            window = f"{top['window'][0]}-{top['window'][-1]}" if top["window"] else "-"
            above = _foresight_text(options["gpo"], chain["layers"] - 1 - top["layer"])
            stage = f"layer {top['layer']} of {chain['layers']} (window {window}{above})"
        lines.append(
            f"| {s['shape']} | {format_bytes(chain['baseline_bytes']) if chain else '—'} "
            f"| {format_bytes(b['embeddings'])} | {format_bytes(b['block'])} "
            f"| {format_bytes(b['head'])} "
            f"| {format_bytes(libraries) if libraries is not None else '—'} | {stage} |"
        )
    lines += _bytes_tables(report)
    lines += _comparison_table(report)
    failed = [r for s in report["shapes"] for r in s["runs"] if "error" in r]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"* {r['shape']} {r['mode']} {run_label(r)}: {r['error']}" for r in failed]
    cpu = sum(r.get("cpu_seconds", 0) for s in report["shapes"] for r in s["runs"])
    lines += [
        "",
        f"Wall time: {report['seconds'] / 60:.1f} min (workers' CPU time {cpu / 60:.1f} min).",
        "",
    ]
    return "\n".join(lines)


BYTE_PARTS = ("frozen_weights", "saved_activations", "adapter_state", "cache_batch", "rest")


def _bytes_row(label: str, stage: dict[str, Any]) -> str:
    parts = stage.get("bytes", {})
    cells = " | ".join(format_bytes(parts[k]) if k in parts else "—" for k in BYTE_PARTS)
    return f"| {label} | {format_bytes(stage['above_baseline'])} | {cells} |"


def _bytes_tables(report: dict[str, Any]) -> list[str]:
    """Where each run's peak stage, and every chain stage, put its bytes."""
    header = (
        "| {} | peak above baseline | frozen weights | saved activations "
        "| adapters + AdamW | cache batch | rest |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|"
    lines = ["", "## Where the bytes go: each run's peak stage", "", header.format("run"), rule]
    for s in report["shapes"]:
        for run in s["runs"]:
            if "error" in run:
                continue
            top = next(st for st in run["stages"] if st["layer"] == run["peak_stage"])
            label = f"{s['shape']} {run['mode']} ({run_label(run)}), stage {top['layer']}"
            lines.append(_bytes_row(label, top))
    for s in report["shapes"]:
        chain = next(
            (
                r
                for r in s["runs"]
                if r["mode"] == "chain" and "error" not in r and variant_of(r) is None
            ),
            None,
        )
        if chain is None:
            continue
        lines += ["", f"### {s['shape']}: every chain stage", "", header.format("stage"), rule]
        for st in chain["stages"]:
            window = f"{st['window'][0]}-{st['window'][-1]}" if st["window"] else "-"
            lines.append(_bytes_row(f"{st['layer']} (window {window})", st))
    lines += [
        "",
        "frozen weights: the most blocks that existed at once × one block (+ the embeddings, "
        "e2e); saved activations: the peak of tensors autograd held for backward; adapters + "
        "AdamW: trainable tensors × 4 (value, gradient, two moments), float32; cache batch: "
        "one micro-batch of prefix-cache states; rest: the peak less these (backward "
        "transients, the validation pass, LM-head slices, allocator leftovers, library pages).",
    ]
    return lines


def _comparison_table(report: dict[str, Any]) -> list[str]:
    rows = [(s, c) for s in report["shapes"] for c in s.get("comparisons", [])]
    if not rows:
        return []
    lines = [
        "",
        "## Recompute and prefetch: the chain's first stages, same run",
        "",
        "| shape | variant | stages | peak above baseline | chain's | variant / chain "
        "| stage seconds | chain's | chain / variant time | block reads |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, c in rows:
        lines.append(
            f"| {s['shape']} | {c['variant']} | {c['stages'][0]}-{c['stages'][-1]} "
            f"| {format_bytes(c['peak_above_baseline'])} "
            f"| {format_bytes(c['chain_peak_above_baseline'])} | {_ratio(c['peak_ratio'])} "
            f"| {c['seconds']:.1f} | {c['chain_seconds']:.1f} | {_ratio(c['time_ratio'])} "
            f"| {c['block_reads']} |"
        )
    return lines


def _foresight_text(gpo: str, layers_above: int) -> str:
    """What GPO adds to a chain stage with ``layers_above`` layers above its window."""
    kind, depth = parse_gpo(gpo, layers_above)
    if kind == "none" or layers_above == 0:
        return ""
    if kind == "proxy":
        return f", {layers_above} GPO proxies"
    return f", exact foresight through {min(depth, layers_above)} blocks"


def _how_ratio(s: dict[str, Any]) -> str:
    if s["slice_layers"] is None:
        return f"measured at {s['full_layers']} layers"
    n, full = s["slice_layers"], s["full_layers"]
    return (
        f"e2e extrapolated from {n // 2} and {n} layers to {full}; chain measured on the "
        f"{full}-layer chain, stages 0-{n - 1}"
    )


def _slice_notes(s: dict[str, Any], gpo: str) -> list[str]:
    """How the full-depth figures of a sliced shape were obtained, with the numbers."""
    n, full, b = s["slice_layers"], s["full_layers"], s["model_bytes"]
    half = n // 2
    lines = [
        f"## {s['shape']} on CPU: a slice of {n} blocks",
        "",
        f"Weights were written for the first blocks only (blocks 0-{n - 1}, plus those "
        "`--gpo exact:K` streams; plus embeddings, final norm and head); no other block "
        "was loaded.",
        "",
    ]
    modes = s["full_depth"]
    if "e2e" in modes:
        e = modes["e2e"]
        at = {int(k): v for k, v in e["at_depth"].items()}
        lines.append(
            f"* e2e, **extrapolated**: run at {half} and {n} layers (the real config with "
            f"`num_hidden_layers` set): P({half}) = {format_bytes(at[half])}, P({n}) = "
            f"{format_bytes(at[n])}. Peak taken as affine in depth: P({full}) = P({n}) + "
            f"({full} − {n}) · (P({n}) − P({half})) / {n - half} = "
            f"{format_bytes(e['peak_above_baseline'])} (slope "
            f"{format_bytes(round(e['slope_per_layer']))}/layer; one block's weights are "
            f"{format_bytes(b['block'])}; the rest is its saved activations and what the "
            "allocator kept)."
        )
    if "chain" in modes:
        chain = next(
            r
            for r in s["runs"]
            if r["mode"] == "chain" and "error" not in r and variant_of(r) is None
        )
        foresight = "no GPO" if gpo == "none" else f"GPO `{gpo}` over every later layer"
        lines.append(
            f"* chain, **measured**: the real {full}-layer config ({foresight}, as at full "
            f"depth), stages 0-{n - 1}: peak "
            f"{format_bytes(chain['peak_above_baseline'])} at stage {chain['peak_stage']}. "
            f"Stages {n}-{full - 1} were not run: each holds a window of the same size and "
            "no more foresight, so its peak is taken to be no higher."
        )
    if "topk" in modes:
        lines.append(
            f"* topk: run at {n} layers; its stage holds the last k blocks at any depth, so "
            f"{format_bytes(modes['topk']['peak_above_baseline'])} stands for {full} layers."
        )
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    """One panel per shape: chain's peak per stage, the other runs as levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    shapes = report["shapes"]
    cols = min(2, len(shapes))
    rows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    gib = float(1 << 30)
    for ax, s in zip(axes.flat, shapes, strict=False):
        for run in s["runs"]:
            if "error" in run or variant_of(run) is not None:
                continue
            if run["mode"] == "chain":
                xs = [st["layer"] for st in run["stages"]]
                ys = [st["above_baseline"] / gib for st in run["stages"]]
                ax.plot(
                    xs, ys, marker="o", markersize=3, label=f"chain per stage ({run_label(run)})"
                )
            else:
                at_full = run["layers"] == s["full_layers"]
                ax.axhline(
                    run["peak_above_baseline"] / gib,
                    linestyle="-" if at_full else "--",
                    linewidth=1.5 if at_full else 1.0,
                    color="tab:red" if run["mode"] == "e2e" else "tab:green",
                    label=f"{run['mode']} ({run_label(run)})",
                )
        e2e = s["full_depth"].get("e2e")
        if e2e and e2e["how"] == "extrapolated":
            ax.axhline(
                e2e["peak_above_baseline"] / gib,
                linestyle=":",
                color="tab:red",
                label=f"e2e extrapolated to {s['full_layers']} layers",
            )
        paper = f", paper {_ratio(s['paper_ratio'])}" if s["paper_ratio"] else ""
        ax.set_title(f"{s['shape']}: e2e/chain {_ratio(s['ratio_e2e_chain'])}{paper}", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("chain stage (active layer)")
        ax.set_ylabel("peak above baseline (GiB)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(shapes) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# -- command line -----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Peak memory per stage of chain vs e2e vs topk training, each mode in a "
        "fresh process; e2e/chain ratio per shape (see the module docstring).",
    )
    parser.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help=f"comma-separated, from {', '.join(SHAPES)} (default: all)",
    )
    parser.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma-separated, from {', '.join(MODES)} (default: {','.join(DEFAULT_MODES)})",
    )
    parser.add_argument(
        "--batch", type=int, help="micro-batch for every shape (default: per shape, see README)"
    )
    parser.add_argument(
        "--seq", type=int, help="sequence length for every shape (default: per shape)"
    )
    parser.add_argument(
        "--rank", type=int, help="LoRA rank for every shape (default: 16 llama2-7b, 8 others)"
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=4,
        help="CPU: llama2-7b gets weights for this many blocks N; chain runs its first N "
        "stages at full depth, e2e runs at N/2 and N layers and is extrapolated (default: 4; "
        "ignored on CUDA, which runs full depth)",
    )
    parser.add_argument("--window", type=int, default=2, help="chain's DLCT window (default: 2)")
    parser.add_argument("--topk", type=int, default=2, help="layers topk trains (default: 2)")
    parser.add_argument("--gpo", default="proxy", help="chain's GPO foresight (default: proxy)")
    parser.add_argument(
        "--steps", type=int, default=2, help="optimiser steps per stage (default: 2)"
    )
    parser.add_argument(
        "--samples", type=int, help="sequences per split (default: one micro-batch)"
    )
    add_device_arguments(parser)
    parser.add_argument(
        "--out", type=Path, help="output folder (default: benchmarks/results/memory-<timestamp>)"
    )
    parser.add_argument("--tmp-dir", help="folder for random checkpoints and prefix caches")
    parser.add_argument(
        "--compare",
        default=",".join(COMPARISONS),
        help=f"chain variants to compare, from {', '.join(repr(c) for c in COMPARISONS)}, "
        "comma-separated, or 'none' (default: all)",
    )
    parser.add_argument(
        "--compare-stages",
        type=int,
        default=3,
        help="chain stages each comparison runs (default: 3)",
    )
    parser.add_argument(
        "--recompute-chunks",
        type=int,
        default=1,
        help="ChainConfig.recompute_chunks of chain and topk: recomputed window blocks run "
        "the micro-batch in this many chunks of samples (default: 1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    compare = tuple(
        c.strip() for c in args.compare.split(",") if c.strip() and args.compare != "none"
    )
    unknown = [n for n in names if n not in SHAPES] + [m for m in modes if m not in MODES]
    unknown += [c for c in compare if c not in COMPARISONS]
    if unknown:
        print(f"unknown shape or mode: {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.compare_stages < 1:
        print("--compare-stages must be >= 1", file=sys.stderr)
        return 2
    if args.layers < 2:
        print("--layers must be >= 2 (e2e runs the slice at N/2 and N layers)", file=sys.stderr)
        return 2
    try:  # the trainer's own validation, before any checkpoint is written
        ChainConfig(
            window=args.window,
            topk=args.topk,
            gpo=args.gpo,
            steps_per_round=args.steps,
            recompute_chunks=args.recompute_chunks,
        )
    except ValueError as exc:
        print(f"invalid option: {exc}", file=sys.stderr)
        return 2
    try:
        precision = device_setup_from_args(args)
    except ChainFedError as exc:
        print(exc, file=sys.stderr)
        return 2
    overrides = {
        k: v for k, v in (("batch", args.batch), ("seq", args.seq), ("rank", args.rank)) if v
    }
    shapes = [replace(SHAPES[n], **overrides) for n in names]
    options = Options(
        modes=modes,
        layers=args.layers,
        window=args.window,
        topk=args.topk,
        gpo=args.gpo,
        steps=args.steps,
        samples=args.samples,
        device=str(precision.device),
        dtype=dtype_name(precision.dtype),
        weights=precision.weights,
        seed=args.seed,
        tmp_dir=args.tmp_dir,
        compare=compare,
        compare_stages=args.compare_stages,
        recompute_chunks=args.recompute_chunks,
    )
    out = args.out or Path("benchmarks/results") / time.strftime("memory-%Y%m%d-%H%M%S")
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python", "benchmarks/memory.py", *given])
    report = run_benchmark(shapes, options, out, command=command)
    print(markdown(report))
    print(f"written: {out / 'memory.json'}, {out / 'memory.md'}, {out / 'memory.png'}")
    failed = any("error" in r for s in report["shapes"] for r in s["runs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
