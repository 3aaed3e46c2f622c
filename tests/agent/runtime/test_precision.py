"""The precision policy: device and dtype resolution, the loss scaler, host copies."""

from __future__ import annotations

import pytest
import torch

from chainfed.agent.runtime.precision import (
    MASTER_DTYPE,
    LossScaler,
    Precision,
    PrecisionError,
    default_dtype,
    host_copy,
    resolve_device,
    resolve_dtype,
)


def test_defaults_follow_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Precision.resolve() == Precision(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for capability, dtype in (((8, 7), torch.bfloat16), ((7, 2), torch.float32)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
        assert Precision.resolve() == Precision(torch.device("cuda"), dtype)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert default_dtype(torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_every_dtype_runs_on_cpu(name):
    assert resolve_dtype(name, torch.device("cpu")) == getattr(torch, name)


def test_refuses_what_the_machine_cannot_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PrecisionError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(PrecisionError, match="cpu, cuda or cuda:N"):
        resolve_device("mps")
    with pytest.raises(PrecisionError, match="unknown device"):
        resolve_device("gpu0")
    with pytest.raises(PrecisionError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (7, 2))
    with pytest.raises(PrecisionError, match="only 1 CUDA device"):
        resolve_device("cuda:1")
    with pytest.raises(PrecisionError, match="has no bfloat16"):
        resolve_dtype("bfloat16", torch.device("cuda"))


def test_host_copy_is_a_float32_cpu_copy_and_bit_exact_for_float32():
    master = torch.randn(3, 4, requires_grad=True)
    copy = host_copy(master)
    assert copy.dtype == MASTER_DTYPE and copy.device.type == "cpu" and not copy.requires_grad
    assert torch.equal(copy, master) and copy.data_ptr() != master.data_ptr()
    assert host_copy(master.to(torch.bfloat16)).dtype == torch.float32


def test_float16_scales_the_loss_and_skips_a_step_with_inf_gradients():
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = LossScaler(torch.float16, torch.device("cpu"))
    assert scaler.enabled and not LossScaler(torch.bfloat16, torch.device("cpu")).enabled

    scaler.backward((weight * torch.tensor([1.0, float("inf")])).sum())
    scaler.step(optimizer)
    assert torch.equal(weight.detach(), torch.ones(2))  # the overflowing step was skipped

    optimizer.zero_grad()
    scaler.backward((weight * 2.0).sum())
    assert weight.grad[0] > 2.0  # the gradient was scaled ...
    scaler.step(optimizer)
    torch.testing.assert_close(weight.detach(), torch.full((2,), 0.8))  # ... and unscaled
