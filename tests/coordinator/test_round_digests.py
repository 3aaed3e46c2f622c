"""Every aggregated round records the digest of each update it took, once.

The round history's ``update_digests`` is how the load benchmark and the fault-injection
tests check that each accepted update was aggregated exactly once.
"""

from chainfed.coordinator import state_store
from chainfed.proto import serde
from chainfed.proto.update_digest import update_digest


def test_aggregated_rounds_record_each_update_digest(kit, tmp_path):
    c = kit.coordinator(min_rounds=2, max_rounds=2)
    kit.register(c, "a", "b", "c")
    sent = kit.train_round(c, 10, seed=1)
    sent2 = kit.train_round(c, 20, seed=2)

    first, second = c.history
    assert first.participants == ("a", "b", "c")
    assert first.update_digests == tuple(update_digest(sent[a][1]) for a in first.participants)
    assert second.update_digests == tuple(update_digest(sent2[a][1]) for a in "abc")
    assert not set(first.update_digests) & set(second.update_digests)

    wire = serde.status_snapshot_from_proto(serde.status_snapshot_to_proto(c.snapshot()))
    assert wire.history == tuple(c.history)
    state_store.save(c, tmp_path)
    assert state_store.load(tmp_path, c.config).history == c.history


def test_a_duplicate_submission_does_not_replace_the_recorded_digest(kit):
    c = kit.coordinator()
    kit.register(c, "a", "b")
    c.tick(0)
    r = c.open_round
    task = c.next_task("a", 1)
    original = kit.update(task.window_layers, task.stage_layer, seed=1)
    assert c.submit("a", r.round_id, kit.metrics(), original, 2)
    retry = kit.update(task.window_layers, task.stage_layer, seed=2)
    assert not c.submit("a", r.round_id, kit.metrics(), retry, 3)
    c.next_task("b", 4)
    c.submit("b", r.round_id, kit.metrics(), kit.update(task.window_layers, 0, seed=3), 5)
    assert c.history[-1].update_digests[0] == update_digest(original)
