"""Runs ``lora_linear`` forward + backward on one test case and records what it saved.

Imported by ``test_fused_lora.py`` (torch path, in the pytest process) and run as a script
for the Triton path::

    TRITON_INTERPRET=1 CHAINFED_KERNELS=triton python lora_case_runner.py CASES OUT DEVICE

A separate process because Triton fixes interpreted vs compiled when it decorates a kernel,
i.e. when ``chainfed.kernels`` is first imported: ``TRITON_INTERPRET=1`` has to be in the
environment before that, and setting it in the pytest process would reach every other test
that imports the package. CASES is a ``torch.save`` of ``{name: case}`` (see ``run_case``);
OUT receives ``{name: result}``.
"""

from __future__ import annotations

import sys

import torch

from chainfed.kernels import lora_linear


def run_case(case: dict, device: str) -> dict:
    """Forward and backward of ``lora_linear`` on ``case``.

    ``case`` holds tensors ``x, weight, bias (or None), lora_a, lora_b, grad`` (upstream
    gradient) and ``scale``, ``train_a``, ``x_grad`` (x requires grad), ``strided_x`` (feed
    x as a stride-2 view), and optionally ``weight_scale`` (the per-channel scales of an
    int8 ``weight``, counted as a parameter). Returns CPU tensors ``y, grad_x, grad_a,
    grad_b`` (``None`` where no gradient arrives) and the saved-tensor census:
    ``activation_bytes`` (saved tensors that are not one of the parameters ``weight,
    lora_a, lora_b, weight_scale``), ``largest_activation`` (elements), ``saved_x`` (whether
    x itself was saved), ``params_by_reference`` (every saved parameter is the parameter's
    own storage, not a copy).
    """
    t = {k: v.to(device, copy=True) if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    x = t["x"]
    if t["strided_x"]:
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=device)
        wide[..., ::2] = x
        x = wide[..., ::2]
    x.requires_grad_(t["x_grad"])
    weight, bias, weight_scale = t["weight"], t["bias"], t.get("weight_scale")
    lora_a = t["lora_a"].requires_grad_(t["train_a"])
    lora_b = t["lora_b"].requires_grad_(True)

    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = lora_linear(
            x,
            weight,
            bias,
            lora_a,
            lora_b,
            t["scale"],
            train_a=t["train_a"],
            weight_scale=weight_scale,
        )
    y.backward(t["grad"])

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()

    params = tuple(p for p in (weight, lora_a, lora_b, weight_scale) if p is not None)
    activations = [s for s in saved if not any(same(s, p) for p in params)]
    saved_params = [s for s in saved if any(same(s, p) for p in params)]

    def cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.detach().cpu()

    return {
        "y": cpu(y),
        "grad_x": cpu(x.grad),
        "grad_a": cpu(lora_a.grad),
        "grad_b": cpu(lora_b.grad),
        "activation_bytes": sum(s.numel() * s.element_size() for s in activations),
        "largest_activation": max((s.numel() for s in activations), default=0),
        "saved_x": any(same(s, x) for s in activations),
        "params_by_reference": len(saved_params) == len(params),
    }


def main(cases_path: str, out_path: str, device: str) -> None:
    cases = torch.load(cases_path)
    torch.save({name: run_case(case, device) for name, case in cases.items()}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
