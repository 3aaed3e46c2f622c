"""The trained result on disk: adapters + task head in one safetensors file.

Tensor names: ``layers.{i}.{module}.lora_a|lora_b`` for adapters, ``head.*`` for a
classification head. The safetensors metadata holds one JSON entry, ``chainfed``, with
everything needed to use the file again: task, labels, LoRA shape, pooling, label token
ids and the fingerprint of the base model it was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from chainfed.proto.durable_file import replace_durably
from chainfed.proto.errors import ChainFedError

METADATA_KEY = "chainfed"


class AdapterFileError(ChainFedError):
    """An adapter file is missing, corrupt, or not for this model/task."""


@dataclass
class AdapterFile:
    """Tensors plus the JSON description of how they were trained."""

    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]

    def adapters(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if k.startswith("layers.")}

    def head(self) -> dict[str, torch.Tensor]:
        return {
            k.removeprefix("head."): v for k, v in self.tensors.items() if k.startswith("head.")
        }


@dataclass(frozen=True)
class AdapterInfo:
    """The metadata of a result file (trained adapters, and the head for ``classify``):
    how the tensors were trained and how to use them again. Written by ``chainfed train``,
    by every agent at the end of a federation and by the coordinator; read back with its
    types checked by ``from_dict``, whoever wrote it."""

    task: str
    """``classify`` or ``lm``."""
    model_digest: str
    """Fingerprint of the base model the adapters were trained on."""
    mode: str = "chain"
    """``chain`` or the baseline that trained them (``e2e``, ``topk``, ``head``)."""
    lora: dict[str, Any] | None = None
    """``LoRAConfig`` fields (rank, alpha, dropout, targets, train_a, seed)."""
    labels: list[str] | None = None
    """Class names (classify) or the label words (lm), in index order."""
    label_token_ids: list[int] | None = None
    """lm: the first token of each label's response, what accuracy ranks."""
    pooling: str | None = None
    """classify: ``mean`` or ``last``."""
    max_len: int | None = None
    """Tokens per sample in training."""
    eval_batch: int | None = None
    """Batch of the evaluation that produced the recorded figures (same sums, same bits)."""
    prompt_template: str | None = None
    response_template: str | None = None
    start_layer: int | None = None
    """A federation's: where its chain started."""
    rounds: int | None = None
    """A federation's: rounds run."""
    stop_reason: str | None = None
    """A federation's: why it stopped before training every layer ("" when it did not)."""
    dp_epsilon: float | None = None
    dp_delta: float | None = None

    RESULT: ClassVar[tuple[str, ...]] = (
        "task",
        "model_digest",
        "mode",
        "lora",
        "labels",
        "label_token_ids",
        "pooling",
    )
    """What an agent records of the federation's result for its own data."""
    TRAINING_RUN: ClassVar[tuple[str, ...]] = (
        *RESULT,
        "max_len",
        "eval_batch",
        "prompt_template",
        "response_template",
    )
    """What ``chainfed train`` records: also how to evaluate the file again."""
    FEDERATION: ClassVar[tuple[str, ...]] = (
        "task",
        "model_digest",
        "mode",
        "lora",
        "labels",
        "start_layer",
        "rounds",
        "stop_reason",
        "dp_epsilon",
        "dp_delta",
    )
    """What the coordinator records: how the chain ran, the agents' class names, its
    privacy spent."""

    def to_dict(self, recorded: tuple[str, ...] = RESULT) -> dict[str, Any]:
        """The JSON object saved in the file's metadata: the ``recorded`` fields, null
        where unknown, so a writer's files always carry the same keys."""
        return {name: getattr(self, name) for name in recorded}

    def lora_settings(self, path: Path) -> dict[str, Any]:
        """``lora``, which every result file needs; ``AdapterFileError`` naming the file
        when it has none."""
        if self.lora is None:
            raise AdapterFileError(f"{path}: missing or invalid 'lora' metadata (none)")
        return self.lora

    @classmethod
    def from_dict(cls, info: dict[str, Any], path: Path) -> AdapterInfo:
        """The typed metadata of the file at ``path``; ``AdapterFileError`` naming the file
        and the field for a value of the wrong kind. Keys it does not know are ignored."""
        if info.get("task") not in ("classify", "lm"):
            raise AdapterFileError(f"{path}: unknown task {info.get('task')!r} in its metadata")
        values = {f.name: info.get(f.name) for f in fields(cls) if f.name in info}
        for name, check, what in _INFO_CHECKS:
            value = values.get(name)
            if value is not None and not check(value):
                raise AdapterFileError(f"{path}: '{name}' metadata must be {what}, not {value!r}")
        return cls(**{"model_digest": "", **values})


def _is_int(value: Any) -> bool:
    return type(value) is int


_INFO_CHECKS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("model_digest", lambda v: isinstance(v, str), "a string"),
    ("mode", lambda v: isinstance(v, str), "a string"),
    ("lora", lambda v: isinstance(v, dict), "an object of LoRA settings"),
    (
        "labels",
        lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
        "a list of names",
    ),
    ("label_token_ids", lambda v: isinstance(v, list) and all(map(_is_int, v)), "a list of ids"),
    ("pooling", lambda v: isinstance(v, str), "a string"),
    ("max_len", lambda v: _is_int(v) and v >= 1, "a positive integer"),
    ("eval_batch", lambda v: _is_int(v) and v >= 1, "a positive integer"),
    ("prompt_template", lambda v: isinstance(v, str), "a string"),
    ("response_template", lambda v: isinstance(v, str), "a string"),
    ("start_layer", _is_int, "an integer"),
    ("rounds", _is_int, "an integer"),
    ("stop_reason", lambda v: isinstance(v, str), "a string"),
    ("dp_epsilon", lambda v: isinstance(v, int | float), "a number"),
    ("dp_delta", lambda v: isinstance(v, int | float), "a number"),
)
"""Per field of ``AdapterInfo``: (name, the check a present, non-null value passes, what
it must be)."""


def save_adapter_file(path: Path, result: AdapterFile) -> Path:
    """Write ``result`` whole or not at all (``replace_durably``)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in result.tensors.items()}
    metadata = {METADATA_KEY: json.dumps(result.info, sort_keys=True)}
    return replace_durably(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_adapter_file(path: Path) -> AdapterFile:
    """Read a file written by ``save_adapter_file``; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: adapter file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name).clone() for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    if METADATA_KEY not in metadata:
        raise AdapterFileError(f"{path}: no '{METADATA_KEY}' metadata; not a ChainFed adapter file")
    try:
        info = json.loads(metadata[METADATA_KEY])
    except ValueError as exc:
        raise AdapterFileError(f"{path}: corrupt '{METADATA_KEY}' metadata: {exc}") from exc
    if not isinstance(info, dict):
        raise AdapterFileError(
            f"{path}: '{METADATA_KEY}' metadata is a JSON {type(info).__name__}, not an object"
        )
    return AdapterFile(tensors, info)
