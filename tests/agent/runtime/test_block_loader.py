"""Compute–prefetch–evict (``BlockLoader`` behind ``StreamingModel.stream_blocks``):
reads overlap compute, residency stays bounded, and every block is read as often as
the pass needs it and no more.

Prepare: a tiny random bert checkpoint behind a deliberately slow reader (every
checkpoint read sleeps ``READ_S``) and blocks whose every forward sleeps ``COMPUTE_S``;
both record the time they spent. Sleeping needs no CPU, so the timings hold on a loaded
machine.
Execute: streamed passes (the hidden states of a batch, a chain stage's entry, training
steps with exact foresight) with the loader's prefetch on and off.
Assert: with prefetch the pass's wall time is well below the reads' plus the compute's
time measured in the same pass; without it, it is not; the peak number of blocks that
exist at once; the loader's read count per block.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from chainfed.agent.runtime.checkpoint import Checkpoint
from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.chain import ChainConfig, ChainTrainer, EncodedSplit
from chainfed.agent.training.objectives import ClassifyObjective

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, D = 6, 32
READ_S = 0.1
COMPUTE_S = 0.1


class SlowCheckpoint(Checkpoint):
    """A checkpoint whose every ``load`` (one block, or the embeddings) sleeps first."""

    def __init__(self, model_dir: Path, clock: Clock) -> None:
        super().__init__(model_dir)
        self.clock = clock

    def load(self, shapes, **kwargs):
        with self.clock.timing("read"):
            time.sleep(READ_S)
            return super().load(shapes, **kwargs)


class Clock:
    """Seconds spent per kind of work, from any thread."""

    def __init__(self) -> None:
        self.seconds = {"read": 0.0, "compute": 0.0}
        self._lock = threading.Lock()

    def timing(self, kind: str) -> _Timing:
        return _Timing(self, kind)

    def add(self, kind: str, seconds: float) -> None:
        with self._lock:
            self.seconds[kind] += seconds


class _Timing:
    def __init__(self, clock: Clock, kind: str) -> None:
        self.clock, self.kind = clock, kind

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.clock.add(self.kind, time.perf_counter() - self.started)


class SlowModel(StreamingModel):
    """Blocks that sleep ``COMPUTE_S`` at every forward, read through ``SlowCheckpoint``."""

    def __init__(self, model_dir: Path, *, prefetch: bool) -> None:
        super().__init__(model_dir, prefetch=prefetch)
        self.clock = Clock()
        self.checkpoint = SlowCheckpoint(self.model_dir, self.clock)

    def load_block(self, index: int) -> nn.Module:
        block = super().load_block(index)
        block.register_forward_pre_hook(lambda *_: self._compute())
        return block

    def _compute(self) -> None:
        with self.clock.timing("compute"):
            time.sleep(COMPUTE_S)


@pytest.fixture(scope="module")
def bert_dir(tiny_models) -> Path:
    return tiny_models.checkpoint("bert", hidden_size=D, num_hidden_layers=LAYERS)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def hidden_pass(model: StreamingModel) -> None:
    ids = torch.randint(1, 100, (2, 8))
    ctx = model.attention_context(torch.ones_like(ids))
    h = model.load_embeddings()(ids, torch.ones_like(ids))
    for _, block in model.stream_blocks(range(model.num_layers)):
        h = block(h, ctx)
        del block


def test_a_streamed_pass_overlaps_reads_with_compute(bert_dir):
    fast, slow = SlowModel(bert_dir, prefetch=True), SlowModel(bert_dir, prefetch=False)
    hidden_pass(StreamingModel(bert_dir))  # torch's first-call set-up, not timed

    wall_fast = timed(lambda: hidden_pass(fast))
    wall_slow = timed(lambda: hidden_pass(slow))

    serial = fast.clock.seconds["read"] + fast.clock.seconds["compute"]
    assert serial > 2 * LAYERS * min(READ_S, COMPUTE_S)
    assert wall_fast < 0.8 * serial
    assert wall_slow > 0.95 * (slow.clock.seconds["read"] + slow.clock.seconds["compute"])
    assert fast.peak_resident_blocks <= 2
    assert slow.peak_resident_blocks == 1
    assert fast.loader.reads == {("base", j): 1 for j in range(LAYERS)}


def make_trainer(model: StreamingModel, workdir: Path, **overrides) -> ChainTrainer:
    config = ChainConfig(
        **{
            "start_layer": 0,
            "window": 2,
            "gpo": "exact:all",
            "micro_batch": 4,
            "steps_per_round": 2,
            "max_rounds": 1,
            "lora": LoRAConfig(rank=2, alpha=4.0),
            **overrides,
        }
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (8, 8), generator=g)
    split = EncodedSplit(ids, torch.ones_like(ids), torch.randint(0, 3, (8,), generator=g))
    objective = ClassifyObjective(D, 3, "mean", seed=0)
    return ChainTrainer(model, objective, split, split, config, workdir, progress=False)


def test_stage_entry_reads_each_block_once_and_holds_at_most_window_plus_one(bert_dir, tmp_path):
    model = SlowModel(bert_dir, prefetch=True)
    trainer = make_trainer(model, tmp_path, gpo="none")
    trainer.set_start_layer(0)
    for layer in range(3):
        trainer.enter_stage(layer)
    model.loader.reads.clear()
    model.reset_peak_resident()

    trainer.enter_stage(3)  # the window moves from [1, 2] to [2, 3]: block 1 goes final

    # one read of block 1 (with its final adapter) advances both prefix caches, and the
    # new window block 3 is read while it runs
    assert model.loader.reads == {("final", 1): 1, ("window", 3): 1}
    assert model.peak_resident_blocks <= trainer.config.window + 1
    assert sorted(trainer.window_blocks) == [2, 3]


def test_exact_foresight_steps_read_each_later_block_once_forward_once_backward(bert_dir, tmp_path):
    steps = 2
    walls, clocks = {}, {}
    for prefetch in (True, False):
        model = SlowModel(bert_dir, prefetch=prefetch)
        trainer = make_trainer(model, tmp_path / str(prefetch))
        trainer.set_start_layer(0)
        trainer.enter_stage(1)  # window [0, 1], exact foresight through blocks 2..5
        model.loader.reads.clear()
        model.reset_peak_resident()
        model.clock.seconds = {"read": 0.0, "compute": 0.0}

        walls[prefetch] = timed(lambda trainer=trainer: trainer.train_round(steps))
        clocks[prefetch] = dict(model.clock.seconds)

        later = range(2, LAYERS)
        if prefetch:
            assert model.loader.reads == {
                **{("foresight", j): steps for j in later},
                **{("recompute", j): steps for j in later},
            }
            # the window's Q blocks, the foresight block computing and the one being read
            assert model.peak_resident_blocks <= trainer.config.window + 2
        else:
            assert model.peak_resident_blocks <= trainer.config.window + 1

    serial = clocks[True]["read"] + clocks[True]["compute"]
    assert clocks[True]["read"] >= 2 * steps * len(later) * READ_S
    assert walls[True] < 0.85 * serial
    assert walls[False] > 0.95 * (clocks[False]["read"] + clocks[False]["compute"])
    assert walls[True] < walls[False]
