"""``lora_linear``: Triton path vs torch path vs the unfused formula, saving policy, gradcheck.

The Triton kernels run in one subprocess per module (``lora_case_runner.py``): on CUDA
when there is one, otherwise on CPU under ``TRITON_INTERPRET=1``. Everything else runs in
the pytest process on the torch path (pinned by ``conftest.py``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chainfed.kernels import fused_lora, lora_linear, lora_linear_reference, triton_available

RUNNER_PATH = Path(__file__).with_name("lora_case_runner.py")
_spec = importlib.util.spec_from_file_location("lora_case_runner", RUNNER_PATH)
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)

# (atol, rtol) against the formula evaluated in fp32 on the same (rounded) inputs.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 6e-2),
}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# (leading dims of x, d_in, d_out, rank): sizes off every block size, rank 1 and 64,
# 2-, 3- and 4-D x, token counts past the 512-row split of the grad-A/B reductions.
SHAPES = [
    ((6,), 42, 123, 1),
    ((42,), 123, 6, 64),
    ((2, 3), 431, 42, 8),
    ((123,), 6, 431, 4),
    ((3, 7), 64, 64, 16),
    ((1,), 1, 1, 1),
    ((5, 2, 3), 33, 17, 2),
    ((600,), 6, 42, 8),
    ((123,), 42, 123, 64),
    ((2, 21), 123, 431, 3),
    ((6,), 431, 6, 64),
    ((1100,), 5, 7, 3),
]
LOW_PRECISION_SHAPES = [SHAPES[0], SHAPES[2], SHAPES[8]]


def make_case(
    lead: tuple[int, ...],
    d_in: int,
    d_out: int,
    rank: int,
    *,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    train_a: bool = True,
    x_grad: bool = True,
    strided_x: bool = False,
    adapter_dtype: torch.dtype | None = None,
) -> dict:
    """Inputs scaled so outputs and all gradients are O(1): unit x, weights ~ 1/√fan_in,
    upstream gradient ~ 1/√tokens (grad-A and grad-B sum over tokens). A and B in
    ``adapter_dtype`` (float32 master weights under a bf16/fp16 x), default ``dtype``."""
    gen = torch.Generator().manual_seed(d_in * 7919 + d_out * 131 + rank)

    def randn(*shape: int, std: float = 1.0, as_dtype: torch.dtype | None = None) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(as_dtype or dtype)

    return {
        "x": randn(*lead, d_in),
        "weight": randn(d_out, d_in, std=d_in**-0.5),
        "bias": randn(d_out) if bias else None,
        "lora_a": randn(rank, d_in, std=d_in**-0.5, as_dtype=adapter_dtype),
        "lora_b": randn(d_out, rank, std=rank**-0.5, as_dtype=adapter_dtype),
        "grad": randn(*lead, d_out, std=max(1, math.prod(lead)) ** -0.5),
        "scale": 1.5,
        "train_a": train_a,
        "x_grad": x_grad,
        "strided_x": strided_x,
    }


def _name(shape: tuple, dtype: torch.dtype, bias: bool, train_a: bool, extra: str = "") -> str:
    lead, d_in, d_out, rank = shape
    dims = "x".join(map(str, (*lead, d_in)))
    flags = f"{'bias' if bias else 'nobias'}-{'trainA' if train_a else 'frozenA'}"
    return f"{dims}-to{d_out}-r{rank}-{DTYPE_NAMES[dtype]}-{flags}{extra}"


CASES: dict[str, dict] = {}
for _shape in SHAPES:
    for _bias in (True, False):
        for _train_a in (True, False):
            CASES[_name(_shape, torch.float32, _bias, _train_a)] = make_case(
                *_shape, bias=_bias, train_a=_train_a
            )
for _dtype in (torch.float16, torch.bfloat16):
    for _shape in LOW_PRECISION_SHAPES:
        for _train_a in (True, False):
            CASES[_name(_shape, _dtype, True, _train_a)] = make_case(
                *_shape, dtype=_dtype, train_a=_train_a
            )
for _dtype in (torch.float16, torch.bfloat16):  # fp32 master A and B under a half x
    for _shape in LOW_PRECISION_SHAPES:
        for _train_a in (True, False):
            CASES[_name(_shape, _dtype, True, _train_a, "-fp32AB")] = make_case(
                *_shape, dtype=_dtype, train_a=_train_a, adapter_dtype=torch.float32
            )
for _train_a in (True, False):  # x from a frozen prefix: no grad-x kernel
    CASES[_name(SHAPES[2], torch.float32, True, _train_a, "-xnograd")] = make_case(
        *SHAPES[2], train_a=_train_a, x_grad=False
    )
CASES[_name(SHAPES[4], torch.float32, True, True, "-stridedx")] = make_case(
    *SHAPES[4], strided_x=True
)
for _train_a in (True, False):  # no tokens at all
    CASES[_name(((0,), 42, 123, 8), torch.float32, True, _train_a)] = make_case(
        (0,), 42, 123, 8, train_a=_train_a
    )


def reference(case: dict) -> dict:
    """Plain autograd through ``lora_linear_reference`` in fp32 on the case's inputs."""

    def fp32(tensor: torch.Tensor | None, requires_grad: bool = False) -> torch.Tensor | None:
        if tensor is None:
            return None
        return tensor.to(torch.float32, copy=True).requires_grad_(requires_grad)

    x = fp32(case["x"], case["x_grad"])
    lora_a = fp32(case["lora_a"], case["train_a"])
    lora_b = fp32(case["lora_b"], True)
    y = lora_linear_reference(
        x, fp32(case["weight"]), fp32(case["bias"]), lora_a, lora_b, case["scale"]
    )
    y.backward(fp32(case["grad"]))
    return {"y": y.detach(), "grad_x": x.grad, "grad_a": lora_a.grad, "grad_b": lora_b.grad}


