"""The checked-in generated modules are exactly what ``proto/generate.py`` produces."""

from pathlib import Path

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) regenerates the stubs")

from chainfed.proto import generate  # noqa: E402


def test_generated_modules_match_the_proto(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)

    assert sorted(p.name for p in written) == sorted(generate.GENERATED)
    stale = [
        name
        for name in generate.GENERATED
        if (tmp_path / name).read_bytes() != (generate.PROTO_DIR / name).read_bytes()
    ]
    assert not stale, f"{stale} drifted from chainfed.proto; run `python proto/generate.py`"


def test_service_module_imports_the_messages_from_the_package() -> None:
    text = (generate.PROTO_DIR / "chainfed_pb2_grpc.py").read_text()

    assert "from chainfed.proto import chainfed_pb2 as chainfed__pb2" in text
    assert "\nimport chainfed_pb2" not in text


def test_drift_is_detected(tmp_path: Path) -> None:
    proto_dir = tmp_path / "src"
    proto_dir.mkdir()
    source = (generate.PROTO_DIR / generate.PROTO_FILE).read_text()
    edited = source.replace("uint64 wait_ms = 2;", "uint64 wait_ms = 2;\n  uint32 extra = 3;")
    assert edited != source
    (proto_dir / generate.PROTO_FILE).write_text(edited)

    generate.generate(tmp_path / "out", proto_dir=proto_dir)

    ours = (generate.PROTO_DIR / "chainfed_pb2.py").read_bytes()
    assert (tmp_path / "out" / "chainfed_pb2.py").read_bytes() != ours
