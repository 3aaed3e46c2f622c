"""Fused LoRA linear vs torch eager vs PEFT: forward+backward time and peak memory (CUDA).

Shapes are LLaMA-2-7B projections (d = 4096, FFN 11008: q/k/v/o 4096->4096, gate/up
4096->11008, down 11008->4096), bf16, no bias, tokens 512-8192, ranks 8-64. Per config
and method, one step is ``y = f(x); y.backward(g)`` with x requiring grad (a layer inside
the trained window); gradients are dropped at the end of each step. Methods:

* ``fused``   ``chainfed.kernels.lora_linear`` on the Triton path
* ``torch``   the same autograd function on its torch path (same saving policy)
* ``eager``   ``F.linear`` + two matmuls under plain autograd (``lora_linear_reference``)
* ``peft``    ``peft.tuners.lora.Linear`` around a frozen ``nn.Linear``

Reported: median step time over ``--reps`` (CUDA events, after ``--warmup``), the ratio of
each baseline to ``fused`` (> 1: fused is faster), peak memory above the inputs
(``max_memory_allocated``), and fused vs eager max abs difference of ``y``. One run, one
GPU: compare ratios, not absolute times across runs. Output: a markdown table on stdout,
``--json OUT`` and ``--plot PNG``. Without CUDA it prints one line and exits 0.

    python benchmarks/kernels.py --json runs/kernels.json --plot runs/kernels.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

METHODS = ("fused", "torch", "eager", "peft")
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time fused LoRA linear (Triton) against torch eager and PEFT on CUDA."
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument(
        "--shapes", nargs="+", default=[f"{i}x{o}" for i, o in SHAPES],
        help="IN x OUT projection shapes, e.g. 4096x11008",
    )  # fmt: skip
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/r)")
    parser.add_argument(
        "--frozen-a", action="store_true", help="FFA mode: A frozen (train_a=False everywhere)"
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", metavar="OUT", help="write results as JSON")
    parser.add_argument("--plot", metavar="PNG", help="write a bar chart of time ratios")
    return parser.parse_args(argv)


@contextlib.contextmanager
def kernels_path(name: str) -> Iterator[None]:
    """Force ``CHAINFED_KERNELS`` for the duration (read by ``lora_linear`` on every call)."""
    before = os.environ.get("CHAINFED_KERNELS")
    os.environ["CHAINFED_KERNELS"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["CHAINFED_KERNELS"]
        else:
            os.environ["CHAINFED_KERNELS"] = before


def median_ms(step: Callable[[], None], warmup: int, reps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mib(step: Callable[[], None]) -> float:
    """Peak allocation during one step, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def bench_config(d_in: int, d_out: int, tokens: int, rank: int, args: argparse.Namespace) -> dict:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    from chainfed.kernels import lora_linear, lora_linear_reference

    dev, dtype, train_a = "cuda", torch.bfloat16, not args.frozen_a
    scale = args.alpha / rank
    x = torch.randn(tokens, d_in, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, d_out, device=dev, dtype=dtype)
    base = torch.nn.Linear(d_in, d_out, bias=False, device=dev, dtype=dtype).requires_grad_(False)
    lora_a = (torch.randn(rank, d_in, device=dev, dtype=dtype) * d_in**-0.5).requires_grad_(train_a)
    lora_b = (torch.randn(d_out, rank, device=dev, dtype=dtype) * rank**-0.5).requires_grad_()

    config = LoraConfig(r=rank, lora_alpha=args.alpha)
    peft_layer = PeftLinear(base, "default", config=config, r=rank, lora_alpha=args.alpha)
    peft_layer.to(device=dev, dtype=dtype)
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(lora_a)
        peft_layer.lora_B["default"].weight.copy_(lora_b)
    peft_layer.lora_A["default"].weight.requires_grad_(train_a)
    leaves = [x, lora_a, lora_b, *peft_layer.parameters()]

    def ours(x: torch.Tensor) -> torch.Tensor:
        return lora_linear(x, base.weight, None, lora_a, lora_b, scale, train_a=train_a)

    forwards = {
        "fused": ours,
        "torch": ours,
        "eager": lambda x: lora_linear_reference(x, base.weight, None, lora_a, lora_b, scale),
        "peft": peft_layer,
    }

    row: dict = {"d_in": d_in, "d_out": d_out, "tokens": tokens, "rank": rank}
    for method in METHODS:
        forward = forwards[method]

        def step(forward: Callable = forward) -> None:
            forward(x).backward(g)
            for leaf in leaves:  # freed inside the step: peak_mib counts the gradients
                leaf.grad = None

        with kernels_path("torch" if method == "torch" else "triton"):
            row[f"{method}_ms"] = median_ms(step, args.warmup, args.reps)
            row[f"{method}_peak_mib"] = peak_mib(step)
    with torch.no_grad(), kernels_path("triton"):
        row["fused_max_abs_diff"] = (ours(x) - forwards["eager"](x)).abs().max().item()
    for method in METHODS[1:]:
        row[f"{method}_over_fused"] = row[f"{method}_ms"] / row["fused_ms"]
    return row


def markdown(rows: list[dict]) -> str:
    header = (
        "| in->out | tokens | r | fused ms | torch ms | eager ms | PEFT ms | eager/fused "
        "| PEFT/fused | fused MiB | torch MiB | eager MiB | PEFT MiB |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        cells = [
            f"{r['d_in']}->{r['d_out']}", r["tokens"], r["rank"],
            *(f"{r[f'{m}_ms']:.3f}" for m in METHODS),
            f"{r['eager_over_fused']:.2f}x", f"{r['peft_over_fused']:.2f}x",
            *(f"{r[f'{m}_peak_mib']:.0f}" for m in METHODS),
        ]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['d_in']}->{r['d_out']}\nT{r['tokens']} r{r['rank']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(rows)), 4))
    width = 0.27
    for i, method in enumerate(METHODS[1:]):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ax.bar(xs, [r[f"{method}_over_fused"] for r in rows], width, label=f"{method} / fused")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), labels, fontsize=6)
    ax.set_ylabel("step time ratio (>1: fused faster)")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (it times Triton kernels); skipping.")
        return 0
    from chainfed.kernels import triton_available

    if not triton_available():
        print("benchmarks/kernels.py needs triton (pip install -e '.[dev]').", file=sys.stderr)
        return 1
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    rows = []
    for d_in, d_out in shapes:
        for tokens in args.tokens:
            for rank in args.ranks:
                rows.append(bench_config(d_in, d_out, tokens, rank, args))
                torch.cuda.empty_cache()
    print(markdown(rows))
    if args.json:
        meta = {
            "device": torch.cuda.get_device_name(),
            "dtype": "bfloat16",
            "frozen_a": args.frozen_a,
            "alpha": args.alpha,
            "warmup": args.warmup,
            "reps": args.reps,
            "torch": torch.__version__,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
