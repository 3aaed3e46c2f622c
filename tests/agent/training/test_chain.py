"""ChainTrainer: DLCT window transitions, O(L) prefix work and restart reuse, baseline
modes, and the final streamed evaluation (DESIGN.md §3).

Prepare: tiny random checkpoints (d=32, 4 layers, vocab 100) and random token splits.
Execute: a real ``ChainTrainer`` with a couple of optimiser steps per stage, observed
through ``on_stage``, a spy on ``enter_stage`` (what the window holds when a stage
starts) and forward hooks on the blocks the model hands out (who runs which block).
Assert: the window schedule, adapter identity and finality, block-pass counts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from chainfed.agent.federation.federated_agent import round_steps
from chainfed.agent.runtime.fingerprint import digest_json
from chainfed.agent.runtime.lora import LoRAConfig, adapter_state
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.chain import (
    ChainConfig,
    ChainTrainer,
    EncodedSplit,
    evaluate_streaming,
    pooled_features_streaming,
)
from chainfed.agent.training.objectives import ClassifyObjective, LMObjective
from chainfed.agent.training.prefix_cache import PrefixCache
from chainfed.proto.adapter_file import load_adapter_file, save_adapter_file
from chainfed.proto.messages import TrainingParams

D, VOCAB, LAYERS, CLASSES = 32, 100, 4, 3
N_TRAIN, N_VAL, T = 24, 12, 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert_dir(tiny_models) -> Path:
    return tiny_models.checkpoint("bert", hidden_size=D, num_hidden_layers=LAYERS, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def bert6_dir(tiny_models) -> Path:
    return tiny_models.checkpoint("bert", hidden_size=D, num_hidden_layers=6, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def llama_dir(tiny_models) -> Path:
    return tiny_models.checkpoint(
        "llama", hidden_size=D, num_hidden_layers=LAYERS, vocab_size=VOCAB
    )


def make_split(n: int, seed: int, *, lm: bool = False) -> EncodedSplit:
    """Right-padded random ids; for ``lm`` the last real token is the response."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (n,), generator=generator)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (n, T)
    ids = torch.randint(1, VOCAB, (n, T), generator=generator) * mask
    labels = torch.randint(0, CLASSES if not lm else 2, (n,), generator=generator)
    if not lm:
        return EncodedSplit(ids, mask, labels)
    loss_mask = torch.zeros_like(mask)
    loss_mask[torch.arange(n), lengths - 1] = 1
    ids[torch.arange(n), lengths - 1] = torch.tensor([5, 6])[labels]  # the label word
    return EncodedSplit(ids, mask, labels, loss_mask)


def fast_config(**overrides) -> ChainConfig:
    """Two steps per stage, one round, no foresight unless asked: fast on CPU."""
    settings = dict(
        start_layer=0,
        window=2,
        gpo="none",
        micro_batch=4,
        steps_per_round=2,
        max_rounds=1,
        lr=1e-2,
        lora=LoRAConfig(rank=2, alpha=4.0),
    )
    return ChainConfig(**{**settings, **overrides})


def make_trainer(
    model_dir: Path, workdir: Path, config: ChainConfig, *, lm: bool = False, train_seed: int = 1
) -> ChainTrainer:
    model = StreamingModel(model_dir)
    if lm:
        objective = LMObjective(model.streamed_lm_head(), [5, 6])
    else:
        pooling = "mean" if model.config.family == "bert" else "last"
        objective = ClassifyObjective(D, CLASSES, pooling, seed=0)
    train, val = make_split(N_TRAIN, train_seed, lm=lm), make_split(N_VAL, 2, lm=lm)
    return ChainTrainer(model, objective, train, val, config, workdir, progress=False)


def layers_of(adapters: dict[str, torch.Tensor]) -> set[int]:
    return {int(name.split(".")[1]) for name in adapters}