def assert_matches(got: dict, want: dict, case: dict) -> None:
    """Values within the tolerance of x's dtype; y and grad-x in x's dtype, grad-A and
    grad-B in the adapter's (float32 for master weights)."""
    dtype = case["x"].dtype
    atol, rtol = TOLERANCES[dtype]
    for key in ("y", "grad_x", "grad_a", "grad_b"):
        if want[key] is None:
            assert got[key] is None, f"{key}: expected no gradient"
            continue
        expected = case["lora_a"].dtype if key in ("grad_a", "grad_b") else dtype
        assert got[key].dtype == expected, f"{key}: dtype {got[key].dtype}"
        torch.testing.assert_close(
            got[key].float(),
            want[key].float(),
            atol=atol,
            rtol=rtol,
            msg=lambda m, k=key: f"{k}: {m}",
        )


def assert_lean_saving(result: dict, case: dict) -> None:
    """Activation memory the function adds (parameters are saved by reference, no copy):
    frozen A: only ``x Aᵀ``, i.e. at most r/d_in of x (+1 KiB); trainable A: x once plus
    rank-r tensors, nothing bigger than x."""
    x = case["x"]
    d_in, rank = x.shape[-1], case["lora_a"].shape[0]
    tokens = x.numel() // d_in
    x_bytes = x.numel() * x.element_size()
    assert result["params_by_reference"], "weight, lora_a, lora_b must be saved uncopied"
    if case["train_a"]:
        assert result["activation_bytes"] <= x_bytes + tokens * rank * x.element_size()
        assert result["largest_activation"] <= max(x.numel(), tokens * rank)
    else:
        assert not result["saved_x"]
        assert result["activation_bytes"] <= rank / d_in * x_bytes + 1024


@pytest.mark.parametrize("name", list(CASES))
def test_torch_path_matches_reference(name: str) -> None:
    case = CASES[name]
    got = runner.run_case(case, "cpu")
    assert_matches(got, reference(case), case)
    assert_lean_saving(got, case)


