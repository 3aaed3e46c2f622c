"""The grammar of the tensor names both ends exchange and save.

::

    layers.{i}.{module}.lora_a      adapter of layer i's linear ``module``: A (r, in)
    layers.{i}.{module}.lora_b                                             B (out, r)
    objective.head.weight|bias      classification head (trained with the window)
    foresight.proxies.{j}.down|up   GPO proxy of a later layer j
    final.* / window.* / ...        a prefix naming which set a tensor belongs to

Parsing lives here so that no module splits a name by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")

LORA_A_SUFFIX = ".lora_a"
"""Name suffix of an adapter's down projection A (r, in)."""
LORA_B_SUFFIX = ".lora_b"
"""Name suffix of an adapter's up projection B (out, r)."""


def adapter_name(layer: int, module: str, which: str) -> str:
    """``layers.{layer}.{module}.{which}`` (``which``: ``lora_a`` or ``lora_b``)."""
    return f"layers.{layer}.{module}.{which}"


def parse_adapter_name(name: str) -> tuple[int, str, str] | None:
    """(layer, module, ``lora_a``/``lora_b``) of an adapter tensor's name; None for any
    other name."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "layers" and parts[1].isdigit():
        if parts[3] in ("lora_a", "lora_b"):
            return int(parts[1]), parts[2], parts[3]
    return None


def without_lora_a(tensors: Mapping[str, T]) -> dict[str, T]:
    """``tensors`` less every ``*.lora_a``: what travels when A is frozen at its seeded init."""
    return {name: t for name, t in tensors.items() if not name.endswith(LORA_A_SUFFIX)}


def strip_prefix(tensors: Mapping[str, T], prefix: str) -> dict[str, T]:
    """The tensors whose names start with ``prefix``, under the rest of their names."""
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def tensor_owner(name: str) -> tuple[str, int]:
    """("layers", i) for ``layers.i.*``, ("foresight", j) for a proxy of layer j,
    ("objective", -1) for the head; anything else ("other", -1)."""
    parts = name.split(".")
    if parts[0] == "layers" and len(parts) > 2 and parts[1].isdigit():
        return "layers", int(parts[1])
    if parts[0] == "foresight":
        digits = [p for p in parts[1:] if p.isdigit()]
        return "foresight", int(digits[0]) if digits else -1
    if parts[0] == "objective":
        return "objective", -1
    return "other", -1


def layers_of(names: Iterable[str]) -> set[int]:
    """The layers that ``layers.{i}.*`` names belong to."""
    return {index for kind, index in map(tensor_owner, names) if kind == "layers"}