def of_layer(adapters: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    return {k: v for k, v in adapters.items() if k.startswith(f"layers.{layer}.")}


def assert_same_values(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def lora_b_is_zero(adapters: dict[str, torch.Tensor]) -> bool:
    return all(not v.any() for k, v in adapters.items() if k.endswith("lora_b"))


# -- DLCT window transitions ------------------------------------------------------------


@dataclass
class Snapshot:
    """What the trainer holds at one instant (stage start or end)."""

    layer: int
    window: list[int]
    blocks: dict[int, torch.nn.Module]
    adapters: dict[int, dict[str, torch.Tensor]]
    final: dict[str, torch.Tensor]


def snapshot(trainer: ChainTrainer, layer: int, window: list[int]) -> Snapshot:
    blocks = dict(trainer.window_blocks)
    return Snapshot(
        layer=layer,
        window=list(window),
        blocks=blocks,
        adapters={j: adapter_state(block, j) for j, block in blocks.items()},
        final={k: v.clone() for k, v in trainer.final_adapters.items()},
    )


def run_observed(trainer: ChainTrainer, monkeypatch) -> tuple[list[Snapshot], list[Snapshot]]:
    """Train; snapshots when each stage has been entered (window set up, before any step)
    and when it ends (``on_stage``)."""
    starts: list[Snapshot] = []
    ends: list[Snapshot] = []
    enter_stage = trainer.enter_stage

    def spy(layer: int) -> list[int]:
        window = enter_stage(layer)
        starts.append(snapshot(trainer, layer, window))
        return window

    monkeypatch.setattr(trainer, "enter_stage", spy)
    trainer.train(on_stage=lambda r: ends.append(snapshot(trainer, r.layer, r.window)))
    return starts, ends


@pytest.mark.parametrize(
    "start, window",
    [(0, 2), (1, 2), (0, 1), (2, 1), (0, 3), (1, 4)],
    ids=["s0-Q2", "s1-Q2", "s0-Q1", "s2-Q1", "s0-Q3", "s1-Q4-wider-than-chain"],
)
def test_dlct_windows_keep_q_minus_1_adapters_and_finalise_the_leaving_one(
    bert_dir, tmp_path, monkeypatch, start, window
):
    trainer = make_trainer(bert_dir, tmp_path, fast_config(start_layer=start, window=window))

    starts, ends = run_observed(trainer, monkeypatch)

    expected = [list(range(max(start, top - window + 1), top + 1)) for top in range(start, LAYERS)]
    assert [r.window for r in trainer.stages] == expected
    assert [r.layer for r in trainer.stages] == list(range(start, LAYERS))
    assert [s.window for s in starts] == expected
    for s in starts:
        # the trainer holds exactly the window's blocks; the new layer's adapter is fresh
        assert sorted(s.blocks) == s.window
        assert lora_b_is_zero(s.adapters[s.layer])
        assert not layers_of(s.final) & set(s.window)
    for prev, cur in zip(ends, starts[1:], strict=False):
        kept = [j for j in prev.window if j in cur.window]
        assert kept == cur.window[:-1]
        assert len(kept) == min(window - 1, cur.layer - start)
        for j in kept:  # carried over: the same module, trained values, not re-initialised
            assert cur.blocks[j] is prev.blocks[j]
            assert_same_values(cur.adapters[j], prev.adapters[j])
            assert not lora_b_is_zero(cur.adapters[j])
        leaving = [j for j in prev.window if j not in cur.window]
        assert len(leaving) == (1 if cur.window[0] > prev.window[0] else 0)
        for j in leaving:  # final with the values it had when its last stage ended
            assert j not in cur.blocks
            assert_same_values(of_layer(cur.final, j), prev.adapters[j])

    # a final adapter never changes again, up to the end of the run
    for j in range(start, LAYERS):
        last_stage = max(i for i, e in enumerate(ends) if j in e.window)
        value = ends[last_stage].adapters[j]
        for later in [*starts[last_stage + 1 :], *ends[last_stage + 1 :]]:
            assert_same_values(of_layer(later.final, j), value)
        assert_same_values(of_layer(trainer.final_adapters, j), value)
    assert layers_of(trainer.final_adapters) == set(range(start, LAYERS))
    assert trainer.window_blocks == {}


# -- prefix work: O(L) per chain, reused after a restart --------------------------------


class PrefixWork:
    """Samples run through embeddings / blocks inside PrefixCache.write_initial / advance
    (the prefix), and block passes anywhere else (window, evaluation, foresight)."""

    def __init__(self, monkeypatch, model: StreamingModel) -> None:
        self.embedding_samples = 0
        self.block_samples = 0
        self.other_block_samples = 0
        self._inside = False
        for name in ("write_initial", "advance"):
            monkeypatch.setattr(PrefixCache, name, self._inside_cache(getattr(PrefixCache, name)))
        load_block, load_embeddings = model.load_block, model.load_embeddings

        def counted_block(index: int) -> torch.nn.Module:
            block = load_block(index)
            block.register_forward_pre_hook(self._count_block)
            return block

        def counted_embeddings() -> torch.nn.Module:
            module = load_embeddings()
            module.register_forward_pre_hook(self._count_embeddings)
            return module

        monkeypatch.setattr(model, "load_block", counted_block)
        monkeypatch.setattr(model, "load_embeddings", counted_embeddings)

    def _inside_cache(self, method):
        def wrapper(cache, *args, **kwargs):
            self._inside = True
            try:
                return method(cache, *args, **kwargs)
            finally:
                self._inside = False

        return wrapper

    def _count_block(self, module, args) -> None:
        if self._inside:
            self.block_samples += args[0].shape[0]
        else:
            self.other_block_samples += args[0].shape[0]

    def _count_embeddings(self, module, args) -> None:
        if self._inside:
            self.embedding_samples += args[0].shape[0]


@pytest.mark.parametrize("start, window", [(0, 1), (0, 2), (2, 2), (1, 3)])
def test_prefix_work_over_a_whole_chain_is_linear_in_depth(
    bert6_dir, tmp_path, monkeypatch, start, window
):
    """Every sample passes once through the embeddings and once through each block below
    the last window bottom max(s, L-Q): ≤ L block passes, where recomputing the prefix at
    every stage would cost Σ_l lo(l) (O(L²))."""
    L = 6
    trainer = make_trainer(bert6_dir, tmp_path, fast_config(start_layer=start, window=window))
    work = PrefixWork(monkeypatch, trainer.model)

    trainer.train()

    n = N_TRAIN + N_VAL
    bottoms = [max(start, top - window + 1) for top in range(start, L)]
    assert work.embedding_samples == n
    assert work.block_samples == n * bottoms[-1]
    assert work.block_samples <= n * L
    train_cache, val_cache = trainer.caches  # per split, as the caches count it themselves
    assert train_cache.block_forward_calls == N_TRAIN * bottoms[-1]
    assert val_cache.block_forward_calls == N_VAL * bottoms[-1]
    if start == 0 and window == 1:
        assert work.block_samples < n * sum(bottoms)  # 5 passes, not 0+1+2+3+4+5 = 15
    assert work.other_block_samples > 0  # the counter does see the window's blocks


def test_restart_reuses_the_prefix_cache_when_the_window_bottom_stayed_at_start(
    bert_dir, tmp_path, monkeypatch
):
    """s=1, Q=3, L=4: windows [1], [1,2], [1,2,3]: the cache stays at layer s=1 for the whole
    chain, so a second run (new trainer and model, same workdir, data and config) does no
    embedding or block pass for the prefix at all, and trains to the same adapters."""
    config = fast_config(start_layer=1, window=3)
    first = make_trainer(bert_dir, tmp_path, config)
    first_work = PrefixWork(monkeypatch, first.model)
    first.train()
    assert (first_work.embedding_samples, first_work.block_samples) == (36, 36)

    second = make_trainer(bert_dir, tmp_path, config)
    second_work = PrefixWork(monkeypatch, second.model)
    second.train()

    assert (second_work.embedding_samples, second_work.block_samples) == (0, 0)
    assert_same_values(second.final_adapters, first.final_adapters)
    assert [r.val_loss for r in second.stages] == [r.val_loss for r in first.stages]


class Interrupted(Exception):
    pass


def interrupt_at(stage: int):
    """An ``on_stage`` hook that stops the run when the given stage (0-based) reports."""
    seen = []

    def hook(report):
        seen.append(report)
        if len(seen) == stage + 1:
            raise Interrupted

    return hook


def test_restart_of_a_chain_stopped_in_its_first_stage_starts_on_the_cached_states(
    bert_dir, tmp_path, monkeypatch
):
    """s=1, Q=2: a run stopped in its first stage leaves the cache at layer 1; the
    restarted run starts from it with zero prefix work, then advances once (1 -> 2) when
    the window moves, exactly as an uninterrupted run does."""
    config = fast_config(start_layer=1, window=2)
    with pytest.raises(Interrupted):
        make_trainer(bert_dir, tmp_path, config).train(on_stage=interrupt_at(0))

    second = make_trainer(bert_dir, tmp_path, config)
    work = PrefixWork(monkeypatch, second.model)
    work_after_stage = []
    second.train(on_stage=lambda r: work_after_stage.append(work.block_samples))

    n = N_TRAIN + N_VAL
    assert work.embedding_samples == 0
    assert work_after_stage == [0, 0, n]  # only the move to window [2, 3]


@pytest.mark.parametrize("stop_at", [1, 2])
def test_interrupted_and_resumed_chain_does_no_more_prefix_work_than_one_run(
    bert_dir, tmp_path, monkeypatch, stop_at
):
    """s=0, Q=1: the cache moves up at every stage. Stopped at stage ``stop_at`` and run
    again, the two runs together pass every sample through the embeddings once and through
    each block below the last window bottom once — no prefix is recomputed — and end with
    the adapters of an uninterrupted run."""
    config = fast_config(start_layer=0, window=1)
    uninterrupted = make_trainer(bert_dir, tmp_path / "whole", config)
    uninterrupted.train()

    first = make_trainer(bert_dir, tmp_path / "run", config)
    first_work = PrefixWork(monkeypatch, first.model)
    with pytest.raises(Interrupted):
        first.train(on_stage=interrupt_at(stop_at))
    second = make_trainer(bert_dir, tmp_path / "run", config)
    second_work = PrefixWork(monkeypatch, second.model)
    second.train()

    n = N_TRAIN + N_VAL
    assert first_work.embedding_samples + second_work.embedding_samples == n
    assert first_work.block_samples + second_work.block_samples == n * 3
    assert_same_values(second.final_adapters, uninterrupted.final_adapters)


def test_a_chain_saved_before_the_newer_settings_existed_resumes(bert_dir, tmp_path, monkeypatch):
    """A state file whose key was computed from a config without ``recompute_chunks``,
    ``backbone_dropout`` and ``foat_readout_factor`` (the release before they were added)
    resumes when they are at their defaults, and ends with the adapters of an
    uninterrupted run; with a non-default value it starts over instead of resuming a
    different setting."""
    config = fast_config(start_layer=0, window=1)
    uninterrupted = make_trainer(bert_dir, tmp_path / "whole", config)
    uninterrupted.train()

    first = make_trainer(bert_dir, tmp_path / "run", config)
    with pytest.raises(Interrupted):
        first.train(on_stage=interrupt_at(1))
    older = {
        k: v
        for k, v in config.to_dict().items()
        if k not in ("recompute_chunks", "backbone_dropout", "foat_readout_factor")
    }
    saved = load_adapter_file(first._state_path)
    saved.info["key"] = digest_json(
        [older, first._fingerprint(first.train_data), first.val_data.digest()]
    )
    save_adapter_file(first._state_path, saved)

    second = make_trainer(bert_dir, tmp_path / "run", config)
    work = PrefixWork(monkeypatch, second.model)
    second.train()
    assert work.embedding_samples == 0  # resumed on the saved cache, not started over
    assert_same_values(second.final_adapters, uninterrupted.final_adapters)

    save_adapter_file(first._state_path, saved)
    chunked = make_trainer(bert_dir, tmp_path / "run", replace(config, recompute_chunks=2))
    assert chunked._resume() is None
    readout = make_trainer(bert_dir, tmp_path / "run", replace(config, foat_readout_factor=3.0))
    assert readout._resume() is None


def test_restart_after_a_complete_chain_rebuilds_a_cache_that_moved_above_start(
    bert_dir, tmp_path, monkeypatch
):
    """What is *not* reused: a complete run starts over when run again, and with s=1, Q=2
    its cache sits at the last window bottom (layer 2), above where the new chain starts,
    so it is rebuilt from the embeddings — and the run trains to the same adapters."""
    config = fast_config(start_layer=1, window=2)
    first = make_trainer(bert_dir, tmp_path, config)
    first.train()

    second = make_trainer(bert_dir, tmp_path, config)
    work = PrefixWork(monkeypatch, second.model)
    second.train()

    n = N_TRAIN + N_VAL
    assert (work.embedding_samples, work.block_samples) == (n, 2 * n)
    assert_same_values(second.final_adapters, first.final_adapters)


def test_cache_of_other_data_is_not_reused(bert_dir, tmp_path, monkeypatch):
    """Same workdir, other training samples: the fingerprint differs, the cache is rebuilt."""
    config = fast_config(start_layer=1, window=3)
    make_trainer(bert_dir, tmp_path, config).train()
    other = make_trainer(bert_dir, tmp_path, config, train_seed=5)
    work = PrefixWork(monkeypatch, other.model)
    other.train()
    assert work.embedding_samples == N_TRAIN  # the validation cache is still valid


# -- baseline modes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, trained_layers", [("e2e", {0, 1, 2, 3}), ("topk", {2, 3}), ("head", set())]
)
def test_baseline_modes_train_the_right_layers(bert_dir, tmp_path, mode, trained_layers):
    config = fast_config(mode=mode, topk=2, baseline_rounds=2)
    trainer = make_trainer(bert_dir, tmp_path, config)
    head_before = trainer.objective.head.weight.detach().clone()

    (report,) = trainer.train()

    assert report.window == sorted(trained_layers)
    assert report.rounds == 2 and report.steps == 4
    assert layers_of(trainer.final_adapters) == trained_layers
    for layer in trained_layers:
        assert not lora_b_is_zero(of_layer(trainer.final_adapters, layer))
    assert not torch.equal(trainer.objective.head.weight, head_before)
    assert trainer.start_layer == min(trained_layers, default=4)
    # e2e holds every layer resident and needs no prefix cache; the others do
    assert (tmp_path / "cache").exists() == (mode != "e2e")


def test_head_mode_leaves_the_backbone_untouched(bert_dir, tmp_path):
    trainer = make_trainer(bert_dir, tmp_path, fast_config(mode="head"))
    trainer.train()
    val = trainer.val_data
    result = evaluate_streaming(trainer.model, trainer.objective, {}, LoRAConfig(), val)
    assert result.loss == pytest.approx(trainer.stages[-1].val_loss, rel=1e-6)


# -- the final streamed evaluation equals the last stage's ------------------------------


@pytest.mark.parametrize(
    "mode, batch_size",
    [("chain", 2), ("chain", 64), ("e2e", 2)],
    ids=["chain-same-batches", "chain-other-batches", "e2e"],
)
def test_evaluate_streaming_equals_the_last_stage(bert_dir, tmp_path, mode, batch_size):
    """The last chain stage's window output is the full network's, so the stage's
    validation figures are those of the final adapters. The trainer evaluates (and builds
    the caches) in batches of micro_batch = 2: with the same batch size
    ``evaluate_streaming`` agrees bit for bit (as ``chainfed train`` does); with other
    batches the matmuls may round differently, within 1e-6."""
    config = fast_config(mode=mode, start_layer=1, window=2, micro_batch=2)
    trainer = make_trainer(bert_dir, tmp_path, config)
    trainer.train()

    final = evaluate_streaming(
        trainer.model,
        trainer.objective,
        trainer.final_adapters,
        config.lora,
        trainer.val_data,
        batch_size=batch_size,
    )

    last = trainer.stages[-1]
    if batch_size == config.micro_batch:
        assert (final.loss, final.metric) == (last.val_loss, last.val_metric)
    else:
        assert final.loss == pytest.approx(last.val_loss, rel=1e-6)
        assert final.metric == last.val_metric


def test_pooled_features_start_from_the_cache_only_when_it_went_through_the_same_adapters(
    bert_dir, tmp_path, monkeypatch
):
    """After the chain the training rows' cache stands at the last window's bottom, built
    through the final adapters below it: a closed-form head's features start there (only
    the blocks above run) and equal the full pass bit for bit (same micro-batches).
    Adapters that differ below the cache, or lack one there, are not served from it."""
    config = fast_config(start_layer=1, window=2, micro_batch=2)
    trainer = make_trainer(bert_dir, tmp_path, config)
    trainer.train()
    adapters, top = trainer.final_adapters, trainer.L - 1
    loaded: list[int] = []
    load_block = trainer.model.load_block
    monkeypatch.setattr(
        trainer.model, "load_block", lambda layer: loaded.append(layer) or load_block(layer)
    )

    def features(cache: PrefixCache | None) -> torch.Tensor:
        loaded.clear()
        return pooled_features_streaming(
            trainer.model, trainer.objective, adapters, config.lora, trainer.train_data,
            batch_size=config.micro_batch, cache=cache,
        )  # fmt: skip

    cache = trainer.cached_rows(adapters)
    assert cache is not None and cache.layer == top - 1
    from_cache = features(cache)
    assert sorted(set(loaded)) == [top - 1, top]
    full = features(None)
    assert sorted(set(loaded)) == list(range(trainer.L))
    assert torch.equal(from_cache, full)
    changed = {k: v + 1 if k.startswith("layers.1.") else v for k, v in adapters.items()}
    assert trainer.cached_rows(changed) is None
    assert trainer.cached_rows(of_layer(adapters, top)) is None


def test_lm_chain_on_llama_with_proxy_foresight(llama_dir, tmp_path):
    """Causal-LM objective (frozen head, loss on the response token) through a chain."""
    config = fast_config(start_layer=1, window=2, gpo="proxy", micro_batch=2)
    trainer = make_trainer(llama_dir, tmp_path, config, lm=True)

    stages = trainer.train()

    assert [s.window for s in stages] == [[1], [1, 2], [2, 3]]
    assert all(torch.isfinite(torch.tensor([s.train_loss, s.val_loss])).all() for s in stages)
    assert all(0.0 <= s.val_metric <= 1.0 for s in stages)
    final = evaluate_streaming(
        trainer.model,
        trainer.objective,
        trainer.final_adapters,
        config.lora,
        trainer.val_data,
        batch_size=config.micro_batch,
    )
    assert (final.loss, final.metric) == (stages[-1].val_loss, stages[-1].val_metric)


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"mode": "chains"},
        {"window": 0},
        {"micro_batch": 0},
        {"max_rounds": 0},
        {"min_rounds": 3, "max_rounds": 2},
        {"gpo": "exact:0"},
        {"gpo": "foresight"},
    ],
)
def test_chain_config_rejects_bad_values(overrides):
    with pytest.raises(ValueError):
        ChainConfig(**overrides)


