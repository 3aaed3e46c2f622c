"""Fuzzing the coordinator's message parsers: random and malformed protobuf payloads.

Whatever bytes or field values arrive, decoding (``serde.parse_message``) and the
``*_from_proto`` conversions either return a validated domain object or raise
``ProtocolError`` (a malformed or protocol-breaking message) or ``ChunkError`` (a bad
tensor spec or chunk); both subclass ``ValueError``. Any other exception type fails.

Generators, 500 examples each: raw random bytes (every parser); and, for the parsers
with a conversion beyond decoding, structurally valid messages whose fields take any
value the wire allows (out-of-range enums, huge integers, NaN, repeated fields), built
from the message descriptors, and byte-level mutations of a valid message. Runs are
derandomized so CI sees the same examples every time.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import example, given, settings
from hypothesis import strategies as st

from chainfed.proto import chainfed_pb2 as pb
from chainfed.proto import serde
from chainfed.proto.messages import (
    AgentCapabilities,
    ProbeReport,
    ProtocolError,
    Registration,
    Task,
    TaskKind,
    TrainingParams,
    UpdateHeader,
    UpdateMetrics,
)
from chainfed.proto.tensor_chunks import ChunkAssembler, ChunkError, TensorChunk, TensorSpec

FUZZ = settings.get_profile("fuzz")  # tests/conftest.py
"""≥ 500 examples per parser, the same ones on every run."""

EXPECTED = (ProtocolError, ChunkError)


def _update_part(message: pb.UpdatePart) -> object:
    """What the servicer does with one part: convert, and feed a chunk to an assembler."""
    part = serde.update_part_from_proto(message)
    if isinstance(part, TensorChunk):
        ChunkAssembler().add(part)
    return part


PARSERS: dict[str, tuple[type, Callable[[object], object]]] = {
    "RegisterRequest": (pb.RegisterRequest, serde.registration_from_proto),
    "GetTaskRequest": (pb.GetTaskRequest, lambda m: m),
    "FetchTensorsRequest": (pb.FetchTensorsRequest, lambda m: m),
    "UpdatePart": (pb.UpdatePart, _update_part),
    "ProbeReport": (pb.ProbeReport, serde.probe_report_from_proto),
    "StatusRequest": (pb.StatusRequest, lambda m: m),
    "Task": (pb.Task, serde.task_from_proto),
    "RegisterResponse": (pb.RegisterResponse, serde.register_ack_from_proto),
    "StatusSnapshot": (pb.StatusSnapshot, serde.status_snapshot_from_proto),
    "TensorChunk": (
        pb.TensorChunk,
        lambda m: ChunkAssembler().add(serde.tensor_chunk_from_proto(m)),
    ),
}
"""Every message either side parses -> (protobuf type, the conversion applied to it)."""


def parse(name: str, data: bytes) -> None:
    """Decode ``data`` as message ``name`` and convert it; only EXPECTED may escape."""
    message_type, convert = PARSERS[name]
    try:
        convert(serde.parse_message(message_type, data))
    except EXPECTED as exc:
        assert str(exc), f"{type(exc).__name__} without a message"


# ---------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------

_INTS = {
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor) -> st.SearchStrategy:
    if field.type in _INTS:
        lo = 0 if field.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64) else -2
        return st.one_of(st.integers(lo, 64), _INTS[field.type])
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(["", "a", "r1", "layers.0.q_proj.lora_a"]), st.text())
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    raise AssertionError(f"no generator for {field.full_name}")


@st.composite
def messages(draw, descriptor: Descriptor, depth: int = 0):
    """A message of ``descriptor`` with each field unset or set to any wire-legal value."""
    message_type = getattr(pb, descriptor.name)
    message = message_type()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        if is_message and depth >= 2:
            continue
        value = messages(field.message_type, depth + 1) if is_message else _scalar(field)
        if field.is_repeated:
            getattr(message, field.name).extend(
                draw(st.lists(value, max_size=5 if depth == 0 else 2))
            )
        elif is_message:
            getattr(message, field.name).CopyFrom(draw(value))
        else:
            setattr(message, field.name, draw(value))
    return message


def _valid_messages() -> dict[str, bytes]:
    """One well-formed example of every parsed message, serialised (seeds for mutation)."""
    caps = AgentCapabilities("cpu", 1 << 30, 100, "0.1.0", "f" * 64)
    metrics = UpdateMetrics(10, 5, 3, 0.5, 0.4, 0.8, 1000, 1.5)
    spec = TensorSpec("layers.0.q_proj.lora_a", "float32", (2, 3))
    chunk = TensorChunk(spec.name, spec.dtype, spec.shape, 0, 24, bytes(range(24)))
    task = Task(
        TaskKind.TRAIN_ROUND,
        "r7",
        stage_layer=2,
        window_layers=(1, 2),
        params=TrainingParams(gpo="exact:2"),
        deadline_unix_ms=1_700_000_000_000,
        tensors=(spec,),
    )
    return {
        "RegisterRequest": serde.registration_to_proto(Registration("a", "tok", caps)),
        "GetTaskRequest": pb.GetTaskRequest(agent_id="a", wait_ms=500),
        "FetchTensorsRequest": pb.FetchTensorsRequest(agent_id="a", round_id="r7"),
        "UpdatePart": serde.update_part_to_proto(UpdateHeader("a", "r7", metrics, (spec,))),
        "ProbeReport": serde.probe_report_to_proto(ProbeReport("a", "r1", (0.9, 0.5), 64)),
        "StatusRequest": pb.StatusRequest(history_limit=3),
        "Task": serde.task_to_proto(task),
        "RegisterResponse": pb.RegisterResponse(agent_id="a", max_message_bytes=4 << 20),
        "StatusSnapshot": pb.StatusSnapshot(phase=3, num_layers=4, stage_layer=1),
        "TensorChunk": serde.tensor_chunk_to_proto(chunk),
    }


VALID = {name: message.SerializeToString() for name, message in _valid_messages().items()}

MUTATIONS = {
    "kinds": ("flip", "insert", "delete", "overwrite", "truncate"),
    "max_insert": 12,
    "max_delete": 8,
}
"""Edits of a valid message for ``byte_mutations``: a few bytes flipped, inserted, deleted
or overwritten, or the rest cut off."""

NAMES = sorted(PARSERS)
CONVERTED = [
    name for name in NAMES if name not in ("GetTaskRequest", "FetchTensorsRequest", "StatusRequest")
]
"""Messages with a conversion beyond decoding (the others' fields are used as decoded)."""


# ---------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(data=st.binary(max_size=256))
@example(data=b"\x0a\xff\xff\xff\xff\x0f")  # length-delimited field longer than the message
@example(data=b"\x08" + b"\xff" * 10 + b"\x01")  # an 11-byte varint
@example(data=b"\x12\x02\xc3\x28")  # invalid UTF-8 in a string field
def test_random_bytes_decode_or_fail_cleanly(name: str, data: bytes):
    parse(name, data)


@pytest.mark.parametrize("name", CONVERTED)
@FUZZ
@given(data=st.data())
def test_random_field_values_convert_or_fail_cleanly(name: str, data: st.DataObject):
    message_type = PARSERS[name][0]
    message = data.draw(messages(message_type.DESCRIPTOR))
    parse(name, message.SerializeToString())


@pytest.mark.parametrize("name", CONVERTED)
@FUZZ
@given(data=st.data())
def test_mutated_valid_messages_convert_or_fail_cleanly(
    name: str, byte_mutations, data: st.DataObject
):
    parse(name, data.draw(byte_mutations(VALID[name], **MUTATIONS)))


@pytest.mark.parametrize("name", NAMES)
def test_the_mutation_seeds_are_valid(name: str):
    """The seeds convert without error, so mutations start from a message that parses."""
    message_type, convert = PARSERS[name]
    convert(serde.parse_message(message_type, VALID[name]))


def test_undecodable_bytes_are_a_protocol_error_naming_the_message():
    with pytest.raises(ProtocolError, match="UpdatePart"):
        serde.parse_message(pb.UpdatePart, b"\x0a\xff\xff\xff\xff\x0f")
