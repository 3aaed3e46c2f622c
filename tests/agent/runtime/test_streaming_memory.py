"""Streaming is real: walking every block of a ≥400 MB checkpoint keeps RSS near one block.

The measurement runs in a fresh subprocess. It first streams a tiny checkpoint of the same
family so that torch's kernels (hundreds of MiB of shared-library code paged in on first
use) are resident, then resets the high-water mark (VmHWM) through ``/proc/self/clear_refs``:
the figure is what streaming the large checkpoint added, weights and activations.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from chainfed.agent.convert.synthetic_checkpoint import checkpoint_layout, write_random_checkpoint
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.runtime.model_config import ModelConfig

MIB = 1 << 20

LLAMA_8L = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "vocab_size": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}

MEASURE = r"""
import json, sys, torch
from chainfed.agent.runtime.model import hidden_states

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

ids = torch.randint(0, 4096, (2, 16))
mask = torch.ones_like(ids)
hidden_states(sys.argv[2], ids % 50, mask)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start = hwm()
states = hidden_states(sys.argv[1], ids, mask)
print(json.dumps({"start": start, "peak": hwm(), "layers": len(states) - 1}))
"""


def _group_bytes(group) -> int:
    return sum(math.prod(shape) for _, shape in group.values()) * 4


@pytest.mark.parametrize("max_shard_bytes", [None, 150 * MIB], ids=["single-file", "sharded"])
def test_rss_growth_stays_below_embeddings_plus_two_layers(tmp_path, max_shard_bytes):
    model_dir = write_random_checkpoint(
        LLAMA_8L, tmp_path / "model", max_shard_bytes=max_shard_bytes
    )
    warmup = dict(LLAMA_8L, hidden_size=64, intermediate_size=128, vocab_size=50)
    warmup_dir = write_random_checkpoint(warmup, tmp_path / "warmup")
    groups = checkpoint_layout(ModelConfig.from_hf(LLAMA_8L))
    total = sum(_group_bytes(g) for g in groups)
    assert total >= 400 * 1000 * 1000, f"checkpoint only {total / MIB:.0f} MiB"
    if max_shard_bytes:
        assert len(list(model_dir.glob("model-*.safetensors"))) > 1

    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(model_dir), str(warmup_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    growth = result["peak"] - result["start"]
    allowed = _group_bytes(groups[0]) + 2 * _group_bytes(groups[1]) + 100 * MIB
    print(
        f"checkpoint {total / MIB:.0f} MiB, RSS growth {growth / MIB:.1f} MiB, "
        f"allowed {allowed / MIB:.0f} MiB"
    )
    assert result["layers"] == 8
    assert growth < allowed, f"RSS grew {growth / MIB:.1f} MiB > {allowed / MIB:.0f} MiB"


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_embeddings_are_built_without_a_random_init(family, tiny_models, monkeypatch):
    """The first ``normal_`` on the meta device loads torch's Python decompositions (about
    70 MiB resident for the rest of the process); the checkpoint fills the embeddings, so
    building them must not draw an init."""
    model = StreamingModel(tiny_models.checkpoint(family))

    def refuse(*args, **kwargs):
        raise AssertionError("embedding weights were randomly initialised")

    monkeypatch.setattr(torch.nn.init, "normal_", refuse)
    embeddings = model.load_embeddings()

    ids = torch.randint(1, 100, (2, 8))
    assert embeddings(ids, torch.ones_like(ids)).shape == (2, 8, model.config.hidden_size)
