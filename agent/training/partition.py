"""Splitting one corpus over N simulated devices: IID, label skew (Dirichlet) or by topic,
and an agent's shard of both splits (``--shard K/N --partition``)."""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence

import numpy as np

from chainfed.agent.errors import ChainFedError
from chainfed.agent.training.data import SplitData


def _check_parts(n: int, num_parts: int) -> None:
    if isinstance(num_parts, bool) or not isinstance(num_parts, int) or num_parts < 1:
        raise ValueError(f"num_parts must be a positive integer, got {num_parts!r}")
    if n < num_parts:
        raise ValueError(f"cannot split {n} items into {num_parts} non-empty parts")


def partition_iid(n: int, num_parts: int, seed: int) -> list[list[int]]:
    """Split ``range(n)`` into ``num_parts`` random parts whose sizes differ by at most 1.

    Every index is in exactly one part, no part is empty (needs ``n >= num_parts``), each
    part's indices are sorted; the result depends only on the arguments (and numpy's
    ``default_rng`` stream).
    """
    _check_parts(n, num_parts)
    perm = np.random.default_rng(seed).permutation(n)
    return [sorted(chunk.tolist()) for chunk in np.array_split(perm, num_parts)]


def partition_dirichlet(
    labels: Sequence[Hashable], num_parts: int, alpha: float, seed: int
) -> list[list[int]]:
    """Label-skewed split of example indices: class c's share per part ~ Dir(alpha).

    For each class (in sorted order) its indices are shuffled and cut in proportions
    drawn from a symmetric Dirichlet(alpha): small ``alpha`` (0.1) gives each part a few
    dominant classes, large ``alpha`` (100) is close to IID. Every index lands in exactly
    one part and each part's indices are sorted.

    The shares come from their own generator, drawn per class in sorted order, so they
    depend only on ``seed``, ``num_parts``, ``alpha`` and the set of classes, not on how
    many examples each class has: two splits of one corpus (train and validation)
    partitioned with the same seed give every part the same label mix, and an agent
    validates on the distribution it trains on.

    No part is empty: a draw can leave a part with nothing, so afterwards each empty part
    (in order) takes one random index from the currently largest part. With
    ``n >= num_parts`` the largest part then has at least 2 indices, so the donor never
    becomes empty; at most ``num_parts - 1`` indices move. Deterministic for a seed (and
    numpy version).
    """
    _check_parts(len(labels), num_parts)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    rng = np.random.default_rng(seed)
    share_rng = np.random.default_rng([seed, 1])
    by_class: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)

    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for label in sorted(by_class):  # type: ignore[type-var]
        idx = np.array(by_class[label])
        rng.shuffle(idx)
        share = share_rng.dirichlet(np.full(num_parts, float(alpha)))
        if not np.all(np.isfinite(share)) or share.sum() <= 0:  # underflow at tiny alpha
            share = np.eye(num_parts)[share_rng.integers(num_parts)]
        cuts = np.clip((np.cumsum(share)[:-1] * len(idx)).astype(np.int64), 0, len(idx))
        for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
            part.extend(chunk.tolist())

    for part in parts:
        if not part:
            donor = max(parts, key=len)
            part.append(donor.pop(int(rng.integers(len(donor)))))
    return [sorted(part) for part in parts]


def label_skew(parts: Sequence[Sequence[Hashable]]) -> float:
    """How far the parts' label mixes are from the pooled mix: each part's total-variation
    distance to the pool's label distribution, averaged with the parts' sizes as weights
    (FedAvg's weights). 0 when every part holds the pool's mix; it nears 1 when the large
    parts each hold labels the others lack. Two Dirichlet draws of one alpha can differ
    a lot in it, and a federation's accuracy with them, so a comparison across seeds or
    against another framework's draw should state it."""
    sizes = np.array([len(p) for p in parts], dtype=np.float64)
    if sizes.sum() == 0:
        raise ValueError("label skew of parts holding no labels")
    classes = sorted({label for part in parts for label in part}, key=repr)
    index = {label: i for i, label in enumerate(classes)}
    counts = np.zeros((len(parts), len(classes)))
    for row, part in zip(counts, parts, strict=True):
        for label in part:
            row[index[label]] += 1
    pooled = counts.sum(axis=0) / sizes.sum()
    mixes = counts / np.maximum(sizes, 1)[:, None]
    distances = 0.5 * np.abs(mixes - pooled).sum(axis=1)
    return float(sizes @ distances / sizes.sum())


