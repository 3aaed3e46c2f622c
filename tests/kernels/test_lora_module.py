"""``LoRALinear``: PEFT semantics (init, scale, dropout), frozen base, FFA mode, export."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chainfed.kernels import LoRALinear, lora_linear_reference


def make_layer(
    d_in: int = 42, d_out: int = 17, rank: int = 4, *, dropout: float = 0.0, train_a: bool = True
) -> LoRALinear:
    """A layer with a non-zero B, so the adapter branch matters."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(d_in, d_out), rank, alpha=8.0, dropout=dropout, train_a=train_a)
    with torch.no_grad():
        layer.lora_b.normal_(0.0, rank**-0.5)
    return layer


def test_fresh_adapter_leaves_base_unchanged() -> None:
    base = nn.Linear(42, 17)
    layer = LoRALinear(base, rank=4, alpha=8.0)
    x = torch.randn(2, 5, 42)

    torch.testing.assert_close(layer(x), base(x))
    assert (layer.in_features, layer.out_features, layer.scale) == (42, 17, 2.0)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert torch.count_nonzero(layer.lora_b) == 0
    assert layer.lora_a.abs().max() <= 1 / math.sqrt(42)  # kaiming-uniform, a = √5
    assert layer.adapter_params() == {"lora_a": layer.lora_a, "lora_b": layer.lora_b}


@pytest.mark.parametrize("train_a", [True, False])
def test_forward_and_grads_match_reference(train_a: bool) -> None:
    layer = make_layer(train_a=train_a)
    x = torch.randn(2, 5, 42, requires_grad=True)
    a = layer.lora_a.detach().clone().requires_grad_(train_a)
    b = layer.lora_b.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()

    y = layer(x)
    want = lora_linear_reference(x_ref, layer.base.weight, layer.base.bias, a, b, layer.scale)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g)

    torch.testing.assert_close(y, want)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.lora_b.grad, b.grad)
    assert layer.lora_a.requires_grad is train_a
    if train_a:
        torch.testing.assert_close(layer.lora_a.grad, a.grad)
    else:
        assert layer.lora_a.grad is None
    assert layer.base.weight.grad is None and layer.base.bias.grad is None


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_matches_peft_lora_linear(dropout: float) -> None:
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import Linear as PeftLinear

    layer = make_layer(dropout=dropout)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout)
    theirs = PeftLinear(layer.base, "default", config=config, r=4, lora_alpha=8,
                        lora_dropout=dropout)  # fmt: skip
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(layer.lora_a)
        theirs.lora_B["default"].weight.copy_(layer.lora_b)
    x = torch.randn(3, 42)

    torch.manual_seed(1)  # the same dropout mask on both sides
    y = layer(x)
    torch.manual_seed(1)
    want = theirs(x)
    y.sum().backward()
    want.sum().backward()

    torch.testing.assert_close(y, want)
    torch.testing.assert_close(layer.lora_a.grad, theirs.lora_A["default"].weight.grad)
    torch.testing.assert_close(layer.lora_b.grad, theirs.lora_B["default"].weight.grad)
    merged = layer.base.weight + theirs.get_delta_weight("default")
    torch.testing.assert_close(layer.merged_weight(), merged.detach())


def test_dropout_only_in_training_and_only_on_adapter_branch() -> None:
    layer = make_layer(dropout=0.5)
    x = torch.randn(4, 42)
    w, bias, a, b = layer.base.weight, layer.base.bias, layer.lora_a, layer.lora_b

    torch.manual_seed(2)
    y = layer(x)
    torch.manual_seed(2)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, F.linear(x, w, bias) + layer.scale * (dropped @ a.T) @ b.T)

    layer.eval()
    torch.testing.assert_close(layer(x), lora_linear_reference(x, w, bias, a, b, layer.scale))


def test_shared_seed_gives_the_same_frozen_a() -> None:
    """FFA: every agent rebuilds the same frozen A from a shared seed."""
    layers = [LoRALinear(nn.Linear(42, 17), 4, 8.0, train_a=False) for _ in range(2)]
    for layer in layers:
        layer.reset_parameters(torch.Generator().manual_seed(1234))
    torch.testing.assert_close(layers[0].lora_a, layers[1].lora_a)
    assert not layers[0].lora_a.requires_grad


def test_merged_weight_reproduces_forward() -> None:
    layer = make_layer()
    x = torch.randn(5, 42)
    with torch.no_grad():
        torch.testing.assert_close(F.linear(x, layer.merged_weight(), layer.base.bias), layer(x))


@pytest.mark.parametrize(("rank", "dropout"), [(0, 0.0), (4, 1.0), (4, -0.1)])
def test_rejects_bad_hyperparameters(rank: int, dropout: float) -> None:
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(8, 8), rank, alpha=1.0, dropout=dropout)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_keeps_float32_master_adapters(dtype: torch.dtype, dropout: float) -> None:
    """Under a bf16/fp16 base, A and B are float32 parameters; the output is in the base's
    dtype and A and B get float32 gradients close to the float32 computation's."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(42, 17).to(dtype), rank=4, alpha=8.0, dropout=dropout)
    with torch.no_grad():
        layer.lora_b.normal_(0.0, 0.5)
    x = torch.randn(3, 5, 42)
    g = torch.randn(3, 5, 17)

    y = layer(x.to(dtype))
    torch.manual_seed(1)  # the same dropout mask for both runs
    (layer(x.to(dtype)).float() * g).sum().backward()
    assert (layer.lora_a.dtype, layer.lora_b.dtype) == (torch.float32, torch.float32)
    assert y.dtype == dtype
    assert (layer.lora_a.grad.dtype, layer.lora_b.grad.dtype) == (torch.float32, torch.float32)

    a = layer.lora_a.detach().clone().requires_grad_()
    b = layer.lora_b.detach().clone().requires_grad_()
    weight, bias = layer.base.weight.float(), layer.base.bias.float()
    torch.manual_seed(1)
    x_in = F.dropout(x, dropout) if dropout else x
    want = F.linear(x, weight, bias) + layer.scale * F.linear(F.linear(x_in, a), b)
    (want * g).sum().backward()
    # A dot product of inputs rounded to ``dtype`` errs by a few units of its precision
    # times the sum of the terms' magnitudes (not of the result, which may cancel).
    g2, x2 = g.reshape(-1, 17).abs(), x_in.reshape(-1, 42).abs()
    bound_a = layer.scale * (g2 @ b.detach().abs()).T @ x2  # (r, d_in)
    bound_b = layer.scale * g2.T @ (x2 @ a.detach().abs().T)  # (d_out, r)
    eps = torch.finfo(dtype).eps
    assert ((layer.lora_a.grad - a.grad).abs() <= 4 * eps * bound_a).all()
    assert ((layer.lora_b.grad - b.grad).abs() <= 4 * eps * bound_b).all()


def test_adapters_of_another_half_dtype_are_refused() -> None:
    """A and B are either x's dtype or float32 master weights, nothing else."""
    base = nn.Linear(8, 4).to(torch.bfloat16)
    layer = LoRALinear(base, rank=2, alpha=4.0, adapter_dtype=torch.float16)
    with pytest.raises(ValueError, match="lora_a and lora_b that dtype or float32"):
        layer(torch.randn(2, 8, dtype=torch.bfloat16))
