"""The .proto is documented and shaped as the protocol requires (DESIGN.md §5)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools compiles the .proto with source info")

from google.protobuf import descriptor_pb2  # noqa: E402
from grpc_tools import protoc  # noqa: E402

from chainfed.proto import chainfed_pb2 as pb  # noqa: E402
from chainfed.proto import chainfed_pb2_grpc  # noqa: E402
from chainfed.proto.generate import PROTO_DIR, PROTO_FILE  # noqa: E402

# descriptor.proto field numbers used in SourceCodeInfo paths
MESSAGE, ENUM, SERVICE = 4, 5, 6
FIELD, NESTED_ONEOF, VALUE, METHOD = 2, 8, 2, 2


def _file_with_comments(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "chainfed.desc"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_DIR}",
            f"--descriptor_set_out={out}",
            "--include_source_info",
            str(PROTO_DIR / PROTO_FILE),
        ]
    )
    assert rc == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]


def test_every_rpc_message_enum_and_field_has_a_comment(tmp_path: Path) -> None:
    file = _file_with_comments(tmp_path)
    commented = {
        tuple(loc.path) for loc in file.source_code_info.location if loc.leading_comments.strip()
    }
    wanted: dict[tuple[int, ...], str] = {}
    for i, message in enumerate(file.message_type):
        wanted[(MESSAGE, i)] = message.name
        for j, field in enumerate(message.field):
            wanted[(MESSAGE, i, FIELD, j)] = f"{message.name}.{field.name}"
        for j, oneof in enumerate(message.oneof_decl):
            if not oneof.name.startswith("_"):  # synthetic oneofs of `optional` fields
                wanted[(MESSAGE, i, NESTED_ONEOF, j)] = f"{message.name}.{oneof.name}"
        assert not message.nested_type, "nested messages: extend this test"
    for i, enum in enumerate(file.enum_type):
        wanted[(ENUM, i)] = enum.name
        for j, value in enumerate(enum.value):
            wanted[(ENUM, i, VALUE, j)] = value.name
    for i, service in enumerate(file.service):
        wanted[(SERVICE, i)] = service.name
        for j, method in enumerate(service.method):
            wanted[(SERVICE, i, METHOD, j)] = f"{service.name}.{method.name}"

    missing = [name for path, name in wanted.items() if path not in commented]

    assert len(wanted) > 150
    assert not missing, f"undocumented: {missing}"


def test_service_shape() -> None:
    service = pb.DESCRIPTOR.services_by_name["ChainFed"]
    shape = {
        m.name: (m.input_type.name, m.client_streaming, m.output_type.name, m.server_streaming)
        for m in service.methods
    }

    assert pb.DESCRIPTOR.package == "chainfed.v1"
    assert shape == {
        "Register": ("RegisterRequest", False, "RegisterResponse", False),
        "GetTask": ("GetTaskRequest", False, "Task", False),
        "FetchTensors": ("FetchTensorsRequest", False, "TensorChunk", True),
        "SubmitUpdate": ("UpdatePart", True, "SubmitUpdateResponse", False),
        "ReportProbe": ("ProbeReport", False, "ReportProbeResponse", False),
        "Status": ("StatusRequest", False, "StatusSnapshot", False),
    }
    assert hasattr(chainfed_pb2_grpc, "ChainFedStub")
    assert hasattr(chainfed_pb2_grpc, "add_ChainFedServicer_to_server")


def test_nothing_generic_at_top_level() -> None:
    assert "chainfed_pb2" not in sys.modules
    assert chainfed_pb2_grpc.chainfed__pb2 is pb