TOPICS = ("airline", "self_driving", "apple", "other")


_TOPIC_PATTERNS = {
    "airline": re.compile(
        r"@(united|americanair|usairways|southwestair|jetblue|virginamerica|delta|alaskaair)\b"
        r"|\b(flights?|airlines?|airways|planes?|airport|luggage|baggage)\b",
        re.IGNORECASE,
    ),
    "self_driving": re.compile(
        r"\b(driverless|self[- ]?driving|autonomous|robo-?cars?|google car)", re.IGNORECASE
    ),
    "apple": re.compile(
        r"@apple\b|\b(apple|iphones?|ipads?|ipods?|macbooks?|itunes|ios|siri)\b", re.IGNORECASE
    ),
}


def topic_of(text: str) -> str:
    """Keyword topic of a tweet: the first of ``airline``, ``self_driving``, ``apple``
    whose keywords occur in it, else ``other``."""
    for topic, pattern in _TOPIC_PATTERNS.items():
        if pattern.search(text):
            return topic
    return "other"


def partition_by_topic(texts: Sequence[str]) -> dict[str, list[int]]:
    """Indices grouped by :func:`topic_of`, in ``TOPICS`` order; topics with no text are
    left out, so every part is non-empty and every index is in exactly one part."""
    groups: dict[str, list[int]] = {topic: [] for topic in TOPICS}
    for i, text in enumerate(texts):
        groups[topic_of(text)].append(i)
    return {topic: idx for topic, idx in groups.items() if idx}


def topic_shards(texts: Sequence[str], num_parts: int, seed: int) -> list[list[int]]:
    """Indices of ``num_parts`` shards that differ in topic. Up to one shard per topic,
    shard i holds the topics ``TOPICS[i::num_parts]`` (all of them between the shards);
    with more shards than topics, shard i holds topic ``TOPICS[i % len(TOPICS)]`` and the
    shards of one topic split its rows at random (seeded), sizes within one. Topics go to
    shards by name, so both splits of a corpus are divided the same way; a topic with no
    rows leaves its shards empty."""
    groups = partition_by_topic(texts)
    if num_parts <= len(TOPICS):
        return [
            sum((groups.get(t, []) for t in TOPICS[i::num_parts]), []) for i in range(num_parts)
        ]
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for j, topic in enumerate(TOPICS):
        holders = range(j, num_parts, len(TOPICS))
        rows = groups.get(topic, [])
        if len(rows) < len(holders):
            continue
        shares = partition_iid(len(rows), len(holders), seed + j)
        for holder, share in zip(holders, shares, strict=True):
            parts[holder] = [rows[i] for i in share]
    return parts


def shard_of(data: SplitData, shard: str, partition: str, seed: int) -> SplitData:
    """Part K of N of both splits, by ``partition`` (same rule for train and validation)."""
    try:
        k, n = (int(x) for x in shard.split("/"))
    except ValueError as exc:
        raise ChainFedError(f"--shard must look like K/N, got {shard!r}") from exc
    if not 0 <= k < n:
        raise ChainFedError(f"--shard {shard}: K must be in 0..N-1")

    def part(examples: list) -> list:
        if partition == "iid":
            parts = partition_iid(len(examples), n, seed)
        elif partition.startswith("dirichlet:"):
            alpha = float(partition.split(":", 1)[1])
            parts = partition_dirichlet([e.label for e in examples], n, alpha, seed)
        elif partition == "by-topic":
            # the same rule for both splits, so a shard validates on the topics it trains on
            parts = topic_shards([getattr(e, "text", "") for e in examples], n, seed)
        else:
            raise ChainFedError(
                f"--partition must be iid, dirichlet:ALPHA or by-topic; got {partition!r}"
            )
        if not parts[k]:
            raise ChainFedError(f"--shard {shard} ({partition}) holds no rows of this split")
        return [examples[i] for i in sorted(parts[k])]

    data.train, data.val = part(data.train), part(data.val)
    return data
