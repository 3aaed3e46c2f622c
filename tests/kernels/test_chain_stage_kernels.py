"""A whole chain stage of a tiny model through the Triton kernels (DESIGN.md §4).

Each path runs in its own process (``chain_stage_runner.py``): ``TRITON_INTERPRET=1``
(on CPU) must be set before ``chainfed.kernels`` is imported. The stage is layer 1 of a
chain of the tiny BERT (window 0-1, GPO proxy, three AdamW steps at lr 1e-2, validation),
once with ``CHAINFED_KERNELS=triton`` and once with ``torch``; in float32 and float16, each
with float and with int8 frozen block weights (``*:int8``).

Tolerances. float32: loss and every uploaded tensor within 1e-4. float16 (frozen
weights and activations; float32 master adapters): losses within 1e-4; the uploaded
tensors within 0.1·lr·steps = 3e-3. AdamW moves each element by about lr a step whatever
its gradient's size, so fp16 rounding that differs between the paths (the Triton
kernels accumulate the rank-r gradients in fp32 and round once, the torch path rounds
its fp16 product) can move an element with a near-zero gradient by up to lr; measured:
1.4e-3 (a GPO proxy), losses 6e-7 apart.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chainfed.kernels import triton_available

RUNNER = Path(__file__).with_name("chain_stage_runner.py")
LR, STEPS = 1e-2, 3
STATE_TOLERANCE = {
    "float32": 1e-4,
    "float16": 0.1 * LR * STEPS,
    "float32:int8": 1e-4,
    "float16:int8": 0.1 * LR * STEPS,
}


def run_stages(kernels: str, model_dir: Path, tmp: Path) -> dict:
    """{dtype: result} of ``chain_stage_runner`` with ``CHAINFED_KERNELS=kernels``."""
    out = tmp / f"{kernels}.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CHAINFED_KERNELS": kernels}
    argv = [sys.executable, str(RUNNER), str(model_dir), str(tmp / kernels), str(out)]
    proc = subprocess.run(
        [*argv, *STATE_TOLERANCE], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def stages(tiny_models, tmp_path_factory) -> dict[str, dict]:
    """{kernels: {dtype: result}} for the Triton and the torch path."""
    if not triton_available():
        pytest.skip("triton is not installed")
    model_dir = tiny_models.checkpoint("bert")
    tmp = tmp_path_factory.mktemp("chain_stage")
    return {kernels: run_stages(kernels, model_dir, tmp) for kernels in ("triton", "torch")}


@pytest.mark.parametrize("dtype", list(STATE_TOLERANCE))
def test_a_chain_stage_through_the_triton_kernels_matches_the_torch_path(stages, dtype):
    triton, torch_path = stages["triton"][dtype], stages["torch"][dtype]

    launches = triton["launches"]
    assert launches.get("forward_torch", 0) == 0 and "forward_triton" not in torch_path["launches"]
    assert launches["forward_triton"] == torch_path["launches"]["forward_torch"] > 0
    assert launches["_fused_lora_matmul"] > launches["forward_triton"]  # grad-x passes too
    assert launches["_thin_matmul"] > 0  # grad-A / grad-B reductions
    for key in ("train_loss", "val_loss"):
        assert abs(triton[key] - torch_path[key]) <= 1e-4, key
    assert triton["state"].keys() == torch_path["state"].keys()
    for name, value in triton["state"].items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(
            value, torch_path["state"][name], atol=STATE_TOLERANCE[dtype], rtol=0, msg=name
        )
