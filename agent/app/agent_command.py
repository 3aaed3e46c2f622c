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

from chainfed.agent.app.options import (
    add_data_arguments,
    add_device_arguments,
    data_config_from_args,
    device_setup_from_args,
)
from chainfed.agent.convert.assets import resolve_model
from chainfed.agent.errors import ChainFedError
from chainfed.agent.federation.federated_agent import AgentConfig, FederatedAgent, LocalData
from chainfed.agent.runtime.model import StreamingModel
from chainfed.agent.training.data import load_dataset
from chainfed.agent.training.memory_meter import process_baseline, release_large_frees_to_os
from chainfed.agent.training.partition import (
    shard_of,
)
from chainfed.agent.training.tokenize import encode_split, label_token_ids
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
    parser.add_argument(
        "--shard", help="K/N: train on part K (0-based) of N of --data (simulated devices)"
    )
    parser.add_argument(
        "--partition",
        default="iid",
        help="how --shard splits: iid, dirichlet:ALPHA (label skew) or by-topic",
    )
    parser.add_argument(
        "--give-up-after",
        type=float,
        default=AgentConfig.give_up_after_s,
        help="seconds the coordinator may stay unreachable before the agent exits",
    )
    parser.add_argument("--verbose", action="store_true", help="log every round")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split and shards")
    add_data_arguments(parser)
    add_device_arguments(parser)


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
    precision = device_setup_from_args(args)
    model_dir = resolve_model(args.model, progress=False)
    model = StreamingModel(
        model_dir, dtype=precision.dtype, device=precision.device, weights=precision.weights
    )
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
        device=precision.describe(),
        give_up_after_s=args.give_up_after,
    )
    fingerprint = model.fingerprint
    agent = FederatedAgent(config, model, local, fingerprint, progress=not args.quiet)
    path = agent.run()
    report = {"agent_id": agent.agent_id, "rounds": [asdict(t) for t in agent.traffic]}
    (args.workdir / "agent_report.json").write_text(json.dumps(report, indent=2))
    print(f"chain done after {agent.rounds_done} rounds here; final adapters: {path}")
    return 0
