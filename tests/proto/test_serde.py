"""Domain <-> protobuf round trips, and the errors for messages no peer may send."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chainfed.proto import chainfed_pb2 as pb
from chainfed.proto import serde
from chainfed.proto.messages import (
    LORA_TARGETS,
    AgentCapabilities,
    AgentStatus,
    ChainPhase,
    ProbeReport,
    ProtocolError,
    RegisterAck,
    Registration,
    RoundRecord,
    StatusSnapshot,
    Task,
    TaskKind,
    TrainingParams,
    UpdateHeader,
    UpdateMetrics,
)
from chainfed.proto.tensor_chunks import (
    DTYPES,
    MAX_RANK,
    ChunkError,
    TensorChunk,
    TensorSpec,
)

u32 = st.integers(0, 2**32 - 1)
u63 = st.integers(0, 2**63 - 1)  # fits both int64 and uint64 fields
i32 = st.integers(-(2**31), 2**31 - 1)
layers = st.lists(st.integers(0, 200), max_size=6).map(tuple)
text = st.text(max_size=30)
ids = st.text(min_size=1, max_size=30)
finite = st.floats(allow_nan=False)
non_negative = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)

capabilities = st.builds(
    AgentCapabilities,
    device=text,
    memory_budget_bytes=u63,
    num_samples=u63,
    software_version=text,
    model_fingerprint=text,
    max_window=u32,
    labels=st.lists(ids, max_size=4, unique=True).map(tuple),
)
tensor_specs = st.builds(
    TensorSpec,
    name=st.text(min_size=1, max_size=40),
    dtype=st.sampled_from(sorted(DTYPES)),
    shape=st.lists(st.integers(0, 128), max_size=MAX_RANK).map(tuple),  # < 2**63 bytes
)
manifests = st.lists(tensor_specs, max_size=5, unique_by=lambda s: s.name).map(tuple)
training_params = st.builds(
    TrainingParams,
    lr=non_negative,
    weight_decay=non_negative,
    micro_batch=st.integers(1, 2**32 - 1),
    grad_accum=st.integers(1, 2**32 - 1),
    local_steps=st.integers(1, 2**32 - 1),
    gpo=st.one_of(
        st.sampled_from(["proxy", "none", "exact:all"]),
        st.integers(1, 2**32 - 1).map(lambda k: f"exact:{k}"),
    ),
    gpo_lambda=non_negative,
    proxy_rank=u32,
    lora_rank=st.integers(1, 2**32 - 1),
    lora_alpha=finite,
    lora_dropout=st.floats(0.0, 1.0, exclude_max=True),
    backbone_dropout=st.floats(0.0, 1.0, exclude_max=True),
    e2e_streamed=st.booleans(),
    lora_targets=st.sampled_from(LORA_TARGETS),
    lora_train_a=st.booleans(),
    lora_seed=u63,
    seed=u63,
    foat_samples=u32,
    local_dp_clip=st.floats(min_value=1e-6, allow_nan=False, allow_infinity=False),
    local_dp_noise_multiplier=non_negative,
)


@st.composite
def tasks(draw) -> Task:
    kind = draw(st.sampled_from(TaskKind))
    needs_params = kind in (TaskKind.PROBE, TaskKind.TRAIN_ROUND, TaskKind.FIT_HEAD)
    return Task(
        kind=kind,
        round_id=draw(text if kind is TaskKind.WAIT else ids),
        stage_layer=draw(
            i32
            if kind in (TaskKind.TRAIN_ROUND, TaskKind.EVALUATE, TaskKind.FIT_HEAD)
            else st.none() | i32
        ),
        window_layers=draw(layers),
        frozen_layers=draw(layers),
        params=draw(training_params if needs_params else st.none() | training_params),
        deadline_unix_ms=draw(u63),
        tensors=draw(manifests),
        retry_after_ms=draw(u63),
    )


metrics = st.builds(
    UpdateMetrics,
    train_samples=u63,
    val_samples=u63,
    steps=u32,
    train_loss=finite,
    val_loss=finite,
    val_metric=finite,
    peak_memory_bytes=u63,
    seconds=finite,
)
update_headers = st.builds(
    UpdateHeader, agent_id=text, round_id=ids, metrics=metrics, tensors=manifests
)
chunks = st.builds(
    TensorChunk,
    name=text,
    dtype=st.sampled_from(sorted(DTYPES)),
    shape=st.lists(u63, max_size=MAX_RANK).map(tuple),
    offset=u63,
    total_bytes=u63,
    data=st.binary(max_size=64),
)
probe_reports = st.builds(
    ProbeReport,
    agent_id=text,
    round_id=ids,
    cka_scores=st.lists(finite, max_size=40).map(tuple),
    num_samples=u63,
    readout_losses=st.lists(finite, max_size=40).map(tuple),
)
snapshots = st.builds(
    StatusSnapshot,
    phase=st.sampled_from(ChainPhase),
    num_layers=u32,
    start_layer=st.none() | i32,
    stage_layer=st.none() | i32,
    window_layers=layers,
    final_layers=layers,
    round_id=text,
    stage_rounds=u32,
    total_rounds=u32,
    agents=st.lists(
        st.builds(
            AgentStatus,
            agent_id=text,
            capabilities=capabilities,
            last_seen_unix_ms=u63,
            rounds_completed=u32,
        ),
        max_size=3,
    ).map(tuple),
    history=st.lists(
        st.builds(
            RoundRecord,
            round_id=text,
            stage_layer=i32,
            window_layers=layers,
            participants=st.lists(text, max_size=3).map(tuple),
            dropped=st.lists(text, max_size=3).map(tuple),
            metrics=metrics,
            finished_unix_ms=u63,
            dp_epsilon=st.none() | non_negative,
            dp_round_epsilon=st.none() | non_negative,
        ),
        max_size=3,
    ).map(tuple),
    dp_epsilon=st.none() | non_negative,
    dp_delta=non_negative,
    dp_epsilon_budget=st.none() | non_negative,
    stop_reason=text,
    params=st.none() | training_params,
)
registrations = st.builds(Registration, agent_id=text, token=text, capabilities=capabilities)
register_acks = st.builds(RegisterAck, agent_id=ids, max_message_bytes=st.integers(1, 2**63 - 1))

PAIRS = [
    ("agent_capabilities", capabilities, pb.AgentCapabilities),
    ("registration", registrations, pb.RegisterRequest),
    ("register_ack", register_acks, pb.RegisterResponse),
    ("training_params", training_params, pb.TrainingParams),
    ("tensor_spec", tensor_specs, pb.TensorSpec),
    ("task", tasks(), pb.Task),
    ("update_metrics", metrics, pb.UpdateMetrics),
    ("update_header", update_headers, pb.UpdateHeader),
    ("update_part", update_headers | chunks, pb.UpdatePart),
    ("tensor_chunk", chunks, pb.TensorChunk),
    ("probe_report", probe_reports, pb.ProbeReport),
    ("status_snapshot", snapshots, pb.StatusSnapshot),
]


@pytest.mark.parametrize(
    ("name", "strategy", "message_type"), PAIRS, ids=[name for name, _, _ in PAIRS]
)
def test_round_trip_through_the_wire(name, strategy, message_type) -> None:
    to_proto = getattr(serde, f"{name}_to_proto")
    from_proto = getattr(serde, f"{name}_from_proto")

    @given(strategy)
    def check(obj) -> None:
        message = to_proto(obj)
        wire = message.SerializeToString()
        back = from_proto(message_type.FromString(wire))

        assert isinstance(message, message_type)
        assert back == obj

    check()


def test_optional_layers_keep_their_presence() -> None:
    wait = serde.task_to_proto(Task(TaskKind.WAIT, retry_after_ms=500))
    layer_zero = serde.task_to_proto(
        Task(TaskKind.TRAIN_ROUND, "r", stage_layer=0, params=TrainingParams())
    )

    assert not wait.HasField("stage_layer") and not wait.HasField("params")
    assert layer_zero.HasField("stage_layer") and layer_zero.stage_layer == 0


def test_gpo_spec_is_typed_on_the_wire() -> None:
    def wire(gpo: str) -> tuple[int, int]:
        message = serde.training_params_to_proto(TrainingParams(gpo=gpo))
        return message.gpo_kind, message.gpo_exact_depth

    assert wire("proxy") == (pb.GPO_KIND_PROXY, 0)
    assert wire("none") == (pb.GPO_KIND_NONE, 0)
    assert wire("exact:all") == (pb.GPO_KIND_EXACT, 0)
    assert wire("exact:3") == (pb.GPO_KIND_EXACT, 3)


# ---------------------------------------------------------------------------------
# Messages no correct peer sends
# ---------------------------------------------------------------------------------


def _valid_params() -> pb.TrainingParams:
    return serde.training_params_to_proto(TrainingParams())


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (pb.Task(), "Task.kind is unset"),
        (pb.Task(kind=42), r"Task.kind is unset or unknown \(42\)"),
        (pb.Task(kind=pb.TASK_KIND_TRAIN_ROUND, params=_valid_params()), "needs a round_id"),
        (pb.Task(kind=pb.TASK_KIND_PROBE, round_id="r"), "PROBE task needs params"),
        (
            pb.Task(kind=pb.TASK_KIND_TRAIN_ROUND, round_id="r", params=_valid_params()),
            "needs a stage_layer",
        ),
        (
            pb.Task(
                kind=pb.TASK_KIND_DONE,
                round_id="r",
                tensors=[pb.TensorSpec(name="a", dtype=pb.DTYPE_INT8, total_bytes=1)] * 2,
            ),
            "repeats a tensor name",
        ),
    ],
)
def test_bad_task(message: pb.Task, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        serde.task_from_proto(message)


def test_bad_training_params() -> None:
    zero_batch = _valid_params()
    zero_batch.micro_batch = 0
    depth_without_exact = _valid_params()
    depth_without_exact.gpo_exact_depth = 2
    no_targets = _valid_params()
    no_targets.lora_targets = pb.LORA_TARGETS_UNSPECIFIED
    nan_lr = _valid_params()
    nan_lr.lr = float("nan")

    with pytest.raises(ProtocolError, match="micro_batch must be >= 1"):
        serde.training_params_from_proto(zero_batch)
    with pytest.raises(ProtocolError, match="gpo_exact_depth=2 with gpo_kind proxy"):
        serde.training_params_from_proto(depth_without_exact)
    with pytest.raises(ProtocolError, match="lora_targets is unset"):
        serde.training_params_from_proto(no_targets)
    with pytest.raises(ProtocolError, match="lr must be >= 0"):
        serde.training_params_from_proto(nan_lr)
    with pytest.raises(ProtocolError, match="TrainingParams.gpo: .* got 'exact:0'"):
        TrainingParams(gpo="exact:0")


def test_missing_sub_messages() -> None:
    with pytest.raises(ProtocolError, match="UpdatePart carries neither"):
        serde.update_part_from_proto(pb.UpdatePart())
    with pytest.raises(ProtocolError, match="UpdateHeader.metrics is missing"):
        serde.update_header_from_proto(pb.UpdateHeader(round_id="r"))
    with pytest.raises(ProtocolError, match="RegisterRequest.capabilities is missing"):
        serde.registration_from_proto(pb.RegisterRequest(agent_id="a"))
    with pytest.raises(ProtocolError, match="StatusSnapshot.phase is unset"):
        serde.status_snapshot_from_proto(pb.StatusSnapshot())


def test_bad_tensor_specs_and_chunks() -> None:
    with pytest.raises(ChunkError, match="tensor dtype is unset"):
        serde.tensor_chunk_from_proto(pb.TensorChunk(name="w", shape=[1]))
    with pytest.raises(ChunkError, match=r"tensor dtype is unset or unknown \(77\)"):
        serde.tensor_spec_from_proto(pb.TensorSpec(name="w", dtype=77))
    with pytest.raises(ChunkError, match=r"total_bytes=5 but float32\[2\] is 8 bytes"):
        serde.tensor_spec_from_proto(
            pb.TensorSpec(name="w", dtype=pb.DTYPE_FLOAT32, shape=[2], total_bytes=5)
        )
    with pytest.raises(ChunkError, match="more than any tensor can be"):
        serde.tensor_spec_from_proto(
            pb.TensorSpec(name="w", dtype=pb.DTYPE_INT16, shape=[2**62], total_bytes=2**63)
        )
    with pytest.raises(ChunkError, match="no wire value"):
        serde.dtype_to_proto("complex64")


def test_every_wire_dtype_is_known_and_back() -> None:
    wire_names = {
        name.removeprefix("DTYPE_").lower()
        for name in pb.DType.keys()
        if name != "DTYPE_UNSPECIFIED"
    }

    assert wire_names == set(DTYPES)
    for name in DTYPES:
        assert serde.dtype_from_proto(serde.dtype_to_proto(name)) == name


# ---------------------------------------------------------------------------------
# Auth metadata
# ---------------------------------------------------------------------------------


def test_auth_metadata_round_trip() -> None:
    metadata = serde.auth_metadata("s3cret")

    assert metadata == (("authorization", "Bearer s3cret"),)
    assert serde.token_from_metadata((("user-agent", "grpc"), *metadata)) == "s3cret"
    assert serde.token_from_metadata([("Authorization", "Bearer t")]) == "t"


@pytest.mark.parametrize(
    "metadata",
    [None, (), (("authorization", "Basic abc"),), (("authorization", b"Bearer t"),)],
)
def test_no_token_in_metadata(metadata) -> None:
    assert serde.token_from_metadata(metadata) is None


@pytest.mark.parametrize("labels", [("neg", "neg"), ("neg", "")])
def test_capabilities_refuse_repeated_or_empty_class_names(labels) -> None:
    message = pb.AgentCapabilities(model_fingerprint="abc", labels=labels)

    with pytest.raises(ProtocolError, match="labels must be distinct non-empty names"):
        serde.agent_capabilities_from_proto(message)


def test_token_stays_out_of_repr() -> None:
    caps = AgentCapabilities("cpu", 1 << 30, 100, "0.1.0", "abc")

    assert "s3cret" not in repr(Registration("agent-1", "s3cret", caps))
