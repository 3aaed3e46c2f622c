"""The precision policy and the device choice, decided here and nowhere else (DESIGN.md §2).

==============================  ===============================================================
frozen base weights             the compute dtype, on the device (read from safetensors into it);
                                with ``--weights int8`` a block's frozen linear weights are int8
                                with one float32 scale per output channel instead, dequantised
                                to the compute dtype inside ``lora_linear`` (embeddings, norms,
                                biases and the LM head stay in the compute dtype)
activations, prefix cache       the compute dtype (the cache may be told otherwise)
trainable tensors               float32 master weights (LoRA A and B, the task head, GPO
                                proxies) with float32 AdamW state
the adapter path                the compute dtype with float32 accumulation: ``lora_linear``
                                casts A and B to the input's dtype inside and returns their
                                gradients in float32
losses, logits that feed them   float32
CKA, evaluation metrics         float32 (CKA float64)
float16                         a dynamic loss scaler (``LossScaler``): its gradients underflow
uploads, aggregates, files      float32 on the CPU (``host_copy``), so agents with different
                                devices and dtypes federate together
seeded values                   drawn on the CPU from their generator, then moved
==============================  ===============================================================

Defaults: the device is ``cuda`` when one is available, else ``cpu``; the dtype is
``bfloat16`` on a CUDA device that supports it and ``float32`` everywhere else (CPU, and
GPUs without bf16, where ``--dtype float16`` is the opt-in half precision).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Compute dtypes by their option name."""

WEIGHTS = ("float", "int8")
"""Storage of a block's frozen linear weights: ``float`` (the compute dtype) or ``int8``
(one scale per output channel, ``chainfed.agent.runtime.int8_cache``)."""

MASTER_DTYPE = torch.float32
"""Dtype of every trainable tensor, its gradient and optimizer state, and of uploads."""


class PrecisionError(ValueError):
    """A device or dtype this machine cannot run."""


def resolve_device(name: str | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a ``torch.device``; None = cuda when available.
    A CUDA device that does not exist here is refused with a ``PrecisionError``."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise PrecisionError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise PrecisionError(f"unsupported device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PrecisionError(f"device {name!r}: this torch build sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PrecisionError(
                f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16: any CPU; a CUDA device of compute capability
    8.0 or above (Ampere and later, Jetson Orin), where it is native, not emulated."""
    return device.type == "cpu" or torch.cuda.get_device_capability(device)[0] >= 8


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a CUDA device that has it, float32 everywhere else."""
    if device.type == "cuda" and bf16_supported(device):
        return torch.bfloat16
    return torch.float32


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The compute dtype called ``name`` (None = ``default_dtype``), checked against the
    device: bfloat16 on a CUDA device without it is refused."""
    if name is None or name == "auto":
        return default_dtype(device)
    if name not in DTYPES:
        raise PrecisionError(f"unknown dtype {name!r}: use {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and not bf16_supported(device):
        raise PrecisionError(f"{device} has no bfloat16: use --dtype float16 or float32")
    return dtype


def resolve_weights(name: str | None) -> str:
    """The frozen-weight storage called ``name`` (None = ``float``); anything but
    ``WEIGHTS`` is refused with a ``PrecisionError``. Both run on every device."""
    if name is None:
        return "float"
    if name not in WEIGHTS:
        raise PrecisionError(f"unknown weights {name!r}: use {' or '.join(WEIGHTS)}")
    return name


def dtype_name(dtype: torch.dtype) -> str:
    """The option name of a compute dtype (``float32``, ``bfloat16``, ``float16``)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Precision:
    """Where a run computes and in which dtype."""

    device: torch.device
    """The compute device."""
    dtype: torch.dtype
    """The compute dtype: frozen weights and activations."""
    weights: str = "float"
    """Storage of the blocks' frozen linear weights, one of ``WEIGHTS``."""

    def __post_init__(self) -> None:
        resolve_weights(self.weights)

    @classmethod
    def resolve(
        cls, device: str | None = None, dtype: str | None = None, weights: str | None = None
    ) -> Precision:
        """From option values (None: the defaults of the module docstring)."""
        resolved = resolve_device(device)
        return cls(resolved, resolve_dtype(dtype, resolved), resolve_weights(weights))

    def describe(self) -> str:
        tail = "" if self.weights == "float" else f", {self.weights} frozen weights"
        return f"{self.device} {dtype_name(self.dtype)}{tail}"


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached float32 copy on the CPU: how a trainable tensor leaves the trainer
    (uploads, saved states, final adapters). A CPU float32 tensor is cloned bit for bit."""
    return tensor.detach().to(device="cpu", dtype=MASTER_DTYPE, copy=True)


class LossScaler:
    """Dynamic loss scaling, on only for float16 (``torch.amp.GradScaler``'s rule: start
    at 2**16, halve and skip the step on inf/NaN gradients, double after 2000 good steps).
    Off, ``backward`` and ``step`` are plain ``loss.backward()`` and ``optimizer.step()``."""

    def __init__(self, compute_dtype: torch.dtype, device: torch.device) -> None:
        self.enabled = compute_dtype == torch.float16
        self._scaler = torch.amp.GradScaler(device.type) if self.enabled else None

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self._scaler is None else self._scaler.scale(loss)).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._scaler is None:
            optimizer.step()
            return
        self._scaler.step(optimizer)
        self._scaler.update()
