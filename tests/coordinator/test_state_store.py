"""Coordinator persistence: exact round trip, refusal of foreign state, crash safety.

Crashes are simulated by making one step of ``save`` raise (monkeypatched
``os.replace`` / ``os.fsync`` / ``Path.unlink``): what is on disk at that moment is
exactly what a process killed there leaves behind, and ``load`` must return a
consistent state from it.

Read-only state dirs: tests run as root in CI, and root ignores permission bits, so
``chmod`` cannot make a directory read-only for it. The read-only test uses ``chmod``
for a normal user and the immutable attribute (``chattr +i``, which binds root too) as
root, and skips where neither takes effect; a state dir whose parent is a regular file
fails for everyone and is tested unconditionally.
"""

import contextlib
import json
import os
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest

from chainfed.coordinator import state_store
from chainfed.coordinator.state_store import STATE_FILE, StateDirError
from chainfed.coordinator.update_checks import UpdateRejectedError
from chainfed.proto.adapter_file import load_adapter_file
from chainfed.proto.messages import ChainPhase, ProbeReport


def tensor_bytes(tensors: dict) -> dict:
    return {k: (str(v.dtype), tuple(v.shape), v.numpy().tobytes()) for k, v in tensors.items()}


def state_of(c) -> dict:
    """Everything a resumed coordinator must reproduce, tensors as raw bytes."""
    return {
        "phase": c.phase,
        "start_layer": c.start_layer,
        "window": c.window,
        "stage_layer": c.stage_layer,
        "round_seq": c.round_seq,
        "probe_id": c.probe_id,
        "foat_scores": c.foat_scores,
        "readout_losses": c.readout_losses,
        "convergence": asdict(c.convergence),
        "agents": {a: asdict(e) for a, e in c.agents.items()},
        "history": list(c.history),
        "final": tensor_bytes(c.final),
        "window_state": tensor_bytes(c.window_state),
    }


def mid_chain(kit, **overrides):
    """FOAT-probed (start layer 1), three agents, two rounds per stage: five rounds done
    (the last with a straggler), layer 1 final, the last stage half-way (convergence
    mid-count) and its second round open with one update in."""
    c = kit.coordinator(start_layer=None, min_agents=2, min_rounds=2, max_rounds=2, **overrides)
    kit.register(c, "a", "b", "c")
    for agent, n in (("a", 10), ("b", 20), ("c", 30)):
        losses = (9.0, 1.5, 1.2, 1.0) if agent == "a" else ()
        c.report_probe(ProbeReport(agent, c.probe_id, (0.95, 0.7, 0.6, 0.5), n, losses))
    c.tick(1)
    assert c.start_layer == 1 and c.phase is ChainPhase.TRAINING
    for n in range(4):
        kit.train_round(c, 100 * n, losses={"a": 1.0 - n / 10}, seed=n)
    c.tick(500)
    r = c.open_round
    for k, agent in enumerate(("a", "b")):  # c straggles
        c.submit(agent, r.round_id, kit.metrics(0.3), kit.update(r.window, r.stage_layer, k), 501)
    c.tick(500 + 60_000)
    c.tick(500 + 60_001)
    r = c.open_round
    c.submit("a", r.round_id, kit.metrics(), kit.update(r.window, r.stage_layer, 9), 60_600)
    assert c.history[-1].dropped == ("c",) and "layers.1.q_proj.lora_a" in c.final
    assert c.convergence.rounds == 1 and c.stage_layer == 3
    return c


def test_round_trip_restores_everything(kit, tmp_path):
    c = mid_chain(kit)
    state_store.save(c, tmp_path)

    loaded = state_store.load(tmp_path, kit.config())

    assert state_of(loaded) == state_of(c)
    assert loaded.changed is False
    assert loaded.open_round is None  # a round in flight is re-run, never resumed
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        STATE_FILE,
        f"tensors-{c.round_seq:06d}-{len(c.history):06d}.safetensors",
    ]


