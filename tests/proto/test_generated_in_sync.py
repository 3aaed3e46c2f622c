"""The checked-in generated modules are exactly what ``proto/generate.py`` produces."""

import importlib.metadata
import re
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


def test_generate_refuses_another_grpcio_tools(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generate, "GRPCIO_TOOLS_VERSION", "0.0.1")

    with pytest.raises(generate.CodegenError, match="grpcio-tools==0.0.1"):
        generate.generate(tmp_path)

    assert not list(tmp_path.iterdir())


def test_the_pins_agree_and_the_runtime_fits_the_generated_code() -> None:
    setup_py = (generate.PROTO_DIR.parent / "setup.py").read_text()
    pinned = re.search(r'^GRPCIO_TOOLS = "([^"]+)"$', setup_py, re.M).group(1)
    floor = re.search(r'^PROTOBUF_FLOOR = "([^"]+)"$', setup_py, re.M).group(1)
    message_module = (generate.PROTO_DIR / "chainfed_pb2.py").read_text()
    gencode = re.search(r"# Protobuf Python Version: (\S+)", message_module).group(1)
    service_module = (generate.PROTO_DIR / "chainfed_pb2_grpc.py").read_text()
    grpc_generated = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", service_module).group(1)

    assert pinned == generate.GRPCIO_TOOLS_VERSION == grpc_generated
    assert importlib.metadata.version("grpcio-tools") == pinned
    # the generated code accepts a runtime of its own major version, at least its own
    assert floor == gencode
    runtime = _release(importlib.metadata.version("protobuf"))
    assert runtime[0] == _release(gencode)[0] and runtime >= _release(gencode)
    # protobuf 7 is out of range (Flower's bound), so the code must be for 6.x
    assert _release(gencode)[0] < 7


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])
