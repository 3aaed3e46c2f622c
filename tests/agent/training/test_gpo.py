"""GPO foresight (DESIGN.md §3): ``exact`` streams the real blocks above the window and
gives the true end-to-end gradient; ``exact:k`` uses only k of them; ``proxy`` starts as
the identity and retires a layer's proxy when the chain reaches it.

Prepare: tiny random bert and llama checkpoints (d=32, 4 layers), a random batch.
Execute: window block 1 with LoRA (B random so every adapter tensor gets a gradient),
then blocks 2..3 either through ``ExactForesight`` or loaded and run normally.
Assert: losses and gradients agree to 1e-6; block loads show the streaming.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

from chainfed.agent.runtime.lora import LoRAConfig, add_lora, trainable_adapter_params
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.chain import ChainConfig, ChainTrainer, EncodedSplit
from chainfed.agent.training.gpo import ExactForesight, ProxyBranch
from chainfed.agent.training.objectives import Batch, ClassifyObjective, LMObjective
from chainfed.proto.chain_rules import parse_gpo

D, VOCAB, L, T = 32, 100, 4, 8
WINDOW_LAYER = 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dirs(tiny_models) -> dict[str, Path]:
    return {
        family: tiny_models.checkpoint(family, hidden_size=D, num_hidden_layers=L, vocab_size=VOCAB)
        for family in ("bert", "llama")
    }


def make_split(n: int, seed: int) -> EncodedSplit:
    """Right-padded random ids, 3 classes; loss_mask on the last real token (lm)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (n,), generator=generator)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (n, T)
    ids = torch.randint(1, VOCAB, (n, T), generator=generator) * mask
    labels = torch.randint(0, 3, (n,), generator=generator)
    loss_mask = torch.zeros_like(mask)
    loss_mask[torch.arange(n), lengths - 1] = 1
    return EncodedSplit(ids, mask, labels, loss_mask)


