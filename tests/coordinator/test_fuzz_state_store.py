"""Fuzzing the coordinator's state files: corrupt ``state.json`` and tensors files.

A real coordinator (agents a and b, round r1 aggregated, r2 open) is saved once. Each
example corrupts the saved files: ``state.json`` replaced by random bytes, byte-mutated,
or with a field anywhere in its JSON replaced by another JSON value or removed; the
tensors file byte-mutated or pointed elsewhere. ``state_store.load`` then either
raises ``StateDirError`` naming the state dir, or returns a coordinator that works:
its status converts to protobuf, it ticks, answers agent a and saves elsewhere. In
both cases no file of the state dir was modified, added or removed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chainfed.coordinator import state_store
from chainfed.coordinator.state_store import STATE_FILE, StateDirError
from chainfed.coordinator.update_checks import UpdateRejectedError
from chainfed.proto import serde

FUZZ = settings(  # the "fuzz" profile of tests/conftest.py
    settings.get_profile("fuzz"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def write_new(path: Path, data: bytes) -> None:
    """Write ``data`` as a new file: rewriting a file in place makes ext4 flush it to
    disk (auto_da_alloc), about 3 ms an example; a fresh inode costs microseconds."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


class Saved:
    """The state dir of a coordinator mid-chain, and the files it held when saved."""

    def __init__(self, kit, root: Path) -> None:
        self.config = kit.config(min_agents=2, min_rounds=5, max_rounds=5)
        coordinator = kit.coordinator(min_agents=2, min_rounds=5, max_rounds=5)
        kit.register(coordinator, "a", "b", now=1000)
        kit.train_round(coordinator, 2000)
        coordinator.tick(3000)
        self.dir = root / "state"
        self.scratch = root / "scratch"
        state_store.save(coordinator, self.dir)
        self.files = {p.name: p.read_bytes() for p in self.dir.iterdir()}
        self.state = json.loads(self.files[STATE_FILE])
        self.tensors_file = self.state["tensors_file"]

    def restore(self) -> None:
        for path in self.dir.iterdir():
            if path.name not in self.files:
                path.unlink()
        for name, data in self.files.items():
            write_new(self.dir / name, data)

    def check(self, state_json: bytes | None = None, tensors: bytes | None = None) -> None:
        self.restore()
        if state_json is not None:
            write_new(self.dir / STATE_FILE, state_json)
        if tensors is not None:
            write_new(self.dir / self.tensors_file, tensors)
        before = {p.name: p.read_bytes() for p in self.dir.iterdir()}
        try:
            coordinator = state_store.load(self.dir, self.config)
        except StateDirError as exc:
            assert str(self.dir) in str(exc), str(exc)
        else:
            assert coordinator is not None
            serde.status_snapshot_to_proto(coordinator.snapshot())
            coordinator.tick(4000)
            try:
                coordinator.next_task("a", 4000)
            except UpdateRejectedError as exc:  # an edit may have removed agent a
                assert exc.code == "not_found", exc
            serde.status_snapshot_to_proto(coordinator.snapshot())
            state_store.save(coordinator, self.scratch)
        assert {p.name: p.read_bytes() for p in self.dir.iterdir()} == before


@pytest.fixture
def saved(kit, tmp_path) -> Saved:
    return Saved(kit, tmp_path)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats()
    | st.text(max_size=10)
    | st.sampled_from(["training", "probing", "done", "a", "r1", "r9", "../x", "/etc/hostname"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indices) into a JSON value, the root included."""
    paths = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            paths += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            paths += _paths(child, (*prefix, index))
    return paths


@st.composite
def json_edits(draw, state: dict) -> bytes:
    """``state`` with 1-3 values anywhere replaced by arbitrary JSON, or removed."""
    state = json.loads(json.dumps(state))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(state)))
        if not path:
            state = draw(JSON_VALUES)
            continue
        parent = state
        try:
            for step in path[:-1]:
                parent = parent[step]
            if draw(st.booleans()) and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(JSON_VALUES)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed this path
    return json.dumps(state).encode()


@FUZZ
@given(data=st.data())
def test_edited_state_json(saved, data):
    saved.check(state_json=data.draw(json_edits(saved.state)))


@FUZZ
@given(data=st.data(), random=st.booleans())
@example(data=None, random=None)
def test_random_and_mutated_state_json(saved, byte_mutations, data, random):
    if data is None:  # pinned cases
        for doc in (b"[]", b"null", b'{"config": []}', b'{"config": {}, "x": 1}', b"\xff\xfe"):
            saved.check(state_json=doc)
        return
    if random:
        saved.check(state_json=data.draw(st.binary(max_size=300)))
    else:
        mutated = byte_mutations(saved.files[STATE_FILE], max_insert=8, max_delete=8)
        saved.check(state_json=data.draw(mutated))


@FUZZ
@given(data=st.data())
def test_mutated_tensors_file(saved, byte_mutations, data):
    mutated = byte_mutations(saved.files[saved.tensors_file], max_insert=8, max_delete=8)
    saved.check(tensors=data.draw(mutated))


def test_the_saved_state_loads(saved):
    saved.check()
    coordinator = state_store.load(saved.dir, saved.config)
    assert sorted(coordinator.agents) == ["a", "b"] and len(coordinator.history) == 1


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.update(convergence=[]),  # was AttributeError: 'list' has no 'items'
        lambda s: s["history"][0].update(update_digests=[None]),  # was TypeError in Status
        lambda s: s.update(round_seq="7"),
        lambda s: s.update(stage_layer=10**9),
        lambda s: s.update(tensors_file="../" + s["tensors_file"]),
        lambda s: s["agents"]["a"].update(last_seen_ms=2**64),
        lambda s: s.update(start_layer=None),  # training at a stage: was TypeError in Status
        lambda s: s["convergence"].update(rounds=0.0),  # was TypeError in Status
        lambda s: s.update(agents_journal="../agents-000001.jsonl"),
        lambda s: s.update(agents_journal="registrations.jsonl"),
    ],
    ids=[
        "convergence",
        "digest",
        "round_seq",
        "layer",
        "tensors_file",
        "last_seen",
        "start",
        "rounds",
        "journal_dir",
        "journal_name",
    ],
)
def test_found_corruptions_are_state_dir_errors(saved, edit):
    state = json.loads(saved.files[STATE_FILE])
    edit(state)
    saved.check(state_json=json.dumps(state).encode())
    with pytest.raises(StateDirError, match="corrupt coordinator state"):
        state_store.load(saved.dir, saved.config)
