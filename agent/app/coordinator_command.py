"""``chainfed coordinator``: the coordinator service for a model folder on this machine.

Builds the model's ``ModelSpec`` (layers, family, fingerprint, adapter widths) and runs
the same ``serve`` as ``python -m chainfed.coordinator --model-spec FILE``; the service
itself never opens the model.
"""

from __future__ import annotations

import argparse

from chainfed.agent.convert.assets import resolve_model
from chainfed.agent.runtime.model import StreamingModel
from chainfed.coordinator.command import add_arguments as add_service_arguments
from chainfed.coordinator.command import serve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` and every option of the service."""
    parser.add_argument("--model", default="minilm", help="model folder or alias (minilm, smollm2)")
    add_service_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Serve the federation of ``--model`` until done (or interrupted)."""
    model = StreamingModel(resolve_model(args.model, progress=False))
    return serve(args, model.spec())
