"""int8 frozen weights: the quantiser's per-channel bound, ``lora_linear`` on an int8 base
(torch path vs the dequantised formula, Triton path vs torch path), ``Int8Linear`` and
``LoRALinear`` over it. The Triton cases run in one subprocess under ``TRITON_INTERPRET=1``
(on CUDA when there is one), as in ``test_fused_lora.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from chainfed.kernels import (
    Int8Linear,
    LoRALinear,
    dequantize_int8,
    lora_linear,
    quantize_int8,
)
from chainfed.kernels import int8 as int8_module


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fused = _load("test_fused_lora")  # make_case, reference tolerances, saving checks
runner = fused.runner


def int8_case(*shape, dtype: torch.dtype = torch.float32, **kwargs) -> dict:
    """A ``test_fused_lora`` case whose weight is replaced by its int8 quantisation."""
    case = fused.make_case(*shape, dtype=dtype, **kwargs)
    q, s = quantize_int8(case["weight"].float())
    return case | {"weight": q, "weight_scale": s}


def reference(case: dict) -> dict:
    """``test_fused_lora.reference`` with the int8 weight dequantised to fp32: the
    specification ``x (s·W_q)ᵀ + b + scale (x Aᵀ) Bᵀ``."""
    dequantised = dequantize_int8(case["weight"], case["weight_scale"], torch.float32)
    return fused.reference(case | {"weight": dequantised})


INT8_CASES: dict[str, dict] = {}
for _shape in fused.SHAPES[:6] + [fused.SHAPES[7]]:
    for _bias in (True, False):
        for _train_a in (True, False):
            INT8_CASES[fused._name(_shape, torch.float32, _bias, _train_a, "-int8")] = int8_case(
                *_shape, bias=_bias, train_a=_train_a
            )
for _dtype in (torch.float16, torch.bfloat16):
    for _shape in fused.LOW_PRECISION_SHAPES:
        INT8_CASES[fused._name(_shape, _dtype, True, True, "-fp32AB-int8")] = int8_case(
            *_shape, dtype=_dtype, adapter_dtype=torch.float32
        )
INT8_CASES[fused._name(fused.SHAPES[2], torch.float32, True, True, "-xnograd-int8")] = int8_case(
    *fused.SHAPES[2], x_grad=False
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (123, 431), (64, 4096)])
def test_round_trip_is_within_half_a_step_per_channel(
    shape: tuple[int, int], dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    row_scales = torch.logspace(-4, 2, shape[0])[:, None]  # channels of very different sizes
    weight = (torch.randn(shape, generator=gen) * row_scales).to(dtype)
    q, s = quantize_int8(weight)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (shape[0],)
    w = weight.float()
    absmax = w.abs().amax(dim=1)
    torch.testing.assert_close(s, absmax / 127, rtol=1e-6, atol=0)
    assert (q.abs().amax(dim=1) == 127).all(), "each channel's largest entry maps to ±127"
    error = (w - dequantize_int8(q, s, torch.float32)).abs().amax(dim=1)
    # half a step, plus the fp32 rounding of one division and one product (|w| <= absmax)
    assert (error <= s / 2 + absmax * 2**-21).all(), ((error - s / 2) / absmax).max()


def test_zero_channel_and_bad_weights() -> None:
    weight = torch.zeros(3, 5)
    weight[1] = torch.arange(5.0)
    q, s = quantize_int8(weight)
    assert s[0] == 1 and s[2] == 1 and (q[0] == 0).all() and (q[2] == 0).all()
    torch.testing.assert_close(
        dequantize_int8(q, s, torch.float32)[1], weight[1], atol=2e-2, rtol=0
    )
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="float"):
        quantize_int8(torch.ones(3, 4, dtype=torch.int8))


@pytest.mark.parametrize("name", list(INT8_CASES))
def test_torch_path_matches_dequantised_formula(name: str) -> None:
    case = INT8_CASES[name]
    got = runner.run_case(case, "cpu")
    fused.assert_matches(got, reference(case), case)
    fused.assert_lean_saving(got, case)


def test_blocked_dequantisation_matches_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch path's bounded float copy (a few output channels at a time) gives the
    whole-matrix result, forward and every gradient, up to float32 summation order: a block's
    matmul may add in another order than the whole matrix's (a few ulp on some CPUs), so the
    check is assert_close's float32 default; a misplaced block would be off by whole values."""
    case = int8_case((2, 21), 123, 431, 3)
    whole = runner.run_case(case, "cpu")
    monkeypatch.setattr(int8_module, "DEQUANT_BLOCK_BYTES", 7 * 123 * 4)  # 7 channels a block
    blocked = runner.run_case(case, "cpu")
    for key in ("y", "grad_x", "grad_a", "grad_b"):
        torch.testing.assert_close(blocked[key], whole[key])


