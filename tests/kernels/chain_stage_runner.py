"""Runs one chain stage of a tiny model and records what it produced and which kernels ran.

Run as a script by ``test_chain_stage_kernels.py``, in a process of its own because
``TRITON_INTERPRET`` must be set before ``chainfed.kernels`` is imported::

    TRITON_INTERPRET=1 CHAINFED_KERNELS=triton|torch python chain_stage_runner.py \\
        MODEL_DIR WORKDIR OUT DTYPE[:int8]...

The stage: layer 1 of a chain started at layer 0 (window 0-1, GPO proxy), three steps of
micro-batches of four, then validation, once per DTYPE; ``DTYPE:int8`` runs it with int8
frozen block weights (``StreamingModel(weights="int8")``). OUT receives ``torch.save`` of
``{dtype: result}``, a result holding the stage's train and validation loss, the upload
(``trainable_state``), the number of launches of the two Triton host wrappers
(``_fused_lora_matmul``, ``_thin_matmul``) and of LoRA forwards by path
(``forward_triton``, ``forward_torch``).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.chain import ChainConfig, ChainTrainer, EncodedSplit
from chainfed.agent.training.objectives import build_objective
from chainfed.kernels import fused_lora

WRAPPERS = ("_fused_lora_matmul", "_thin_matmul")


@contextmanager
def counted_launches() -> Iterator[Counter]:
    """Count calls of the Triton host wrappers, and LoRA forwards by path, while inside."""
    launches: Counter = Counter()
    originals = {name: getattr(fused_lora, name) for name in (*WRAPPERS, "_forward_2d")}

    def counting(name: str):
        def call(*args, **kwargs):
            launches[name] += 1
            return originals[name](*args, **kwargs)

        return call

    def counting_forward(*args):
        launches["forward_triton" if args[-1] else "forward_torch"] += 1
        return originals["_forward_2d"](*args)

    for name in WRAPPERS:
        setattr(fused_lora, name, counting(name))
    fused_lora._forward_2d = counting_forward
    try:
        yield launches
    finally:
        for name, original in originals.items():
            setattr(fused_lora, name, original)


def split(n: int, seed: int) -> EncodedSplit:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, 8), generator=generator)
    return EncodedSplit(ids, torch.ones_like(ids), torch.randint(0, 3, (n,), generator=generator))


def run(model_dir: str, workdir: Path, variant: str) -> dict:
    dtype, _, weights = variant.partition(":")
    torch.manual_seed(0)
    model = StreamingModel(model_dir, dtype=getattr(torch, dtype), weights=weights or "float")
    objective = build_objective(model, "classify", num_labels=3)
    config = ChainConfig(
        window=2,
        gpo="proxy",
        micro_batch=4,
        steps_per_round=3,
        max_rounds=1,
        lr=1e-2,
        lora=LoRAConfig(rank=4, alpha=8.0),
    )
    trainer = ChainTrainer(
        model, objective, split(16, 0), split(8, 1), config, workdir, progress=False
    )
    trainer.set_start_layer(0)
    with counted_launches() as launches:
        report = trainer.run_stage(1, rounds_cap=1)
    return {
        "train_loss": report.train_loss,
        "val_loss": report.val_loss,
        "state": trainer.trainable_state(),
        "launches": dict(launches),
    }


def main(model_dir: str, workdir: str, out: str, *dtypes: str) -> None:
    results = {dtype: run(model_dir, Path(workdir) / dtype, dtype) for dtype in dtypes}
    torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
