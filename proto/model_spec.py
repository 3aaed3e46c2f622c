"""``ModelSpec``: what the coordinator needs to know of the model, without opening it.

The coordinator runs on a box without the training stack (DESIGN.md §1): it never reads
weights or tokenizers. An agent-side command builds this from the model folder
(``StreamingModel.spec()``) and hands it over in process, or as a JSON file for
``python -m chainfed.coordinator --model-spec FILE``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chainfed.proto.durable_file import write_text_durably
from chainfed.proto.errors import ChainFedError

FAMILIES = ("bert", "llama")


class ModelSpecError(ChainFedError):
    """A model spec file that cannot be read or does not describe a model."""


@dataclass(frozen=True)
class ModelSpec:
    """The model facts a federation is configured from."""

    num_layers: int
    """Transformer blocks L."""
    family: str
    """``bert`` or ``llama``: picks the default GPO λ."""
    fingerprint: str
    """Digest of the model files (config and weights); every agent must present the same."""
    lora_in_features: dict[str, int] = field(default_factory=dict)
    """In features of each linear of a block by module name: the width of its adapter's A,
    so a frozen A can be rebuilt from the seed alone."""

    def __post_init__(self) -> None:
        if not (isinstance(self.num_layers, int) and self.num_layers >= 1):
            raise ModelSpecError(f"num_layers must be a positive integer, got {self.num_layers!r}")
        if self.family not in FAMILIES:
            raise ModelSpecError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if not (isinstance(self.fingerprint, str) and self.fingerprint):
            raise ModelSpecError("fingerprint must be a non-empty string")
        widths = self.lora_in_features
        if not isinstance(widths, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and v >= 1 for k, v in widths.items()
        ):
            raise ModelSpecError(
                f"lora_in_features must map module names to positive widths, got {widths!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: Path) -> Path:
        """Write the spec as JSON, whole or not at all; returns ``path``."""
        return write_text_durably(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> ModelSpec:
        """The spec in JSON file ``path``; ``ModelSpecError`` naming the file and the
        problem for a missing, unreadable or malformed one."""
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ModelSpecError(f"{path}: cannot read the model spec ({exc})") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelSpecError(f"{path}: not a JSON model spec ({exc})") from exc
        if not isinstance(data, dict):
            raise ModelSpecError(f"{path}: a model spec is a JSON object")
        unknown = sorted(set(data) - {f for f in cls.__dataclass_fields__})
        missing = sorted({"num_layers", "family", "fingerprint"} - set(data))
        if unknown or missing:
            raise ModelSpecError(f"{path}: unknown fields {unknown}, missing fields {missing}")
        try:
            return cls(**data)
        except ModelSpecError as exc:
            raise ModelSpecError(f"{path}: {exc}") from exc