def window_block(model: StreamingModel) -> torch.nn.Module:
    """Block 1 with LoRA whose B is random (seeded), so A and B both get gradients."""
    block = model.load_block(WINDOW_LAYER)
    add_lora(block, WINDOW_LAYER, LoRAConfig(rank=4, alpha=8.0))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in block.named_parameters():
            if name.endswith("lora_b"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return block


def make_objective(model: StreamingModel, kind: str):
    if kind == "lm":
        return LMObjective(model.streamed_lm_head(), [5, 6, 7])
    pooling = "mean" if model.config.family == "bert" else "last"
    return ClassifyObjective(D, 3, pooling, seed=0)


def window_input(model: StreamingModel, batch: Batch) -> torch.Tensor:
    """States entering the window: embeddings then frozen block 0."""
    ctx = model.attention_context(batch.attention_mask)
    with torch.no_grad():
        h = model.load_embeddings()(batch.input_ids, batch.attention_mask)
        return model.load_block(0)(h, ctx)


def loss_and_grads(model, objective, batch, h0, above):
    """Loss of window block 1 followed by ``above(h, ctx)`` and the objective, with the
    gradients of the window's adapters, the objective's parameters and the input."""
    block = window_block(model)
    ctx = model.attention_context(batch.attention_mask)
    h0 = h0.clone().requires_grad_(True)
    loss = objective.loss(above(block(h0, ctx), ctx), batch)
    params = trainable_adapter_params(block) + [
        p for p in objective.parameters() if p.requires_grad
    ]
    grads = torch.autograd.grad(loss, [*params, h0])
    return loss, grads


def plain_blocks(model: StreamingModel, layers: range):
    """The same frozen blocks, loaded once and run with ordinary autograd."""
    blocks = [model.load_block(j) for j in layers]

    def run(h, ctx):
        for block in blocks:
            h = block(h, ctx)
        return h

    return run


@pytest.mark.parametrize(
    "family, objective_kind", [("bert", "classify"), ("llama", "classify"), ("llama", "lm")]
)
def test_exact_all_gradient_equals_end_to_end_autograd(model_dirs, family, objective_kind):
    model = StreamingModel(model_dirs[family])
    batch = make_split(6, seed=1).batch(slice(0, 6))
    objective = make_objective(model, objective_kind)
    h0 = window_input(model, batch)
    above = range(WINDOW_LAYER + 1, L)

    exact_loss, exact_grads = loss_and_grads(
        model, objective, batch, h0, ExactForesight(model, above)
    )
    plain_loss, plain_grads = loss_and_grads(
        model, objective, batch, h0, plain_blocks(model, above)
    )

    torch.testing.assert_close(exact_loss, plain_loss, atol=1e-6, rtol=0)
    assert len(exact_grads) == len(plain_grads) > 2
    for exact, plain in zip(exact_grads, plain_grads, strict=True):
        assert plain.abs().max() > 0  # every compared gradient carries signal
        torch.testing.assert_close(exact, plain, atol=1e-6, rtol=1e-5)


def test_exact_foresight_streams_its_blocks(model_dirs, monkeypatch):
    """Each block above the window is loaded in forward, dropped at once (nothing but the
    input is kept for backward), and loaded again in backward to recompute. Prefetch is
    off so loads happen in call order (reading ahead: test_block_loader.py)."""
    model = StreamingModel(model_dirs["llama"], prefetch=False)
    loads: list[int] = []
    alive: list[weakref.ref] = []
    load_block = model.load_block

    def tracked(index: int) -> torch.nn.Module:
        block = load_block(index)
        loads.append(index)
        alive.append(weakref.ref(block))
        return block

    monkeypatch.setattr(model, "load_block", tracked)
    batch = make_split(4, seed=2).batch(slice(0, 4))
    ctx = model.attention_context(batch.attention_mask)
    h = torch.randn(4, T, D, requires_grad=True)

    out = ExactForesight(model, range(1, L))(h, ctx)
    gc.collect()
    assert loads == [1, 2, 3]
    assert all(ref() is None for ref in alive)  # no block survives its forward

    out.square().sum().backward()
    assert loads == [1, 2, 3, 3, 2, 1]
    assert h.grad is not None and h.grad.abs().max() > 0


def test_exact_foresight_retire_below_moves_its_first_layer(model_dirs):
    foresight = ExactForesight(StreamingModel(model_dirs["bert"]), range(1, L))
    foresight.retire_below(2)
    assert foresight.layers == range(3, L)
    foresight.retire_below(0)  # never moves down again
    assert foresight.layers == range(3, L)


# -- which blocks the trainer's foresight uses per stage ---------------------------------


def run_recording_loads(model_dir: Path, tmp_path: Path, monkeypatch, gpo: str, start: int):
    """Train a chain; for each stage, the block indices loaded above its newest layer
    (only foresight loads blocks above the window: cache and window blocks are below)."""
    model = StreamingModel(model_dir)
    loads: list[int] = []
    load_block = model.load_block
    monkeypatch.setattr(model, "load_block", lambda i: loads.append(i) or load_block(i))
    config = ChainConfig(
        start_layer=start,
        window=2,
        gpo=gpo,
        micro_batch=4,
        steps_per_round=1,
        max_rounds=1,
        lora=LoRAConfig(rank=2),
    )
    objective = ClassifyObjective(D, 3, "mean", seed=0)
    trainer = ChainTrainer(
        model, objective, make_split(16, 1), make_split(8, 2), config, tmp_path, progress=False
    )
    above: dict[int, set[int]] = {}

    def on_stage(report):
        above[report.layer] = {j for j in loads if j > report.layer}
        loads.clear()

    trainer.train(on_stage=on_stage)
    return above


@pytest.mark.parametrize("depth", [1, 2, "all"])
def test_exact_k_uses_only_the_next_k_blocks(model_dirs, tmp_path, monkeypatch, depth):
    above = run_recording_loads(model_dirs["bert"], tmp_path, monkeypatch, f"exact:{depth}", 0)
    k = L if depth == "all" else depth
    assert above == {layer: set(range(layer + 1, min(layer + k, L - 1) + 1)) for layer in range(L)}


@pytest.mark.parametrize("gpo", ["proxy", "none"])
def test_proxy_and_none_load_no_block_above_the_window(model_dirs, tmp_path, monkeypatch, gpo):
    above = run_recording_loads(model_dirs["bert"], tmp_path, monkeypatch, gpo, 1)
    assert above == {layer: set() for layer in range(1, L)}


@pytest.mark.parametrize("family, expected", [("bert", 0.1), ("llama", 0.2)])
def test_default_lambda_per_family(model_dirs, tmp_path, family, expected):
    model = StreamingModel(model_dirs[family])
    split = make_split(4, 1)
    objective = ClassifyObjective(D, 3, "mean", seed=0)
    trainer = ChainTrainer(model, objective, split, split, ChainConfig(), tmp_path)
    assert trainer.gpo_lambda == expected
    override = ChainTrainer(model, objective, split, split, ChainConfig(gpo_lambda=0.5), tmp_path)
    assert override.gpo_lambda == 0.5


# -- proxies ------------------------------------------------------------------------------


def test_proxy_branch_starts_as_the_identity():
    branch = ProxyBranch(D, 4, range(1, L), seed=0)
    h = torch.randn(3, T, D)
    assert torch.equal(branch(h, None), h)
    assert all(not proxy.up.any() for proxy in branch.proxies.values())


def test_proxy_branch_trains_and_is_seeded():
    branch = ProxyBranch(D, 4, range(1, L), seed=0)
    same = ProxyBranch(D, 4, range(1, L), seed=0)
    assert all(
        torch.equal(a, b) for a, b in zip(branch.parameters(), same.parameters(), strict=True)
    )
    h = torch.randn(3, T, D)
    branch(h, None).square().sum().backward()
    ups = [proxy.up.grad for proxy in branch.proxies.values()]
    assert all(g is not None and g.abs().max() > 0 for g in ups)


def test_retire_below_drops_the_proxies_the_chain_reached():
    branch = ProxyBranch(D, 4, range(1, 6), seed=0)
    assert sorted(branch.proxies, key=int) == ["1", "2", "3", "4", "5"]
    kept = branch.proxies["4"]
    branch.retire_below(3)
    assert sorted(branch.proxies, key=int) == ["4", "5"]
    assert branch.proxies["4"] is kept
    assert len(list(branch.parameters())) == 4  # down and up of two proxies
    branch.retire_below(5)
    h = torch.randn(2, T, D)
    assert len(branch.proxies) == 0 and torch.equal(branch(h, None), h)


def test_proxy_forward_applies_layers_in_numeric_order():
    """Keys are strings: "10" must come after "9", not after "1" (without autograd; the
    reversible path's order is checked against a plain run below)."""
    branch = ProxyBranch(D, 2, range(8, 12), seed=0)
    order: list[str] = []
    for key, proxy in branch.proxies.items():
        proxy.register_forward_pre_hook(lambda m, a, key=key: order.append(key))
    with torch.no_grad():
        branch(torch.randn(1, 2, D), None)
    assert order == ["8", "9", "10", "11"]


# -- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [("proxy", ("proxy", 6)), ("none", ("none", 6)), ("exact:2", ("exact", 2))]
    + [("exact:all", ("exact", 6)), ("exact:9", ("exact", 9))],
)
def test_parse_gpo(spec, expected):
    assert parse_gpo(spec, 6) == expected