@pytest.mark.parametrize("topk", [0, -1])
def test_chain_config_rejects_topk_below_one(topk):
    with pytest.raises(ValueError):
        ChainConfig(mode="topk", topk=topk)


def test_start_layer_out_of_range_is_refused(bert_dir, tmp_path):
    trainer = make_trainer(bert_dir, tmp_path, fast_config(start_layer=4))
    with pytest.raises(ValueError, match="start layer 4"):
        trainer.train()


def test_a_pass_of_micro_batches_sees_every_training_row_once(bert_dir, tmp_path):
    # 24 rows, micro-batch 5: batches of 5, 5, 5, 5, 4 make one pass; then a new order
    trainer = make_trainer(bert_dir, tmp_path, fast_config(micro_batch=5, epoch_passes=True))
    trainer.set_start_layer(0)
    trainer.enter_stage(0)

    first = [trainer._next_rows() for _ in range(5)]
    second = [trainer._next_rows() for _ in range(5)]

    assert [len(rows) for rows in first] == [5, 5, 5, 5, 4]
    for one_pass in (first, second):
        assert sorted(int(i) for rows in one_pass for i in rows) == list(range(N_TRAIN))
    assert [r.tolist() for r in first] != [r.tolist() for r in second]


@pytest.mark.parametrize(
    ("epochs", "samples", "micro_batch", "grad_accum", "steps"),
    [(0.0, 100, 8, 1, 7), (1.0, 100, 8, 1, 13), (2.0, 100, 8, 1, 26), (1.0, 100, 8, 2, 7),
     (0.5, 3, 8, 1, 1)],
)  # fmt: skip
def test_round_steps_follow_the_shard_with_local_epochs(
    epochs, samples, micro_batch, grad_accum, steps
):
    params = TrainingParams(
        local_steps=7, local_epochs=epochs, micro_batch=micro_batch, grad_accum=grad_accum
    )
    assert round_steps(params, samples) == steps


