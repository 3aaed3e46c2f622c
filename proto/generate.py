"""Regenerate the checked-in protobuf modules from ``chainfed.proto``.

Usage (from anywhere)::

    python proto/generate.py          # rewrite proto/chainfed_pb2{,_grpc}.py and .pyi

The ``.proto`` is the source of truth; the generated files are committed so that a
plain install needs no protoc, and ``tests/proto/test_generated_in_sync.py`` fails when
they drift from it. grpc_tools writes ``import chainfed_pb2`` into the service module,
which would only work with ``proto/`` itself on ``sys.path``; the import is rewritten to
``from chainfed.proto import chainfed_pb2`` so nothing generic lands at the top level.

Output depends on the grpcio-tools version, and so does the protobuf runtime the output
accepts (``ValidateProtobufRuntimeVersion`` in ``chainfed_pb2.py``): grpcio-tools 1.81.1
writes code for protobuf >=6.33.5,<7, the range Flower 1.42 allows too. ``generate``
refuses any other grpcio-tools than ``GRPCIO_TOOLS_VERSION`` (the ``dev`` extra's pin in
``setup.py``); to move, change both, regenerate and raise setup.py's protobuf range to
what the new code asks for.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = "chainfed.proto"
GENERATED = ("chainfed_pb2.py", "chainfed_pb2_grpc.py", "chainfed_pb2.pyi")
GRPCIO_TOOLS_VERSION = "1.81.1"
"""The grpcio-tools the checked-in modules come from (setup.py's ``dev`` pin)."""

_GENERATED_IMPORT = "import chainfed_pb2 as chainfed__pb2\n"
_PACKAGE_IMPORT = "from chainfed.proto import chainfed_pb2 as chainfed__pb2\n"


class CodegenError(RuntimeError):
    """protoc failed or produced something this script does not recognise."""


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile ``proto_dir/chainfed.proto`` into ``out_dir``; returns the written files.

    Raises ``CodegenError`` unless the installed grpcio-tools is ``GRPCIO_TOOLS_VERSION``."""
    from grpc_tools import protoc  # dev dependency: imported only when generating

    installed = importlib.metadata.version("grpcio-tools")
    if installed != GRPCIO_TOOLS_VERSION:
        raise CodegenError(
            f"grpcio-tools {installed} is installed; the checked-in modules come from "
            f"{GRPCIO_TOOLS_VERSION} (pip install grpcio-tools=={GRPCIO_TOOLS_VERSION}, "
            "or move the pin here and in setup.py together)"
        )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={proto_dir}",
            f"--proto_path={well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(proto_dir / PROTO_FILE),
        ]
        if protoc.main(args) != 0:
            raise CodegenError(f"protoc failed on {proto_dir / PROTO_FILE} (see its output)")
        service = Path(tmp, "chainfed_pb2_grpc.py")
        text = service.read_text()
        if text.count(_GENERATED_IMPORT) != 1:
            raise CodegenError(
                f"expected exactly one {_GENERATED_IMPORT.strip()!r} in the generated "
                "service module; grpc_tools changed its output"
            )
        service.write_text(text.replace(_GENERATED_IMPORT, _PACKAGE_IMPORT))
        written = []
        for name in GENERATED:
            target = out_dir / name
            shutil.copyfile(Path(tmp, name), target)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=PROTO_DIR, help="output folder (default: proto/)"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