@pytest.mark.parametrize("spec", ["exact", "exact:", "exact:0", "exact:-1", "exact:x", "Proxy", ""])
def test_parse_gpo_rejects(spec):
    with pytest.raises(ValueError, match="--gpo must be"):
        parse_gpo(spec, 6)


def test_trainer_retires_proxies_as_the_chain_climbs_and_trains_the_rest(model_dirs, tmp_path):
    model = StreamingModel(model_dirs["llama"])
    config = ChainConfig(
        start_layer=0, window=2, micro_batch=4, steps_per_round=2, max_rounds=1, lr=1e-2
    )
    objective = ClassifyObjective(D, 3, "last", seed=0)
    trainer = ChainTrainer(
        model, objective, make_split(16, 1), make_split(8, 2), config, tmp_path, progress=False
    )
    proxies: dict[int, list[str]] = {}
    trained: dict[int, bool] = {}

    def on_stage(report):
        branch = trainer.foresight
        proxies[report.layer] = sorted(branch.proxies, key=int)
        trained[report.layer] = all(p.up.abs().max() > 0 for p in branch.proxies.values())

    trainer.train(on_stage=on_stage)

    assert isinstance(trainer.foresight, ProxyBranch)
    assert proxies == {layer: [str(j) for j in range(layer + 1, L)] for layer in range(L)}
    assert all(trained[layer] for layer in range(L - 1))  # the last stage has no foresight


def test_reversible_proxy_branch_gives_the_plain_gradients() -> None:
    """The reversible branch (inputs rebuilt in backward) equals running the proxies one
    by one: the same output bit for bit, gradients to fp32 rounding."""
    branch = ProxyBranch(D, 4, range(2, 11), seed=1)
    with torch.no_grad():
        for proxy in branch.proxies.values():
            proxy.up.normal_(0.0, 0.1)
    h = torch.randn(2, T, D, requires_grad=True)

    reversible = branch(h, None)
    plain = h
    for key in sorted(branch.proxies, key=int):
        plain = branch.proxies[key](plain)
    params = list(branch.parameters())
    got = torch.autograd.grad(reversible.square().sum(), [h, *params])
    expected = torch.autograd.grad(plain.square().sum(), [h, *params])

    torch.testing.assert_close(reversible, plain, rtol=0, atol=0)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_reversible_proxy_branch_saves_no_full_width_tensor_per_proxy() -> None:
    """What autograd keeps for the branch: its output plus (B, T, r) per proxy."""
    n, rank = 12, 4
    branch = ProxyBranch(D, rank, range(n), seed=0)
    h = torch.randn(2, T, D, requires_grad=True)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        branch(h, None)
    assert saved.count(torch.Size([2, T, D])) == 1
    assert saved.count(torch.Size([2, T, rank])) == n
