"""Nothing on the training, evaluation, FOAT, GPO or generation paths creates a tensor
without saying on which device (DESIGN.md §2: "Nothing in a hot path creates a tensor
off the model's device").

On a CPU-only machine a tensor created without a device lands on the model's device by
luck; on CUDA it lands on the CPU and the next operation fails. So the probe does not
need a GPU: a ``TorchFunctionMode`` sees every tensor factory call (``torch.zeros``,
``arange``, ``tensor``, ...) and records those made from ChainFed's own source files
without a ``device`` argument.

Prepare: tiny random checkpoints and token splits (encoded before the probe: the data
set lives on the CPU by design). Execute under the probe: FOAT, the prefix cache, a
stage with each GPO mode, its validation, the streamed final evaluation and, for the
decoder, sampled generation. Assert: no factory call without a device.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import chainfed.agent
import chainfed.kernels
import chainfed.proto
from chainfed.agent.runtime.generate import generate
from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.chain import (
    ChainConfig,
    ChainTrainer,
    EncodedSplit,
    evaluate_streaming,
)
from chainfed.agent.training.objectives import build_objective

FACTORIES = {
    torch.arange,
    torch.empty,
    torch.eye,
    torch.full,
    torch.linspace,
    torch.ones,
    torch.rand,
    torch.randint,
    torch.randn,
    torch.randperm,
    torch.tensor,
    torch.zeros,
}
ROOTS = tuple(
    str(Path(package.__file__).parent)
    for package in (chainfed.agent, chainfed.kernels, chainfed.proto)
)
T, LABEL_WORDS = 8, [5, 6]

pytestmark = pytest.mark.usefixtures("one_thread")


class DeviceProbe(TorchFunctionMode):
    """Records ``file:line function`` of every tensor factory called from ChainFed code
    without a ``device`` argument."""

    def __init__(self) -> None:
        super().__init__()
        self.offences: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(ROOTS):
                line = sys._getframe(1).f_lineno
                self.offences.append(f"{caller.co_filename}:{line} {func.__name__}")
        return func(*args, **kwargs)


def make_split(n: int, seed: int, lm: bool) -> EncodedSplit:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (n,), generator=generator)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (n, T)
    ids = torch.randint(1, 100, (n, T), generator=generator) * mask
    labels = torch.randint(0, 2, (n,), generator=generator)
    if not lm:
        return EncodedSplit(ids, mask, labels)
    loss_mask = torch.zeros_like(mask)
    loss_mask[torch.arange(n), lengths - 1] = 1
    ids[torch.arange(n), lengths - 1] = torch.tensor(LABEL_WORDS)[labels]
    return EncodedSplit(ids, mask, labels, loss_mask)


@pytest.mark.parametrize(
    "family, task, gpo", [("bert", "classify", "proxy"), ("llama", "lm", "exact:all")]
)
def test_a_whole_tiny_chain_creates_no_tensor_without_a_device(
    tiny_models, tmp_path, family, task, gpo
):
    model = StreamingModel(tiny_models.checkpoint(family))
    lm = task == "lm"
    train, val = make_split(16, 0, lm), make_split(8, 1, lm)
    config = ChainConfig(
        window=2,
        gpo=gpo,
        foat_threshold=2.0,  # FOAT runs and starts at layer 0
        foat_samples=8,
        micro_batch=4,
        steps_per_round=2,
        max_rounds=1,
        lora=LoRAConfig(rank=2, alpha=4.0),
    )
    probe = DeviceProbe()
    with probe:
        objective = build_objective(
            model, task, num_labels=2, label_token_ids=LABEL_WORDS if lm else None
        )
        trainer = ChainTrainer(model, objective, train, val, config, tmp_path, progress=False)
        trainer.train()
        evaluate_streaming(model, objective, trainer.final_adapters, config.lora, val)
        if lm:
            generate(model, [1, 2, 3], max_new_tokens=3, temperature=0.7, seed=1)

    assert trainer.foat_scores is not None and len(trainer.stages) == model.num_layers
    assert not probe.offences, "tensors created without a device:\n" + "\n".join(
        sorted(set(probe.offences))
    )
