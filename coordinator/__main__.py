"""``python -m chainfed.coordinator --model-spec FILE ...``: the coordinator service on a
box without the training stack (no model, tokenizer or trainer is imported).

The spec file comes from ``chainfed model-spec --model M OUT.json`` on any machine that
has the model; every other option is ``chainfed coordinator``'s.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from chainfed.coordinator.command import add_arguments, serve
from chainfed.proto.errors import ChainFedError
from chainfed.proto.model_spec import ModelSpec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chainfed.coordinator",
        description="Serve a federated chain to agents over gRPC, for the model a spec file "
        "describes (chainfed model-spec writes one). Same options as chainfed coordinator, "
        "with --model-spec in place of --model.",
    )
    parser.add_argument(
        "--model-spec", type=Path, required=True, help="model spec JSON (chainfed model-spec)"
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return serve(args, ModelSpec.read(args.model_spec))
    except ChainFedError as exc:
        print(f"chainfed coordinator: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
