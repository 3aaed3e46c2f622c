"""``chainfed model-spec``: write the ``ModelSpec`` of a model folder as JSON, for a
coordinator on a box without the model (``python -m chainfed.coordinator --model-spec``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from chainfed.agent.convert.assets import resolve_model
from chainfed.agent.runtime.model import StreamingModel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="minilm", help="model folder or alias (minilm, smollm2)")
    parser.add_argument("out", type=Path, help="JSON file to write")


def run(args: argparse.Namespace) -> int:
    """Open the model (headers and fingerprint only), write its spec."""
    spec = StreamingModel(resolve_model(args.model, progress=False)).spec()
    print(f"wrote {spec.write(args.out)}: {spec.num_layers} layers, family {spec.family}")
    return 0
