"""Giving back a frozen block's checkpoint pages between uses (``release_pages``).

Prepare: a random llama checkpoint with blocks of several MiB, opened float32 on the CPU
(tensors mapped from the file) and bfloat16 (tensors copied).
Execute: run a block, release its pages, run it again.
Assert: the process's RSS falls by about the block's bytes, the block computes the same
output bit for bit afterwards, and copied tensors are never listed for release.
"""

from __future__ import annotations

import psutil
import pytest
import torch

from chainfed.agent.runtime.mapped_pages import file_mapped_ranges
from chainfed.agent.runtime.model import StreamingModel

pytestmark = pytest.mark.usefixtures("one_thread")

MIB = 1 << 20


@pytest.fixture(scope="module")
def model_dir(tiny_models):
    return tiny_models.checkpoint(
        "llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=2
    )


def rss() -> int:
    return psutil.Process().memory_info().rss


def run(model: StreamingModel, block: torch.nn.Module) -> torch.Tensor:
    h = torch.randn(2, 8, 512, generator=torch.Generator().manual_seed(0)).to(model.dtype)
    return block(h, model.attention_context(torch.ones(2, 8, dtype=torch.long)))


def test_release_gives_back_the_block_pages_and_keeps_its_values(model_dir):
    model = StreamingModel(model_dir)
    block = model.load_block(1)
    frozen = [*block.parameters(), *block.buffers()]
    block_bytes = sum(t.numel() * t.element_size() for t in frozen)
    before_values = [t.clone() for t in frozen]
    first = run(model, block)

    resident = rss()
    model.release_pages(block)
    released = resident - rss()
    again = run(model, block)

    assert block_bytes > 10 * MIB
    assert sum(length for _, length in file_mapped_ranges(frozen)) > 0.95 * block_bytes
    assert released > 0.8 * block_bytes
    assert torch.equal(again, first)
    for tensor, before in zip(frozen, before_values, strict=True):
        assert torch.equal(tensor, before)


def test_copied_tensors_are_never_listed(model_dir):
    bf16 = StreamingModel(model_dir, dtype=torch.bfloat16).load_block(1)
    float_block = StreamingModel(model_dir).load_block(1)

    assert file_mapped_ranges([*bf16.parameters(), *bf16.buffers()]) == []
    assert file_mapped_ranges([torch.randn(1 << 20), float_block.q_proj.weight.clone()]) == []
    assert file_mapped_ranges([float_block.q_proj.weight]) != []
