"""``chainfed export``: PEFT and merged exports reproduce our runtime's logits in transformers.

Adapters are random with a non-zero B (a fresh B = 0 adapter is a no-op and would prove
nothing), on some layers only, on every linear layer (gate_proj included for SmolLM2).
The transformers side runs the code of each export's own README.md, so the documented
snippet is what is held to 1e-4. The merged SmolLM2 export runs in a subprocess that
measures its peak RSS against the size of the fp32 checkpoint.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from chainfed.agent.app.check_command import (
    AdaptedModel,
    classify_logits,
    last_hidden_state,
    lm_logits,
)
from chainfed.agent.cli import main
from chainfed.agent.convert.export import (
    HEAD_INFO_FILE,
    HEAD_WEIGHTS_FILE,
    INDEX_FILE,
    MARKER_FILE,
    READ_CHUNK_BYTES,
    ExportError,
    export_merged,
    export_peft,
)
from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.runtime.model import StreamingModel
from chainfed.proto.adapter_file import AdapterFile, AdapterFileError, save_adapter_file
from chainfed.proto.units import format_bytes

LABELS = ["negative", "neutral", "positive"]
README_TEXTS = ["I love this airline", "my flight got cancelled again"]  # as in the README
LM_PROMPTS = ["The capital of France is", "Hello", "Write a haiku about rain, please:"]


def make_result(
    model_dir: Path,
    path: Path,
    *,
    task: str,
    layers: list[int],
    rank: int,
    alpha: float,
    b_std: float,
    seed: int,
    max_len: int | None = None,
    head_std: float = 1.0,
) -> Path:
    """An adapter file as ``chainfed train`` writes it, with random non-zero A and B on every
    linear layer of ``layers`` (and a random head for classify)."""
    model = StreamingModel(model_dir)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in layers:
        for name, (_, shape) in model.block_tensor_spec(layer).items():
            if name.endswith(".weight") and len(shape) == 2:
                module, (out_f, in_f) = name.removesuffix(".weight"), shape
                a = (torch.rand(rank, in_f, generator=g) * 2 - 1) / in_f**0.5
                tensors[f"layers.{layer}.{module}.lora_a"] = a
                tensors[f"layers.{layer}.{module}.lora_b"] = torch.randn(out_f, rank, generator=g)
                tensors[f"layers.{layer}.{module}.lora_b"] *= b_std
    if task == "classify":
        tensors["head.weight"] = torch.randn(len(LABELS), model.config.hidden_size, generator=g)
        tensors["head.weight"] *= head_std
        tensors["head.bias"] = torch.randn(len(LABELS), generator=g)
    info = {
        "task": task,
        "labels": LABELS if task == "classify" else [],
        "label_token_ids": None,
        "lora": LoRAConfig(rank=rank, alpha=alpha, targets="all").to_dict(),
        "mode": "chain",
        "model_digest": model.fingerprint,
        "pooling": ("mean" if model.config.family == "bert" else "last")
        if task == "classify"
        else None,
        "max_len": max_len,
    }
    return save_adapter_file(path, AdapterFile(tensors, info))


def run_readme(folder: Path) -> dict:
    """Execute the python block of an export's README.md; its variables."""
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(folder / "README.md"), "exec"), namespace)  # noqa: S102
    return namespace


