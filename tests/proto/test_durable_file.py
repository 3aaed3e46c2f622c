"""A durable write replaces the file whole, and a failed one leaves the previous file."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

import pytest

from chainfed.proto.durable_file import (
    leftover_temporaries,
    replace_durably,
    write_text_durably,
)


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


def test_a_binary_writer_replaces_the_file_and_its_error_keeps_the_previous(tmp_path):
    path = tmp_path / "adapters.safetensors"
    replace_durably(path, lambda tmp: tmp.write_bytes(b"first"))

    def fail_midway(tmp):
        tmp.write_bytes(b"half of the sec")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        replace_durably(path, fail_midway)

    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["adapters.safetensors"]


def _write_then_get_killed(path):
    def write(tmp):
        tmp.write_bytes(b"half of the new file")
        os.kill(os.getpid(), signal.SIGKILL)

    replace_durably(path, write)


def test_a_write_killed_midway_leaves_the_target_and_a_findable_temporary(tmp_path):
    path = tmp_path / "tensors-000001-000002.safetensors"
    write_text_durably(path, "whole")
    child = multiprocessing.get_context("fork").Process(target=_write_then_get_killed, args=(path,))
    child.start()
    child.join()

    assert child.exitcode == -signal.SIGKILL
    assert path.read_text() == "whole"
    leftovers = leftover_temporaries(tmp_path, "tensors-*.safetensors")
    assert len(leftovers) == 1 and leftovers[0].read_bytes() == b"half of the new file"
    assert leftover_temporaries(tmp_path, "other-*.safetensors") == []
