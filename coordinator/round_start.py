"""The tensors every agent of a round starts from: what an update's delta is measured against.

Clipping an update (``--clip-norm``, DP's ``--dp-clip``) scales its delta x − S, so the
coordinator must know the round's start S for every tensor an update carries. Most of S
is the coordinator's own window aggregate. The rest enters the window untrained and
starts, on every agent alike, from the shared seeded initialisation — the first round of
the chain (adapters, task head, GPO proxies) and the adapter of each layer that joins the
window at a new stage. Those starting values depend only on seeds, names and shapes, never
on data, so they are rebuilt here with the draws the agents make
(``chainfed.proto.seeded_init``: A from ``lora_seed``, the head and the proxies from
``seed``, the proxies drawn from the start layer up).

A tensor of any other name has no known start and raises ``AggregationError`` (clipping
would be meaningless). The rebuilt values are those drawn on CPU, in the update's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from chainfed.coordinator.aggregation import AggregationError
from chainfed.proto.messages import TrainingParams
from chainfed.proto.seeded_init import initial_head, initial_lora_a, initial_proxies
from chainfed.proto.tensor_names import parse_adapter_name, tensor_owner


def seeded_start(
    name: str,
    reference: torch.Tensor,
    params: TrainingParams,
    start_layer: int,
    num_layers: int,
) -> torch.Tensor:
    """The shared initial value of tensor ``name`` (shape and dtype of ``reference``)."""
    shape, dtype = tuple(reference.shape), reference.dtype
    adapter = parse_adapter_name(name)
    if adapter is not None:
        layer, module, which = adapter
        if which == "lora_b":
            return torch.zeros(shape, dtype=dtype)
        if len(shape) == 2:
            return initial_lora_a(params.lora_seed, layer, module, shape, dtype)
    if name == "objective.head.bias":
        return torch.zeros(shape, dtype=dtype)
    if name == "objective.head.weight" and len(shape) == 2:
        return initial_head(shape[1], shape[0], params.seed)[0].to(dtype)
    parts = name.split(".")
    kind, layer = tensor_owner(name)
    if kind == "foresight" and len(parts) == 4 and parts[2].isdigit():
        which = parts[3]
        if start_layer < layer < num_layers and which in ("down", "up") and len(shape) == 2:
            hidden, rank = (shape[1], shape[0]) if which == "down" else shape
            proxies = initial_proxies(hidden, rank, range(start_layer + 1, num_layers), params.seed)
            down, up = proxies[layer]
            return (down if which == "down" else up).to(dtype)
    raise AggregationError(f"tensor {name!r} has no known starting value to clip against")


def round_start_state(
    reference: Mapping[str, torch.Tensor],
    aggregate: Mapping[str, torch.Tensor],
    params: TrainingParams,
    start_layer: int,
    num_layers: int,
) -> dict[str, torch.Tensor]:
    """S for every tensor of ``reference`` (one update of the round): the coordinator's
    ``aggregate`` where it holds the name, the seeded initialisation otherwise."""
    return {
        name: aggregate[name]
        if name in aggregate
        else seeded_start(name, t, params, start_layer, num_layers)
        for name, t in reference.items()
    }
