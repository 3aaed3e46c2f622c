"""A chain stage in bfloat16 and float16 (the precision policy, DESIGN.md §2).

Prepare: tiny random checkpoints read in the compute dtype, random token splits.
Execute: one stage (window of two layers) per task and GPO mode: a round of local steps
at lr 1e-3, a validation, the round's upload (``trainable_state``).
Assert: finite losses, frozen weights in the compute dtype, every trainable tensor a
float32 master that moved (a bf16 A of magnitude ~0.1 does not move by lr 1e-3: its
spacing there is 2**-10), uploads float32 on the CPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.chain import ChainConfig, ChainTrainer, EncodedSplit
from chainfed.agent.training.objectives import build_objective

VOCAB, T = 100, 8
LABEL_WORDS = [5, 6]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dirs(tiny_models) -> dict[str, Path]:
    return {"bert": tiny_models.checkpoint("bert"), "llama": tiny_models.checkpoint("llama")}


def make_split(n: int, seed: int, lm: bool) -> EncodedSplit:
    """Right-padded random ids; for ``lm`` the last real token is a label word."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (n,), generator=generator)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (n, T)
    ids = torch.randint(1, VOCAB, (n, T), generator=generator) * mask
    labels = torch.randint(0, 2, (n,), generator=generator)
    if not lm:
        return EncodedSplit(ids, mask, labels)
    loss_mask = torch.zeros_like(mask)
    loss_mask[torch.arange(n), lengths - 1] = 1
    ids[torch.arange(n), lengths - 1] = torch.tensor(LABEL_WORDS)[labels]
    return EncodedSplit(ids, mask, labels, loss_mask)


def one_stage(model_dir: Path, workdir: Path, task: str, gpo: str, dtype: torch.dtype):
    """(trainer, upload before, upload after, train loss, validation) of stage 1."""
    model = StreamingModel(model_dir, dtype=dtype)
    objective = build_objective(
        model, task, num_labels=2, label_token_ids=LABEL_WORDS if task == "lm" else None
    )
    config = ChainConfig(
        window=2,
        gpo=gpo,
        micro_batch=4,
        steps_per_round=4,
        lr=1e-3,
        lora=LoRAConfig(rank=4, alpha=8.0),
    )
    lm = task == "lm"
    train, val = make_split(16, 0, lm), make_split(8, 1, lm)
    trainer = ChainTrainer(model, objective, train, val, config, workdir, progress=False)
    trainer.set_start_layer(0)
    trainer.enter_stage(1)
    before = trainer.trainable_state()
    result = trainer.train_round()
    return trainer, before, trainer.trainable_state(), result.train_loss, trainer.evaluate_window()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("gpo", ["proxy", "exact:all"])
@pytest.mark.parametrize("family, task", [("bert", "classify"), ("llama", "lm")])
def test_a_half_precision_stage_trains_float32_masters(
    model_dirs, tmp_path, family, task, gpo, dtype
):
    trainer, before, after, train_loss, evaluation = one_stage(
        model_dirs[family], tmp_path, task, gpo, dtype
    )

    assert math.isfinite(train_loss)
    assert math.isfinite(evaluation.loss) and 0.0 <= evaluation.metric <= 1.0
    block = trainer.window_blocks[1]
    assert block.q_proj.base.weight.dtype == dtype
    trainable = [p for b in trainer.window_blocks.values() for p in b.parameters()]
    trainable += [*trainer.objective.parameters(), *trainer.foresight.parameters()]
    trainable = [p for p in trainable if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in after.values())
    assert before.keys() == after.keys()
    moving = [k for k in after if ".lora_" in k or k.startswith("objective.")]
    if gpo == "proxy":
        moving += [k for k in after if k.endswith(".up")]
    assert any(".lora_a" in k for k in moving) and any(".lora_b" in k for k in moving)
    unchanged = [k for k in moving if torch.equal(before[k], after[k])]
    assert not unchanged, f"did not move in 4 steps at lr 1e-3: {unchanged}"