def run_triton_cases(cases: dict[str, dict], tmp: Path) -> dict:
    """Every case of ``cases`` through the Triton path, in one subprocess (see
    ``lora_case_runner``); bf16 cases are left out under the interpreter, which multiplies
    bf16 bit patterns in tl.dot (triton-lang/triton#11584)."""
    if not triton_available():
        pytest.skip("triton is not installed")
    on_cuda = torch.cuda.is_available()
    cases = {n: c for n, c in cases.items() if on_cuda or c["x"].dtype != torch.bfloat16}
    cases_path, out_path = tmp / "cases.pt", tmp / "results.pt"
    torch.save(cases, cases_path)
    env = {**os.environ, "CHAINFED_KERNELS": "triton"}
    env.pop("TRITON_INTERPRET", None)
    if not on_cuda:
        env["TRITON_INTERPRET"] = "1"
    device = "cuda" if on_cuda else "cpu"
    proc = subprocess.run(
        [sys.executable, str(RUNNER_PATH), str(cases_path), str(out_path), device],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        pytest.fail(f"Triton case runner failed:\n{proc.stderr[-6000:]}")
    return torch.load(out_path)


def selected_cases(cases: dict[str, dict], request: pytest.FixtureRequest) -> dict[str, dict]:
    """The cases of ``cases`` that this session's selected tests name: ``-k`` deselects
    tests, not the runner's work, and on CUDA compiling and autotuning every case of every
    dtype takes minutes (``benchmarks/gpu_check.sh`` runs the bf16 ones alone)."""
    names = {
        item.callspec.params.get("name")
        for item in request.session.items
        if hasattr(item, "callspec")
    }
    return {name: case for name, case in cases.items() if name in names}


@pytest.fixture(scope="module")
def triton_results(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> dict:
    """The selected cases through the Triton path, in one subprocess."""
    return run_triton_cases(selected_cases(CASES, request), tmp_path_factory.mktemp("triton_path"))


@pytest.mark.parametrize("name", list(CASES))
def test_triton_path_matches_torch_path_and_reference(name: str, triton_results: dict) -> None:
    case = CASES[name]
    if name not in triton_results:
        pytest.skip("bf16 tl.dot is wrong under TRITON_INTERPRET (triton-lang/triton#11584)")
    got = triton_results[name]
    assert_matches(got, runner.run_case(case, "cpu"), case)
    assert_matches(got, reference(case), case)
    assert_lean_saving(got, case)


@pytest.mark.parametrize("train_a", [True, False])
def test_saved_activation_bytes(train_a: bool) -> None:
    """A (4, 32, 256) fp32 x at rank 8: x is 128 KiB, x Aᵀ 4 KiB."""
    case = make_case((4, 32), 256, 384, 8, train_a=train_a)
    result = runner.run_case(case, "cpu")
    x_bytes, h_bytes = 4 * 32 * 256 * 4, 4 * 32 * 8 * 4
    assert result["params_by_reference"]
    assert result["saved_x"] is train_a
    assert result["activation_bytes"] == (x_bytes + h_bytes if train_a else h_bytes)
    assert_lean_saving(result, case)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("train_a", [True, False])
def test_gradcheck_float64(bias: bool, train_a: bool) -> None:
    case = make_case((2, 3), 5, 4, 2, dtype=torch.float64, bias=bias)
    weight, b, scale = case["weight"], case["bias"], case["scale"]
    x = case["x"].requires_grad_()
    lora_b = case["lora_b"].requires_grad_()
    if train_a:
        lora_a = case["lora_a"].requires_grad_()
        inputs = (x, lora_a, lora_b)

        def fn(x, lora_a, lora_b):
            return lora_linear(x, weight, b, lora_a, lora_b, scale, train_a=True)
    else:
        inputs = (x, lora_b)

        def fn(x, lora_b):
            return lora_linear(x, weight, b, case["lora_a"], lora_b, scale, train_a=False)

    assert torch.autograd.gradcheck(fn, inputs)


def test_inference_ignores_frozen_flags() -> None:
    """Under no_grad a trainable-looking base is fine: nothing is differentiated."""
    case = make_case((3,), 8, 5, 2)
    weight = case["weight"].requires_grad_()
    with torch.no_grad():
        y = lora_linear(case["x"], weight, None, case["lora_a"], case["lora_b"], 2.0)
    want = lora_linear_reference(case["x"], weight, None, case["lora_a"], case["lora_b"], 2.0)
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda c: c["weight"].requires_grad_(), "frozen"),
        (lambda c: c["bias"].requires_grad_(), "frozen"),
        (lambda c: c.update(train_a=False) or c["lora_a"].requires_grad_(), "train_a=False"),
        (lambda c: c.update(x=c["x"][..., :-1]), "features"),
        (lambda c: c.update(lora_b=c["lora_b"][:, :1]), "lora_b"),
        (lambda c: c.update(bias=c["bias"][:-1]), "bias must be"),
        (lambda c: c.update(lora_a=c["lora_a"].double()), "one dtype"),
    ],
    ids=["weight-grad", "bias-grad", "frozen-a-grad", "x-shape", "b-shape", "bias-shape", "dtype"],
)
def test_rejects_bad_inputs(change, error: str) -> None:
    case = make_case((3,), 8, 5, 2)
    change(case)
    with pytest.raises(ValueError, match=error):
        lora_linear(
            case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"], 1.0,
            train_a=case["train_a"],
        )  # fmt: skip


def test_backend_env(monkeypatch: pytest.MonkeyPatch) -> None:
    case = make_case((3,), 8, 5, 2)
    args = (case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"], 1.0)
    monkeypatch.setenv("CHAINFED_KERNELS", "auto")
    torch.testing.assert_close(lora_linear(*args), lora_linear_reference(*args))
    monkeypatch.setenv("CHAINFED_KERNELS", "cuda")
    with pytest.raises(ValueError, match="CHAINFED_KERNELS"):
        lora_linear(*args)
    if not fused_lora._INTERPRET:  # this process compiled the kernels: no CPU launches
        monkeypatch.setenv("CHAINFED_KERNELS", "triton")
        with pytest.raises(RuntimeError, match="CHAINFED_KERNELS=triton"):
            lora_linear(*args)


def test_imports_without_triton() -> None:
    """Triton is optional: with it unimportable the package loads and the torch path runs."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from chainfed.kernels import LoRALinear, triton_available\n"
        "assert not triton_available()\n"
        "layer = LoRALinear(torch.nn.Linear(8, 4), rank=2, alpha=4.0)\n"
        "layer(torch.randn(3, 8)).sum().backward()\n"
        "assert layer.lora_a.grad is not None\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CHAINFED_KERNELS"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
