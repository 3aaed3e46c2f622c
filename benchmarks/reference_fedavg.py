"""The Flower reference's FedAvg loop, in one process, on a draw that ``same_draw.py dump`` wrote.

Runs in the reference's own environment (torch, transformers 5, peft; not chainfed's), with
its ``task.py`` importable (``PYTHONPATH=<shared>/peers/flower-fedavg/flower_app/lorafl``):

    python benchmarks/reference_fedavg.py draw1.json --json ref1.json

What it keeps of the reference (``server_app.py``, ``client_app.py``): the initial LoRA and
head from ``torch.manual_seed(0)``; each round every client seeds ``1000 * round + client``,
builds a fresh model, loads the global arrays, trains one epoch with a fresh AdamW
(``task.train_epoch``: dropout on, its seeded order); FedAvg weighted by the clients' rows;
the global model scored on the test rows after every round (``task.predict``,
``task.scores``). What it leaves out: Flower's transport, which does not change the
arithmetic (the arrays travel as float32).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("draw", type=Path, help="rows written by same_draw.py dump")
    parser.add_argument("--rounds", type=int, default=10, help="federated rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, required=True, help="where to write the curve")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        task = importlib.import_module("task")
    except ImportError as exc:
        sys.exit(f"the reference's task.py is not importable ({exc}); set PYTHONPATH to its folder")
    import torch

    torch.set_num_threads(args.threads)
    draw = json.loads(args.draw.read_text())
    shards = [[tuple(row) for row in shard] for shard in draw["shards"]]
    test = [tuple(row) for row in draw["test"]]
    torch.manual_seed(0)
    server = task.Classifier("lora")
    arrays = server.trainable_state()
    curve = []
    for rnd in range(1, args.rounds + 1):
        started, states, losses = time.time(), [], []
        for client, rows in enumerate(shards):
            torch.manual_seed(1000 * rnd + client)
            model = task.Classifier("lora")
            model.load_trainable(arrays)
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=task.LR)
            losses.append(task.train_epoch(model, rows, optimizer, seed=1000 * rnd + client))
            states.append(model.trainable_state())
        weights = [len(rows) for rows in shards]
        arrays = {
            name: sum(w * state[name] for w, state in zip(weights, states, strict=True))
            / sum(weights)
            for name in arrays
        }
        server.load_trainable(arrays)
        scores = task.scores(task.predict(server, test), test)
        curve.append({"round": rnd, "train_losses": losses, **scores})
        print(
            f"round {rnd}: test accuracy {scores['accuracy']:.4f}, macro-F1 "
            f"{scores['macro_f1']:.4f} ({time.time() - started:.0f} s)",
            flush=True,
        )
    out = {"seed": draw.get("seed"), "label_skew": draw.get("label_skew"), "rounds": curve}
    args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
