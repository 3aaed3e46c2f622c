"""``chainfed export``: a trained adapter file as PEFT adapters or as a merged HF folder.

The work is in ``chainfed.agent.convert.export``; this module is the command line around it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chainfed.agent.app.options import add_model_arguments
from chainfed.agent.convert.assets import resolve_model
from chainfed.agent.convert.export import (
    DEFAULT_SHARD_BYTES,
    FORMATS,
    OUTPUT_DTYPES,
    export_merged,
    export_peft,
)
from chainfed.agent.errors import ChainFedError
from chainfed.proto.units import format_bytes, parse_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``chainfed export``."""
    parser.add_argument("out_dir", type=Path, help="output folder (absent, empty or an export)")
    parser.add_argument(
        "--adapters", type=Path, required=True, help="adapter file (chainfed train's result)"
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="peft",
        help="peft: adapter_config.json + adapter_model.safetensors for "
        "peft.PeftModel.from_pretrained; merged: a full HF folder with the adapters merged "
        "into the weights (default: peft)",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(OUTPUT_DTYPES),
        help="merged only: cast the weights (e.g. bfloat16 for a GPU box); default: keep the "
        "checkpoint's",
    )
    parser.add_argument(
        "--shard-size",
        default=format_bytes(DEFAULT_SHARD_BYTES).replace(" ", ""),
        help="merged only: largest safetensors shard, e.g. 500MB (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    """Write the export; returns the exit status."""
    model_dir = resolve_model(args.model, progress=not args.quiet)
    check = not args.no_model_check
    if args.format == "peft":
        if args.dtype is not None:
            raise ChainFedError("--dtype applies to --format merged only")
        out = export_peft(model_dir, args.adapters, args.out_dir, check_model=check)
    else:
        try:
            shard_bytes = parse_bytes(args.shard_size)
        except ValueError as exc:
            raise ChainFedError(f"--shard-size: {exc}") from exc
        out = export_merged(
            model_dir,
            args.adapters,
            args.out_dir,
            dtype=OUTPUT_DTYPES[args.dtype] if args.dtype else None,
            shard_bytes=shard_bytes,
            check_model=check,
            progress=not args.quiet,
        )
    print(f"wrote {out} ({args.format}); how to load it: {out / 'README.md'}")
    return 0
