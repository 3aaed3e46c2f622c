"""A content digest of one update, identical on the sending and the receiving side.

The coordinator records the digest of every update it aggregates in the round's
``RoundRecord.update_digests`` (aligned with ``participants``); an agent that computes
the digest of what it sent can then check that its update went into exactly one
aggregate, and which one (``benchmarks/load.py``, the fault-injection tests).

Digest: hex SHA-256 over the tensors in name order, each as its name, wire dtype,
shape and wire bytes (``chainfed.proto.tensor_chunks``: little-endian, C order),
with lengths so that no two different updates hash the same byte stream. Two updates
with the same digest carry bit-identical tensors under the same names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch

from chainfed.proto.tensor_chunks import TensorSpec


def update_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 of ``tensors`` (see the module docstring); order of the mapping is ignored."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        spec = TensorSpec.of(name, tensor)
        header = f"{name}\0{spec.dtype}\0{','.join(map(str, spec.shape))}\0{spec.total_bytes}\0"
        digest.update(len(header).to_bytes(8, "little"))
        digest.update(header.encode())
        t = tensor.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        array = t.numpy()
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    return digest.hexdigest()
