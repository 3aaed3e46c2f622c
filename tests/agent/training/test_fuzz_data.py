"""Fuzzing the data loader: random and mutated CSV / JSONL files.

Each example writes a small file (≤ 2 KB) and loads it as ``classify`` and as ``lm``,
strictly and with ``skip_undecodable``. The outcome is either ``DataError`` with a
message naming the file, or a split whose counts add up: every row read is usable or
counted under one bad-row reason, and train + validation pools hold every usable row.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from chainfed.agent.errors import DataError
from chainfed.agent.training.data import BAD_ROW_REASONS, DataConfig, load_dataset

FUZZ = settings.get_profile("fuzz")  # tests/conftest.py

VALID_CSV = (
    "text,label\n"
    'good flight,pos\n"late, again",neg\n"said ""ok""",neu\nfine,pos\n\n'
    "bad seat,neg\ncafé crème,neu\n"
).encode()
VALID_JSONL = "\n".join(
    json.dumps(row)
    for row in [
        {"text": "good flight", "label": "pos"},
        {"text": "late again", "label": "neg"},
        {"text": "ok", "label": 1},
        {"text": "café", "label": "neu"},
        {"text": "fine", "label": "pos", "extra": [1, {"a": None}]},
    ]
).encode()


def write_new(path: Path, data: bytes) -> None:
    """Write ``data`` as a new file: rewriting a file in place makes ext4 flush it to
    disk (auto_da_alloc), about 3 ms an example; a fresh inode costs microseconds."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-data")


def configs(path: Path) -> list[DataConfig]:
    return [
        DataConfig(path, task="classify"),
        DataConfig(path, task="classify", labels=("neg", "neu", "pos"), skip_undecodable=True),
        DataConfig(
            path, task="lm", label_field="label", encoding="latin-1", train_rows=2, val_rows=1
        ),
        DataConfig(path, task="lm", label_field=None, response_template=" {label}!"),
    ]


def check(path: Path, data: bytes) -> None:
    write_new(path, data)
    for config in configs(path):
        try:
            split = load_dataset(config)
        except DataError as exc:
            assert str(path) in str(exc), str(exc)
            continue
        assert set(split.bad_rows) <= set(BAD_ROW_REASONS)
        usable = split.rows_read - split.num_bad
        assert usable >= 2 and split.train_available + split.val_available == usable
        assert len(split.train) <= split.train_available and len(split.val) >= 1
        split.summary()


MUTATIONS = {
    "kinds": ("flip", "insert", "delete", "special"),
    "max_edits": 5,
    "max_insert": 8,
    "max_delete": 8,
    "specials": [b'"', b",", b"\n", b"\r", b"\x00", b"\xff", b"{", b"[", b"\xef\xbb\xbf"],
}
"""Edits of a valid file for ``byte_mutations``: ``specials`` are bytes a CSV or JSON reader
gives a meaning to (quote, comma, line ends, NUL, invalid UTF-8, brackets, a BOM)."""

TEXT_LINES = st.lists(
    st.one_of(
        st.text(max_size=40),
        st.sampled_from(
            ['{"text": "a", "label": "pos"}', '"unterminated', "a,b,c,d", "[]", "null"]
        ),
    ),
    max_size=12,
).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
@FUZZ
@given(data=st.one_of(st.binary(max_size=400), TEXT_LINES))
@example(data=b"[" * 5000 + b"\n" + VALID_JSONL)  # was RecursionError (deep nesting)
@example(data=b'{"text": "x", "label": ' + b"1" * 5000 + b"}\n" + VALID_JSONL)  # int > 4300 digits
@example(data=b"text,label\n" + b"x" * 140_000 + b",pos\n")  # CSV field over csv's limit
def test_random_files(folder, suffix, data):
    check(folder / f"random{suffix}", data)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
@FUZZ
@given(data=st.data())
def test_mutated_valid_files(folder, suffix, byte_mutations, data):
    valid = VALID_CSV if suffix == ".csv" else VALID_JSONL
    mutated = byte_mutations(valid, **MUTATIONS)
    check(folder / f"mutated{suffix}", data.draw(mutated))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_the_valid_files_load(folder, suffix):
    path = folder / f"valid{suffix}"
    path.write_bytes(VALID_CSV if suffix == ".csv" else VALID_JSONL)
    split = load_dataset(DataConfig(path, task="classify"))
    assert split.num_bad == 0 and split.rows_read == (6 if suffix == ".csv" else 5)
