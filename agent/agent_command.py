"""``chainfed agent``: join a coordinator and train this device's part of the chain.

The device's data stays here. ``--shard K/N`` (with ``--partition``) takes one part of
a shared file, which is how a single machine simulates several devices; on a real
device ``--data`` is simply its own file.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

from chainfed.agent.assets import resolve_model
from chainfed.agent.data import (
    TOPICS,
    SplitData,
    load_dataset,
    partition_by_topic,
    partition_dirichlet,
    partition_iid,
)
from chainfed.agent.errors import ChainFedError
from chainfed.agent.federated_agent import AgentConfig, FederatedAgent, LocalData
from chainfed.agent.memory_meter import process_baseline, release_large_frees_to_os
from chainfed.agent.model import StreamingModel
from chainfed.agent.train_command import (
    add_data_arguments,
    data_config_from_args,
    encode_split,
    label_token_ids,
)
from chainfed.proto.auth_token import TOKEN_ENV, resolve_token
from chainfed.proto.units import parse_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``chainfed agent``."""
    parser.add_argument("--coordinator", required=True, help="coordinator HOST:PORT")
    parser.add_argument("--token", help=f"auth token (prefer --token-file or ${TOKEN_ENV})")
    parser.add_argument("--token-file", type=Path, help="file holding the auth token")
    parser.add_argument("--agent-id", default="", help="requested id (default: assigned)")
    parser.add_argument("--workdir", type=Path, required=True, help="caches and final adapters")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) of the coordinator")
    parser.add_argument("--memory-budget", help="training memory to declare, e.g. 1.5GiB")
    parser.add_argument("--device", default="cpu", help="compute device to declare")
    parser.add_argument(
        "--shard", help="K/N: train on part K (0-based) of N of --data (simulated devices)"
    )
    parser.add_argument(
        "--partition",
        default="iid",
        help="how --shard splits: iid, dirichlet:ALPHA (label skew) or by-topic",
    )
    parser.add_argument("--give-up-after", type=float, default=600.0, help="seconds unreachable")
    parser.add_argument("--verbose", action="store_true", help="log every round")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split and shards")
    add_data_arguments(parser)


def shard_of(data: SplitData, shard: str, partition: str, seed: int) -> SplitData:
    """Part K of N of both splits, by ``partition`` (same rule for train and validation)."""
    try:
        k, n = (int(x) for x in shard.split("/"))
    except ValueError as exc:
        raise ChainFedError(f"--shard must look like K/N, got {shard!r}") from exc
    if not 0 <= k < n:
        raise ChainFedError(f"--shard {shard}: K must be in 0..N-1")

    def part(examples: list) -> list:
        if partition == "iid":
            parts = partition_iid(len(examples), n, seed)
        elif partition.startswith("dirichlet:"):
            alpha = float(partition.split(":", 1)[1])
            parts = partition_dirichlet([e.label for e in examples], n, alpha, seed)
        elif partition == "by-topic":
            # topics go to shards by name (TOPICS order), the same way for both splits, so a
            # shard validates on the topics it trains on
            if n > len(TOPICS):
                raise ChainFedError(
                    f"--partition by-topic has {len(TOPICS)} topics ({', '.join(TOPICS)}); "
                    f"it cannot make {n} non-empty shards"
                )
            groups = partition_by_topic([getattr(e, "text", "") for e in examples])
            parts = [sum((groups.get(topic, []) for topic in TOPICS[i::n]), []) for i in range(n)]
        else:
            raise ChainFedError(
                f"--partition must be iid, dirichlet:ALPHA or by-topic; got {partition!r}"
            )
        if not parts[k]:
            raise ChainFedError(f"--shard {shard} ({partition}) holds no rows of this split")
        return [examples[i] for i in sorted(parts[k])]

    data.train, data.val = part(data.train), part(data.val)
    return data


def run(args: argparse.Namespace) -> int:
    """Join, train until the chain is done, write the final adapters."""
    release_large_frees_to_os()
    process_baseline()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
    )
    token = resolve_token(args.token, args.token_file)
    if token is None:
        raise ChainFedError(f"a token is required: --token-file, --token or ${TOKEN_ENV}")
    model_dir = resolve_model(args.model, progress=False)
    model = StreamingModel(model_dir)
    data_config = data_config_from_args(args)
    data = load_dataset(data_config)
    if args.shard:
        data = shard_of(data, args.shard, args.partition, args.seed)
    local = LocalData(
        train=encode_split(model, data.train, args.task, args.max_len),
        val=encode_split(model, data.val, args.task, args.max_len),
        task=args.task,
        labels=data.labels,
        label_token_ids=(
            label_token_ids(model, data.train, data.labels, data_config)
            if args.task == "lm"
            else None
        ),
    )
    config = AgentConfig(
        address=args.coordinator,
        token=token,
        workdir=args.workdir,
        agent_id=args.agent_id,
        tls_ca=args.tls_ca.read_bytes() if args.tls_ca else None,
        memory_budget_bytes=parse_bytes(args.memory_budget) if args.memory_budget else 0,
        device=args.device,
        give_up_after_s=args.give_up_after,
    )
    fingerprint = model.fingerprint
    agent = FederatedAgent(config, model, local, fingerprint, progress=not args.quiet)
    path = agent.run()
    report = {"agent_id": agent.agent_id, "rounds": [asdict(t) for t in agent.traffic]}
    (args.workdir / "agent_report.json").write_text(json.dumps(report, indent=2))
    print(f"chain done after {agent.rounds_done} rounds here; final adapters: {path}")
    return 0