def test_loading_a_state_says_whether_it_changed_the_weights(bert_dir, tmp_path):
    # a one-agent federation's aggregate is the agent's own update: its AdamW moments
    # stay valid only when nothing changed
    trainer = make_trainer(bert_dir, tmp_path, fast_config())
    trainer.set_start_layer(0)
    trainer.enter_stage(0)
    trainer.train_round(1)
    own = trainer.trainable_state()

    assert trainer.load_trainable_state(own) is False
    moved = dict(own)
    name = next(n for n in own if n.endswith("lora_b"))
    moved[name] = own[name] + 1e-3
    assert trainer.load_trainable_state(moved) is True
    assert torch.equal(trainer.trainable_state()[name], moved[name])


def test_trainer_refit_changes_only_the_head_after_the_last_stage(bert_dir, tmp_path):
    plain = make_trainer(bert_dir, tmp_path / "plain", fast_config())
    plain.train()
    refitted = make_trainer(bert_dir, tmp_path / "refit", fast_config(head_refit_epochs=3))
    refitted.train()

    assert plain.head_refit is None
    assert refitted.head_refit is not None and refitted.head_refit.steps > 0
    assert plain.final_adapters.keys() == refitted.final_adapters.keys()
    for name, tensor in plain.final_adapters.items():
        assert torch.equal(tensor, refitted.final_adapters[name]), name
    assert not torch.equal(plain.objective.head.weight, refitted.objective.head.weight)


def test_negative_refit_epochs_are_refused():
    with pytest.raises(ValueError, match="head_refit_epochs must be >= 0"):
        fast_config(head_refit_epochs=-1)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_rounds": 0}, "max_rounds must be >= 1, got 0"),
        ({"min_rounds": 4, "max_rounds": 3}, "min_rounds must not exceed max_rounds"),
        ({"patience": 0}, "patience must be >= 1 round, got 0"),
        ({"tolerance": -0.1}, r"tolerance must be in \[0, 1\), got -0.1"),
    ],
)
def test_a_local_chain_refuses_the_stage_rule_settings_the_coordinator_refuses(settings, message):
    with pytest.raises(ValueError, match=message):
        fast_config(**settings)