@pytest.fixture(scope="module")
def triton_int8_results(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> dict:
    """The selected int8 cases through the Triton path, in one subprocess."""
    cases = fused.selected_cases(INT8_CASES, request)
    return fused.run_triton_cases(cases, tmp_path_factory.mktemp("triton_int8"))


@pytest.mark.parametrize("name", list(INT8_CASES))
def test_triton_path_matches_torch_int8_path(name: str, triton_int8_results: dict) -> None:
    """Scale after the K loop (forward), gradient pre-scaled per channel (grad-x): the same
    values as the torch path's dequantised weight, and the formula's."""
    case = INT8_CASES[name]
    if name not in triton_int8_results:
        pytest.skip("bf16 tl.dot is wrong under TRITON_INTERPRET (triton-lang/triton#11584)")
    got = triton_int8_results[name]
    fused.assert_matches(got, runner.run_case(case, "cpu"), case)
    fused.assert_matches(got, reference(case), case)
    fused.assert_lean_saving(got, case)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda c: c.pop("weight_scale"), "needs its weight_scale"),
        (lambda c: c.update(weight=c["weight"].float()), "only an int8 weight"),
        (lambda c: c.update(weight_scale=c["weight_scale"][:-1]), "weight_scale must be"),
        (lambda c: c.update(weight_scale=c["weight_scale"].half()), "weight_scale must be"),
    ],
    ids=["no-scale", "float-weight-with-scale", "scale-shape", "scale-dtype"],
)
def test_rejects_bad_int8_inputs(change, error: str) -> None:
    case = int8_case((3,), 8, 5, 2)
    change(case)
    with pytest.raises(ValueError, match=error):
        lora_linear(
            case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"], 1.0,
            weight_scale=case.get("weight_scale"),
        )  # fmt: skip


def _int8_from(linear: torch.nn.Linear) -> Int8Linear:
    module = Int8Linear.like(linear)
    q, s = quantize_int8(linear.weight)
    module.weight.copy_(q)
    module.weight_scale.copy_(s)
    with torch.no_grad():
        module.bias.copy_(linear.bias)
    return module


def test_int8_linear_matches_dequantised_linear_and_saves_no_float_weight() -> None:
    torch.manual_seed(0)
    module = _int8_from(torch.nn.Linear(40, 24))
    x = torch.randn(5, 3, 40, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = module(x)
    g = torch.randn_like(y)
    y.backward(g)
    weight = module.dequantized_weight(torch.float32)
    y_ref = F.linear(x_ref, weight, module.bias)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    assert all(t.dtype in (torch.int8,) or t.numel() == 24 for t in saved), [
        (t.dtype, tuple(t.shape)) for t in saved
    ]
    assert module.bias.grad is None


def test_lora_linear_module_over_an_int8_base() -> None:
    """``LoRALinear`` wraps an ``Int8Linear`` like an ``nn.Linear``: forward and grads equal
    the same adapter over the dequantised float linear; merged weight too."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(32, 20)
    base = _int8_from(linear)
    with torch.no_grad():
        linear.weight.copy_(base.dequantized_weight(torch.float32))
    quantised, plain = LoRALinear(base, 4, 8.0), LoRALinear(linear, 4, 8.0)
    with torch.no_grad():
        plain.lora_a.copy_(quantised.lora_a)
        plain.lora_b.copy_(torch.randn_like(plain.lora_b))
        quantised.lora_b.copy_(plain.lora_b)
    x = torch.randn(6, 32)
    y_q, y_p = quantised(x), plain(x)
    torch.testing.assert_close(y_q, y_p, atol=1e-5, rtol=1e-5)
    y_q.square().sum().backward()
    y_p.square().sum().backward()
    torch.testing.assert_close(quantised.lora_a.grad, plain.lora_a.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(quantised.lora_b.grad, plain.lora_b.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(quantised.merged_weight(), plain.merged_weight())
    assert quantised.base.weight.dtype == torch.int8 and quantised.lora_a.dtype == torch.float32