def test_a_state_saved_before_readout_losses_loads_without_them(kit, tmp_path):
    c = mid_chain(kit)
    state_store.save(c, tmp_path)
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state.pop("readout_losses") == pytest.approx([9.0, 1.5, 1.2, 1.0])
    (tmp_path / STATE_FILE).write_text(json.dumps(state))

    loaded = state_store.load(tmp_path, kit.config())

    assert loaded.readout_losses is None
    assert (loaded.start_layer, loaded.stage_layer) == (c.start_layer, c.stage_layer)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("foat_scores", [0.95, 0.7, 0.6]),  # a 3-layer probe for a 4-layer model
        ("foat_scores", [0.95, float("nan"), 0.6, 0.5]),
        ("readout_losses", [9.0, 1.5, 1.2, 1.0, 1.0]),
        ("readout_losses", [9.0, -1.5, 1.2, 1.0]),
    ],
    ids=["cka_length", "cka_nan", "readout_length", "readout_negative"],
)
def test_a_probe_that_report_probe_would_refuse_is_a_corrupt_state(kit, tmp_path, field, value):
    c = mid_chain(kit)
    state_store.save(c, tmp_path)
    state = json.loads((tmp_path / STATE_FILE).read_text())
    (tmp_path / STATE_FILE).write_text(json.dumps({**state, field: value}))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    with pytest.raises(StateDirError, match=f"corrupt coordinator state.*field {field}"):
        state_store.load(tmp_path, kit.config())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def journals(state_dir: Path) -> list[str]:
    return sorted(p.name for p in state_dir.glob(state_store.JOURNAL_PATTERN))


def test_registrations_alone_are_appended_to_the_journal_and_load_back(kit, tmp_path):
    c = kit.coordinator(start_layer=None, window=None, min_agents=5)
    c.register("a", kit.caps(memory=1), 7)
    state_store.persist(c, tmp_path)  # a new coordinator: the whole state
    state_json = (tmp_path / STATE_FILE).read_bytes()
    assert json.loads(state_json)["agents"].keys() == {"a"} and journals(tmp_path) == []

    kit.register(c, "b", "c", now=8)
    assert not c.changed and c.unsaved_agents == {"b", "c"}
    state_store.persist(c, tmp_path)
    c.register("a", kit.caps(memory=2), 9)  # a refreshed registration is journaled too
    state_store.persist(c, tmp_path)

    assert (tmp_path / STATE_FILE).read_bytes() == state_json  # not rewritten
    (journal,) = journals(tmp_path)
    lines = (tmp_path / journal).read_text().splitlines()
    assert [json.loads(line)["agent"] for line in lines] == ["b", "c", "a"]
    assert json.loads(state_json)["agents_journal"] == journal
    assert state_of(state_store.load(tmp_path, kit.config())) == state_of(c)

    kit.register(c, "d", "e", now=10)  # the fifth agent starts the probe: a chain change
    assert c.changed
    state_store.persist(c, tmp_path)
    saved = json.loads((tmp_path / STATE_FILE).read_text())
    assert saved["agents"].keys() == set("abcde") and saved["agents_journal"] != journal
    assert journals(tmp_path) == []  # the old journal is gone, the new one not begun
    assert state_of(state_store.load(tmp_path, kit.config())) == state_of(c)


def journal_of_one_registration(kit, tmp_path: Path) -> str:
    """Agent a in ``tmp_path``'s state.json, agent b in its journal; the journal's name."""
    c = kit.coordinator(start_layer=None, window=None, min_agents=5)
    kit.register(c, "a")
    state_store.persist(c, tmp_path)
    kit.register(c, "b")
    state_store.persist(c, tmp_path)
    (journal,) = journals(tmp_path)
    return journal