def right_padded(model: StreamingModel, texts: list[str], pad_id: int):
    rows = [model.tokenizer().encode(t).ids for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- MiniLM (classify)


@pytest.fixture(scope="module")
def minilm_result(minilm_path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("minilm") / "adapters.safetensors"
    return make_result(
        minilm_path, path, task="classify", layers=[1, 3, 4, 5], rank=4, alpha=8.0,
        b_std=0.05, seed=1, max_len=32,
    )  # fmt: skip


def mean_pooled_logits(model: StreamingModel, head: dict, texts: list[str]) -> torch.Tensor:
    """Our runtime, text by text (no padding): last block -> mean pooling -> head."""
    rows = []
    for text in texts:
        ids = torch.tensor([model.tokenizer().encode(text).ids])
        h = last_hidden_state(model, ids, torch.ones_like(ids))  # (1, T, d)
        rows.append(h.mean(1) @ head["weight"].T + head["bias"])
    return torch.cat(rows)


@pytest.fixture(scope="module")
def minilm_ours(minilm_path, minilm_result):
    """Our logits for the README's texts: via ``classify_logits`` with the adapters, and
    the same head over the model without them."""
    model = AdaptedModel(minilm_path, minilm_result)
    rows = []
    for text in README_TEXTS:
        ids = torch.tensor([model.tokenizer().encode(text).ids])
        rows.append(classify_logits(model, ids, torch.ones_like(ids)))
    no_adapter = mean_pooled_logits(StreamingModel(minilm_path), model.result.head, README_TEXTS)
    return torch.cat(rows), no_adapter, model.result.head


def test_peft_export_of_minilm_reproduces_our_logits(
    minilm_path, minilm_result, minilm_ours, tmp_path
):
    out = export_peft(minilm_path, minilm_result, tmp_path / "peft")

    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert config["task_type"] is None
    assert len(config["target_modules"]) == 4 * 6
    assert "encoder.layer.4.output.dense" in config["target_modules"]
    assert "encoder.layer.4.attention.output.dense" in config["target_modules"]
    assert not any(".layer.0." in t or ".layer.2." in t for t in config["target_modules"])
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.encoder.layer.3.intermediate.dense.lora_B.weight" in keys
    assert len(keys) == 4 * 6 * 2
    assert json.loads((out / HEAD_INFO_FILE).read_text())["labels"] == LABELS

    ns = run_readme(out)
    lora_layers = [n for n, _ in ns["model"].named_modules() if n.endswith("lora_A.default")]
    assert len(lora_layers) == 24, "PEFT did not inject every exported adapter"
    ours, no_adapter, _ = minilm_ours
    assert max_diff(ns["logits"], ours) < 1e-4
    assert max_diff(ns["logits"], no_adapter) > 1e-1, "the adapters must matter"


def test_merged_export_of_minilm_reproduces_our_logits(
    minilm_path, minilm_result, minilm_ours, tmp_path
):
    out = export_merged(minilm_path, minilm_result, tmp_path / "merged", shard_bytes=30_000_000)

    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert {"config.json", "tokenizer.json", "vocab.txt", HEAD_WEIGHTS_FILE} <= {
        p.name for p in out.iterdir()
    }
    blocks = {}
    for name, shard in index["weight_map"].items():
        match = re.match(r"encoder\.layer\.(\d+)\.", name)
        if match:
            blocks.setdefault(match.group(1), set()).add(shard)
    assert all(len(s) == 1 for s in blocks.values()), "a block is split across shards"

    ns = run_readme(out)
    assert max_diff(ns["logits"], minilm_ours[0]) < 1e-4


def test_merged_export_casts_to_bfloat16(minilm_path, minilm_result, minilm_ours, tmp_path):
    out = export_merged(minilm_path, minilm_result, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("encoder.layer.4.attention.self.query.weight").dtype == torch.bfloat16
        assert f.get_tensor("embeddings.position_ids").dtype == torch.int64  # not a float
    ours, no_adapter, head = minilm_ours
    merged = mean_pooled_logits(StreamingModel(out), head, README_TEXTS)  # bf16 weights, fp32 math
    assert max_diff(merged, ours) < 0.2 * max_diff(ours, no_adapter)


def test_export_command_and_its_errors(minilm_path, minilm_result, tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(["export", "--model", str(minilm_path), "--adapters", str(minilm_result), str(out)])
        == 0
    )
    assert (out / MARKER_FILE).is_file() and "wrote" in capsys.readouterr().out
    # an earlier export is replaced; any other non-empty folder is refused
    assert main(["export", "--model", str(minilm_path), "--adapters", str(minilm_result),
                 "--format", "merged", "--quiet", str(out)]) == 0  # fmt: skip
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an earlier export"):
        export_peft(minilm_path, minilm_result, other)
    assert (
        main(["export", "--model", str(minilm_path), "--adapters", str(minilm_result), str(other)])
        == 2
    )
    assert "not an earlier export" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*partial")), "a failed export left its staging folder"


def test_export_refuses_adapters_of_another_model(
    minilm_path, minilm_result, smollm2_dir, tmp_path
):
    with pytest.raises(AdapterFileError, match="different model"):
        export_peft(smollm2_dir, minilm_result, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_refuses_a_head_only_result_for_peft(minilm_path, tmp_path):
    path = make_result(minilm_path, tmp_path / "head.safetensors", task="classify", layers=[],
                       rank=4, alpha=8.0, b_std=0.0, seed=0)  # fmt: skip
    with pytest.raises(ExportError, match="no adapters"):
        export_peft(minilm_path, path, tmp_path / "p")
    out = export_merged(minilm_path, path, tmp_path / "m")
    assert (out / HEAD_WEIGHTS_FILE).is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("layers.4.up_proj.lora_a"), "has no matching layers.4.up_proj.lora_a"),
        (lambda t: [t.pop(f"layers.4.up_proj.lora_{x}") for x in "ab"], "targets 'all' mean"),
        (lambda t: t.update({"layers.4.q_proj.lora_a": torch.zeros(5, 384)}), "expected [4, 384]"),
        (lambda t: t.update({"layers.9.q_proj.lora_a": torch.zeros(4, 384)}), "layers 0..5"),
        (lambda t: t.update({"layers.4.attn_norm.lora_a": torch.zeros(4, 384)}), "not a linear"),
    ],
)
def test_a_malformed_adapter_file_is_refused_with_the_reason(
    minilm_path, minilm_result, tmp_path, change, message
):
    from chainfed.proto.adapter_file import load_adapter_file

    saved = load_adapter_file(minilm_result)
    change(saved.tensors)
    bad = save_adapter_file(tmp_path / "bad.safetensors", saved)
    with pytest.raises(AdapterFileError, match=re.escape(message)):
        export_peft(minilm_path, bad, tmp_path / "out")


# --------------------------------------------------------------------------- SmolLM2 (lm)


@pytest.fixture(scope="module")
def smollm2_result(smollm2_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("smollm2") / "adapters.safetensors"
    return make_result(
        smollm2_dir, path, task="lm", layers=[0, 13, 29], rank=4, alpha=16.0, b_std=0.01, seed=2
    )


@pytest.fixture(scope="module")
def smollm2_ours(smollm2_dir, smollm2_result):
    """Our logits (B, T, V) for LM_PROMPTS, right padded, with the adapters."""
    model = AdaptedModel(smollm2_dir, smollm2_result)
    ids, mask = right_padded(model, LM_PROMPTS, pad_id=2)
    return ids, mask, lm_logits(model, ids, mask)


def test_peft_export_of_smollm2_reproduces_our_logits(
    smollm2_dir, smollm2_result, smollm2_ours, tmp_path
):
    out = export_peft(smollm2_dir, smollm2_result, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and (config["r"], config["lora_alpha"]) == (4, 16)
    assert "model.layers.13.mlp.gate_proj" in config["target_modules"]
    assert len(config["target_modules"]) == 3 * 7

    ns = run_readme(out)
    ids, mask, ours = smollm2_ours
    model = ns["model"]
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            base = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert max_diff(theirs[real], ours[real]) < 1e-4
    assert max_diff(base[real], ours[real]) > 1e-1, "the adapters must matter"


MERGE_SCRIPT = """
import json, sys
from chainfed.agent.convert.export import export_merged
from chainfed.agent.training.memory_meter import PeakMemoryMeter, process_baseline

process_baseline()
with PeakMemoryMeter() as meter:
    export_merged(sys.argv[1], sys.argv[2], sys.argv[3], shard_bytes=int(sys.argv[4]))
r = meter.reading
print(json.dumps({"peak": r.peak_bytes, "baseline": r.baseline_bytes, "method": r.method}))
"""


def test_merged_export_of_smollm2_streams_and_reproduces_our_logits(
    smollm2_dir, smollm2_result, smollm2_ours, tmp_path
):
    out = tmp_path / "merged"
    done = subprocess.run(
        [sys.executable, "-c", MERGE_SCRIPT, str(smollm2_dir), str(smollm2_result), str(out),
         str(150 * 2**20)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    memory = json.loads(done.stdout.strip().splitlines()[-1])
    fp32_bytes = (smollm2_dir / "model.safetensors").stat().st_size
    print(
        f"merged SmolLM2 export: peak RSS {format_bytes(memory['peak'])} "
        f"({format_bytes(memory['peak'] - memory['baseline'])} above the idle process, "
        f"{memory['method']}); fp32 model {format_bytes(fp32_bytes)}"
    )
    assert memory["peak"] < fp32_bytes
    # row slices, not whole tensors: the 108 MiB embedding alone would break this bound
    assert memory["peak"] - memory["baseline"] < 4 * READ_CHUNK_BYTES

    index = json.loads((out / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert "lm_head.weight" not in index["weight_map"]  # tied embeddings stay tied
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (out / name).is_file()

    ns = run_readme(out)
    ids, mask, ours = smollm2_ours
    with torch.no_grad():
        theirs = ns["model"](input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert max_diff(theirs[real], ours[real]) < 1e-4


def test_peft_export_of_a_smollm2_classifier_reproduces_our_logits(smollm2_dir, tmp_path):
    """Last-token pooling on the state before the final norm: the README's hook."""
    result = make_result(
        smollm2_dir, tmp_path / "cls.safetensors", task="classify", layers=[5, 29], rank=4,
        alpha=8.0, b_std=0.02, seed=3, max_len=32, head_std=0.01,
    )  # fmt: skip
    model = AdaptedModel(smollm2_dir, result)
    ours = []
    for text in README_TEXTS:
        ids = torch.tensor([model.tokenizer().encode(text).ids])
        ours.append(classify_logits(model, ids, torch.ones_like(ids)))
    ours = torch.cat(ours)

    out = export_peft(smollm2_dir, result, tmp_path / "peft")
    assert json.loads((out / HEAD_INFO_FILE).read_text())["pooling"] == "last"
    ns = run_readme(out)
    assert max_diff(ns["logits"], ours) < 1e-4 * max(1.0, ours.abs().max().item())
