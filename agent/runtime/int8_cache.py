"""The int8 copy of a model's frozen block weights, quantised once and kept next to the model.

``--weights int8`` stores every block's linear weights as int8 with one float32 scale per
output channel (``chainfed.kernels.int8.quantize_int8``). Quantising is done once, locally
(never by a server), the first time a model is opened with int8 weights, and the result is
written beside the checkpoint::

    model_dir/model.safetensors ──(block by block, quantise)──> model_dir/chainfed-int8.safetensors
        layers.{i}.{module}.weight        int8    (d_out, d_in)
        layers.{i}.{module}.weight_scale  float32 (d_out,)
        __metadata__: chainfed_int8 = version, model_fingerprint, data_digest

Guarantees. The file is written whole or not at all (``replace_durably``), so a crash never
leaves a half file under the real name. On every open it is checked before any tensor is
used: a file made from other model files (``model_fingerprint`` differs: the checkpoint
changed) is rebuilt; a file whose header, version, tensor names, shapes or dtypes are wrong,
or whose data no longer hash to ``data_digest``, is refused with a ``ModelLoadError`` that
names it (delete it and it is rebuilt). Building holds one block's weights at a time.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from chainfed.agent.errors import ModelLoadError
from chainfed.agent.runtime.checkpoint import Checkpoint
from chainfed.agent.runtime.safetensors_io import (
    data_start,
    header_bytes,
    read_header,
    read_metadata,
)
from chainfed.kernels import quantize_int8
from chainfed.proto.durable_file import replace_durably

CACHE_FILE = "chainfed-int8.safetensors"
"""Name of the cache file inside the model folder."""
VERSION = "1"
"""Format version (``__metadata__["chainfed_int8"]``): symmetric absmax per output channel."""

_CHUNK = 1 << 22
_NO_DIGEST = "0" * 32  # placeholder of the digest's length while the data are written

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantisedLinear:
    """One frozen linear weight of a block that the cache holds in int8."""

    layer: int
    module: str
    """The block's child name (``q_proj``, ``down_proj``, ...)."""
    source: str
    """Its weight's tensor name in the checkpoint."""
    shape: tuple[int, int]
    """(d_out, d_in)."""

    def names(self) -> tuple[str, str]:
        """Cache tensor names of the int8 weight and of its scales."""
        return cache_names(self.layer, self.module)


def cache_names(layer: int, module: str) -> tuple[str, str]:
    """Cache tensor names of block ``layer``'s ``module`` weight (int8) and its scales."""
    return f"layers.{layer}.{module}.weight", f"layers.{layer}.{module}.weight_scale"


class Int8WeightCache:
    """The checked int8 cache of one model folder (see the module docstring)."""

    def __init__(
        self,
        model_dir: Path,
        fingerprint: str,
        linears: Sequence[QuantisedLinear],
        checkpoint: Checkpoint,
    ) -> None:
        self.path = Path(model_dir) / CACHE_FILE
        self.fingerprint = fingerprint
        self.linears = list(linears)
        self.layers = {linear.layer for linear in self.linears}
        """The blocks the cache holds."""
        if not self.path.exists():
            self._build(checkpoint)
        elif self._metadata_or_corrupt().get("model_fingerprint") != fingerprint:
            log.warning("%s: made from other model files; quantising again", self.path)
            self._build(checkpoint)
        self._check()

    def _metadata_or_corrupt(self) -> dict[str, str]:
        try:
            return read_metadata(self.path)
        except ModelLoadError as exc:
            raise self._corrupt(str(exc.__cause__ or exc)) from exc

    def _planned(self) -> list[tuple[str, str, tuple[int, ...]]]:
        planned: list[tuple[str, str, tuple[int, ...]]] = []
        for linear in self.linears:
            weight, scale = linear.names()
            planned += [(weight, "I8", linear.shape), (scale, "F32", (linear.shape[0],))]
        return planned

    def _metadata(self, digest: str) -> dict[str, str]:
        return {
            "chainfed_int8": VERSION,
            "model_fingerprint": self.fingerprint,
            "data_digest": digest,
        }

    def _build(self, checkpoint: Checkpoint) -> None:
        """Quantise every planned weight, one block at a time, into a new file."""
        planned = self._planned()
        by_layer: dict[int, list[QuantisedLinear]] = {}
        for linear in self.linears:
            by_layer.setdefault(linear.layer, []).append(linear)

        def write(tmp: Path) -> None:
            with tmp.open("wb") as out:
                out.write(header_bytes(planned, self._metadata(_NO_DIGEST)))
                digest = hashlib.blake2b(digest_size=16)
                for linears in by_layer.values():  # insertion order = planned order
                    weights = checkpoint.load({q.source: q.shape for q in linears})
                    for linear in linears:
                        q, scale = quantize_int8(weights.pop(linear.source))
                        for tensor in (q, scale):
                            data = tensor.contiguous().numpy().tobytes()
                            digest.update(data)
                            out.write(data)
                out.seek(0)  # the digest has the placeholder's width: same header length
                out.write(header_bytes(planned, self._metadata(digest.hexdigest())))

        try:
            replace_durably(self.path, write)
        except OSError as exc:
            raise ModelLoadError(
                f"{self.path}: cannot write the int8 weight cache next to the model ({exc})"
            ) from exc

    def _corrupt(self, reason: str) -> ModelLoadError:
        return ModelLoadError(
            f"{self.path}: corrupt int8 weight cache ({reason}); delete it and it is "
            "quantised again from the model on next use"
        )

    def _check(self) -> None:
        """Version, digest of the data, then every planned tensor's name, dtype and shape."""
        metadata = self._metadata_or_corrupt()
        try:
            stored = read_header(self.path)
        except ModelLoadError as exc:
            raise self._corrupt(str(exc.__cause__ or exc)) from exc
        if metadata.get("chainfed_int8") != VERSION:
            raise self._corrupt(f"format version {metadata.get('chainfed_int8')!r}, not {VERSION}")
        if metadata.get("model_fingerprint") != self.fingerprint:
            raise self._corrupt("it was replaced while being opened")
        digest = hashlib.blake2b(digest_size=16)
        with self.path.open("rb") as handle:
            handle.seek(data_start(self.path))
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != metadata.get("data_digest"):
            raise self._corrupt("its data do not hash to the digest its header records")
        for name, code, shape in self._planned():
            found = stored.get(name)
            if found is None or found.dtype != code or found.shape != shape:
                got = None if found is None else f"{found.dtype} {list(found.shape)}"
                raise self._corrupt(f"tensor {name!r} is {got}, expected {code} {list(shape)}")

    def load(
        self, layer: int, modules: Sequence[str], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """``{module.weight: int8, module.weight_scale: float32}`` of block ``layer`` on
        ``device``, for the named linear children."""
        out: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                for module in modules:
                    weight, scale = cache_names(layer, module)
                    out[f"{module}.weight"] = handle.get_tensor(weight).to(device)
                    out[f"{module}.weight_scale"] = handle.get_tensor(scale).to(device)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise self._corrupt(f"cannot read layer {layer}: {exc}") from exc
        return out
