"""A durable write replaces the file whole, and a failed one leaves the previous file."""

from __future__ import annotations

import threading

import pytest

from chainfed.proto.durable_file import write_text_durably


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "new" / "run.json"

    assert write_text_durably(path, "first") == path
    write_text_durably(path, "second")

    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.json"]


def test_a_failed_write_keeps_the_previous_file_whole(tmp_path):
    path = tmp_path / "run.json"
    write_text_durably(path, '{"settings": 1}')

    with pytest.raises(UnicodeEncodeError):
        write_text_durably(path, '{"settings": 2, "x": "' + "a" * 100_000 + '\ud800"}')

    assert path.read_text() == '{"settings": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_writers_racing_on_one_file_leave_one_of_their_texts(tmp_path):
    path = tmp_path / "accuracy.json"
    texts = [str(i) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=write_text_durably, args=(path, t)) for t in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert path.read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["accuracy.json"]