def test_a_journal_line_cut_short_is_ignored_and_never_appended_to(kit, tmp_path):
    journal = journal_of_one_registration(kit, tmp_path)
    with open(tmp_path / journal, "a") as f:
        f.write('{"agent": "c", "capabil')  # a crash in the middle of the write

    loaded = state_store.load(tmp_path, kit.config())
    assert sorted(loaded.agents) == ["a", "b"]
    kit.register(loaded, "c")
    state_store.persist(loaded, tmp_path)  # not appended after the torn line: a full save
    assert journals(tmp_path) == []
    assert sorted(state_store.load(tmp_path, kit.config()).agents) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("not json", "line 2"),
        ('{"capabilities": {}, "last_seen_ms": 1, "rounds_completed": 0}', "field agent"),
        ('{"agent": "x", "last_seen_ms": -1}', r"agents\['x'\]\.capabilities is missing"),
    ],
)
def test_a_corrupt_journal_is_refused_and_left_as_it_was(kit, tmp_path, line, named):
    journal = journal_of_one_registration(kit, tmp_path)
    with open(tmp_path / journal, "a") as f:
        f.write(line + "\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    with pytest.raises(StateDirError, match=f"{journal}, line 2: corrupt registration journal"):
        state_store.load(tmp_path, kit.config())
    with pytest.raises(StateDirError, match=named):
        state_store.load(tmp_path, kit.config())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def finish_chain(kit, c, agents: tuple[str, ...] = ("a",)) -> None:
    """Every stage's round, then the evaluation answered by ``agents``: the chain is done."""
    for stage in range(kit.num_layers):
        kit.train_round(c, 100 * stage, seed=stage)
    task = c.next_task(agents[0], 1000)
    for agent in agents:
        c.submit(agent, task.round_id, kit.eval_metrics(), {}, 1001)
    assert c.phase is ChainPhase.DONE


def test_round_trip_of_a_fresh_and_a_finished_chain(kit, tmp_path):
    fresh = kit.coordinator(start_layer=None, window=None)
    fresh.register("a", kit.caps(memory=123), 7)
    state_store.save(fresh, tmp_path / "fresh")
    assert state_of(state_store.load(tmp_path / "fresh", kit.config())) == state_of(fresh)
    assert state_store.load(tmp_path / "nothing-yet", kit.config()) is None

    done = kit.coordinator(window=1)
    kit.register(done, "a")
    finish_chain(kit, done)
    state_store.save(done, tmp_path / "done")

    assert state_of(state_store.load(tmp_path / "done", kit.config())) == state_of(done)
    final = load_adapter_file(tmp_path / "done" / state_store.FINAL_FILE)
    assert tensor_bytes(final.tensors) == tensor_bytes(done.final)
    assert {"head.weight", "head.bias"} <= set(final.tensors)
    assert final.info["task"] == "classify" and final.info["model_digest"] == kit.fingerprint


def test_a_finished_chain_writes_its_final_file_once(kit, tmp_path):
    # a restart (possibly of a newer version, with more metadata) must not rewrite a
    # finished chain's result; a missing one is written again
    done = kit.coordinator(window=1)
    kit.register(done, "a")
    finish_chain(kit, done)
    state_store.save(done, tmp_path)
    final = tmp_path / state_store.FINAL_FILE
    written = final.read_bytes()
    final.write_bytes(written + b" ")  # what another version's writer might leave

    state_store.save(state_store.load(tmp_path, kit.config(window=1)), tmp_path)

    assert final.read_bytes() == written + b" "
    final.unlink()
    state_store.save(state_store.load(tmp_path, kit.config(window=1)), tmp_path)
    assert final.read_bytes() == written


@pytest.mark.parametrize(
    ("field", "declared", "bad"),
    [
        ("max_window", {"memory": 123, "max_window": 3}, -1),
        ("labels", {"labels": ("x", "y")}, ["x", "x"]),
    ],
)
def test_agents_saved_before_a_capability_existed_still_load(kit, tmp_path, field, declared, bad):
    c = kit.coordinator(start_layer=None, window=None)
    c.register("a", kit.caps(**declared), 7)
    state_store.save(c, tmp_path)
    path = tmp_path / STATE_FILE
    state = json.loads(path.read_text())
    del state["agents"]["a"]["capabilities"][field]  # as written before the field
    path.write_text(json.dumps(state))

    loaded = state_store.load(tmp_path, kit.config())

    undeclared = {k: v for k, v in declared.items() if k != field}
    assert loaded.agents["a"].capabilities == kit.caps(**undeclared) and loaded.labels == ()
    state["agents"]["a"]["capabilities"][field] = bad
    path.write_text(json.dumps(state))
    with pytest.raises(StateDirError, match=field):
        state_store.load(tmp_path, kit.config())


def test_class_names_survive_a_restart_and_name_the_final_head(kit, tmp_path):
    names = ("negative", "neutral", "positive")
    c = kit.coordinator(window=1)
    kit.register(c, "a", labels=names)
    state_store.save(c, tmp_path)
    kit.register(c, "b", labels=names)
    state_store.persist(c, tmp_path)
    assert list(json.loads((tmp_path / STATE_FILE).read_text())["agents"]) == ["a"]  # b: journal

    loaded = state_store.load(tmp_path, kit.config(window=1))

    assert loaded.labels == names
    assert loaded.agents["b"].capabilities == kit.caps(labels=names)
    with pytest.raises(UpdateRejectedError, match="numbers other classes"):
        loaded.register("c", kit.caps(labels=names[::-1]), 1)
    finish_chain(kit, loaded, ("a", "b"))
    state_store.save(loaded, tmp_path)
    final = load_adapter_file(tmp_path / state_store.FINAL_FILE)
    assert final.info["labels"] == list(names)


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"model_fingerprint": "0" * 64}, "model"),
        ({"num_layers": 6}, "model"),
        ({"task": "lm"}, "task"),
    ],
)
def test_state_of_another_model_or_task_is_refused(kit, tmp_path, change, what):
    c = mid_chain(kit)
    state_store.save(c, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    with pytest.raises(StateDirError) as info:
        state_store.load(tmp_path, kit.config(**change))

    message = str(info.value)
    assert str(tmp_path) in message and f"another {what}" in message
    key, value = next(iter(change.items()))
    assert key in message and repr(value) in message
    assert "--state-dir" in message  # says what to do
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_unreadable_state_is_refused(kit, tmp_path):
    c = mid_chain(kit)
    state_store.save(c, tmp_path)
    tensors = next(tmp_path.glob("tensors-*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(StateDirError, match="tensors unreadable"):
        state_store.load(tmp_path, kit.config())

    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(StateDirError, match="unreadable coordinator state"):
        state_store.load(tmp_path, kit.config())


def advance_one_round(kit, c, now):
    """Change everything that a save writes: a round closes, the chain moves on."""
    r = c.open_round
    for k, agent in enumerate(sorted(r.participants)):
        if agent not in r.updates:
            c.submit(agent, r.round_id, kit.metrics(0.1), kit.update(r.window, 3, 50 + k), now)
    c.tick(now + 1)


def failing_on(monkeypatch, target, name, should_fail):
    real = getattr(target, name)

    def fake(*args, **kwargs):
        if should_fail(*args):
            raise OSError(5, "Input/output error (simulated crash)")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, fake)


def nth_directory_fsync(n: int):
    """A predicate true for the n-th fsync of a folder it is asked about: a save makes its
    tensors file's rename durable, then state.json's."""
    seen = 0

    def is_nth(fd: int) -> bool:
        nonlocal seen
        if not os.path.isdir(f"/proc/self/fd/{fd}"):
            return False
        seen += 1
        return seen == n

    return is_nth


# (crash point, patch target, attribute, predicate on its arguments, state that survives)
CRASH_POINTS = [
    ("tensors file rename", os, "replace", lambda src, dst: "tensors-" in str(dst), "old"),
    ("state.json rename", os, "replace", lambda src, dst: str(dst).endswith(STATE_FILE), "old"),
    ("tensors directory fsync", os, "fsync", nth_directory_fsync(1), "old"),
    ("state directory fsync", os, "fsync", nth_directory_fsync(2), "new"),
    ("old tensors cleanup", Path, "unlink", lambda path, *a: "tensors-" in path.name, "new"),
]


@pytest.mark.parametrize(
    ("point", "target", "name", "should_fail", "survivor"),
    CRASH_POINTS,
    ids=[p[0] for p in CRASH_POINTS],
)
def test_crash_during_save_leaves_a_consistent_state(
    kit, tmp_path, monkeypatch, point, target, name, should_fail, survivor
):
    c = mid_chain(kit)
    state_store.save(c, tmp_path)
    old = state_of(c)
    advance_one_round(kit, c, 70_000)
    new = state_of(c)
    assert new["final"] != old["final"] and new["history"] != old["history"]

    with monkeypatch.context() as m:
        failing_on(m, target, name, should_fail)
        with pytest.raises(StateDirError, match="cannot write coordinator state"):
            state_store.save(c, tmp_path)

    resumed = state_store.load(tmp_path, kit.config())
    assert state_of(resumed) == (old if survivor == "old" else new)
    state_store.save(c, tmp_path)  # the next save cleans up whatever the crash left
    assert state_of(state_store.load(tmp_path, kit.config())) == new
    assert len(list(tmp_path.glob("tensors-*.safetensors"))) == 1
    assert list(tmp_path.glob(".*.tmp")) == []


def test_a_tensors_write_killed_midway_is_cleaned_up_by_the_next_save(kit, tmp_path):
    c = mid_chain(kit)
    state_store.save(c, tmp_path)
    leftover = tmp_path / ".tensors-000009-000009.safetensors.4242-0badf00d.tmp"
    leftover.write_bytes(b"half a tensors file")  # what a SIGKILL mid-write leaves
    advance_one_round(kit, c, 70_000)

    state_store.save(c, tmp_path)

    assert not leftover.exists()
    assert state_of(state_store.load(tmp_path, kit.config())) == state_of(c)


@contextlib.contextmanager
def read_only(directory: Path):
    """Make ``directory`` unwritable for this process (see the module docstring)."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
        try:
            yield
        finally:
            directory.chmod(0o700)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(directory)]).returncode != 0:
        pytest.skip("running as root without a usable chattr +i: cannot make a dir read-only")
    try:
        try:
            (directory / ".probe").touch()
        except OSError:
            pass
        else:
            pytest.skip("chattr +i did not make the directory read-only here")
        yield
    finally:
        subprocess.run([chattr, "-i", str(directory)], check=True)


def test_read_only_state_dir_is_refused_and_keeps_the_previous_state(kit, tmp_path):
    c = mid_chain(kit)
    state_store.save(c, tmp_path)
    old = state_of(c)
    advance_one_round(kit, c, 70_000)

    with read_only(tmp_path):
        with pytest.raises(StateDirError) as info:
            state_store.save(c, tmp_path)

    assert str(tmp_path) in str(info.value) and "cannot write" in str(info.value)
    assert state_of(state_store.load(tmp_path, kit.config())) == old


def test_state_dir_under_a_file_is_refused(kit, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    c = kit.coordinator()
    kit.register(c, "a")

    with pytest.raises(StateDirError) as info:
        state_store.save(c, blocker / "state")

    assert str(blocker / "state") in str(info.value)
    assert "cannot write coordinator state" in str(info.value)


def test_round_ids_only_grow_across_restarts(kit, tmp_path):
    """The open round (with an update in) is lost on restart; its id is never reused, so
    an update for it is stale and nothing is aggregated twice."""
    c = mid_chain(kit)
    lost = c.open_round
    assert lost.updates  # a half-collected round
    state_store.save(c, tmp_path)

    resumed = state_store.load(tmp_path, kit.config())
    resumed.tick(70_000)

    fresh = resumed.open_round
    seq = lambda rid: int(rid.lstrip("abcdefghijklmnopqrstuvwxyz"))  # noqa: E731
    assert seq(fresh.round_id) > seq(lost.round_id) and fresh.updates == {}
    late = kit.update(lost.window, lost.stage_layer, 3)
    with pytest.raises(UpdateRejectedError, match="not open") as info:
        resumed.submit("b", lost.round_id, kit.metrics(), late, 70_001)
    assert info.value.code == "failed_precondition"
    advance_one_round(kit, resumed, 70_002)
    ids = [r.round_id for r in resumed.history]
    assert len(ids) == len(set(ids)) and ids[:-1] == [r.round_id for r in c.history]

    state_store.save(resumed, tmp_path)
    again = state_store.load(tmp_path, kit.config())
    again.tick(80_000)
    assert seq(again.open_round.round_id) > seq(ids[-1])


def test_state_file_is_json_with_the_config(kit, tmp_path):
    c = mid_chain(kit)
    state_store.save(c, tmp_path)
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["config"]["model_fingerprint"] == kit.fingerprint
    assert (tmp_path / state["tensors_file"]).is_file()
    assert not list(tmp_path.glob(".*.tmp"))
