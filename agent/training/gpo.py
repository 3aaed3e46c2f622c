"""Globally Perceptive Optimization: foresight of the layers above the window (DESIGN.md §3).

Two ways to give the window a view of the rest of the network for the global loss:

* ``ProxyBranch`` (``proxy``): one low-rank residual per later layer j,
  h <- h + B_j · gelu(A_j · rmsnorm(h)), B_j zero-initialised so the branch starts as the
  identity. Trained and aggregated with the window; no later base weights are loaded.
  A layer's proxy retires when the chain reaches that layer.
* ``ExactForesight`` (``exact:k``): the next k frozen base blocks, each loaded from disk
  in forward, run without keeping activations, and loaded again in backward to recompute
  them; the model's ``BlockLoader`` reads each one while the block before it computes.
  ``exact:all`` gives the true end-to-end gradient for the window at about two blocks'
  weights (the one computing, the one being read) plus one block's activations.

Precision: proxies are float32 master weights on the model's device (drawn on the CPU by
``initial_proxies``, then moved); they compute in the dtype of the hidden states they get
(cast inside, as ``lora_linear`` does), with the RMS norm taken in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from chainfed.agent.runtime.attention import AttentionContext
from chainfed.agent.runtime.model import StreamingModel
from chainfed.proto.seeded_init import initial_proxies


class ResidualProxy(nn.Module):
    """h + B · gelu(A · rmsnorm(h)); A is ``down`` (r, d), B is ``up`` (d, r)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor) -> None:
        super().__init__()
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(up)

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """gelu(A · rmsnorm(h)), (B, T, r), in ``h``'s dtype."""
        h32 = h.float()
        normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype)
        return nn.functional.gelu(normed @ self.down.to(h.dtype).T)

    def lift(self, gate: torch.Tensor) -> torch.Tensor:
        """B · gate, (B, T, d), in the gate's dtype."""
        return gate @ self.up.to(gate.dtype).T

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.lift(self.gate(h))  # (B, T, d)


class ProxyBranch(nn.Module):
    """Proxies for layers ``first..last``; ``retire`` drops the lowest as the chain climbs."""

    def __init__(
        self,
        hidden_size: int,
        rank: int,
        layers: range,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        start = initial_proxies(hidden_size, rank, layers, seed)
        self.proxies = nn.ModuleDict(
            {str(j): ResidualProxy(*(t.to(device) for t in start[j])) for j in layers}
        )

    def retire_below(self, layer: int) -> None:
        """Drop the proxies of layers ≤ ``layer`` (they are now real, trained layers)."""
        for key in [k for k in self.proxies if int(k) <= layer]:
            del self.proxies[key]

    def forward(self, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Run every proxy. With autograd on, the branch is reversible: it keeps its output
        and each proxy's (B, T, r) ``gelu`` output, not one (B, T, d) input per proxy, and
        backward rebuilds each proxy's input from the one above it (``_ReversibleProxies``).
        Early stages hold a proxy for nearly every layer, so a plain run (two (B, T, d)
        tensors per proxy) made them the chain's peak."""
        proxies = tuple(self.proxies[key] for key in sorted(self.proxies, key=int))
        if not torch.is_grad_enabled() or not proxies:
            for proxy in proxies:
                h = proxy(h)
            return h
        params = [t for proxy in proxies for t in (proxy.down, proxy.up)]
        return _ReversibleProxies.apply(h, proxies, *params)


class _ReversibleProxies(torch.autograd.Function):
    """The proxies in order, saving O(r) per proxy instead of O(d).

    A proxy is h' = h + g · Uᵀ with g = gelu(A · rmsnorm(h)) of rank r, so its input is
    h = h' − g · Uᵀ: backward walks down the branch from the saved output, recovering each
    input and recomputing that proxy's gradients, one proxy's activations at a time.
    The recovered inputs differ from the forward's by fp32 rounding of the subtraction,
    so gradients agree with a plain run to rounding (tested), not bit for bit.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, proxies: tuple[ResidualProxy, ...], *params: torch.Tensor):
        gates = []
        for proxy in proxies:
            gate = proxy.gate(h)
            h = h + proxy.lift(gate)
            gates.append(gate)
        ctx.proxies = proxies
        ctx.save_for_backward(h, *gates)
        return h

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, *gates = ctx.saved_tensors
        param_grads: list[torch.Tensor] = []
        for proxy, gate in zip(reversed(ctx.proxies), reversed(gates), strict=True):
            h = h - proxy.lift(gate)
            with torch.enable_grad():
                x = h.detach().requires_grad_()
                grad_x, grad_down, grad_up = torch.autograd.grad(
                    proxy(x), (x, proxy.down, proxy.up), grad
                )
            grad = grad_x
            param_grads[:0] = [grad_down, grad_up]
        return (grad, None, *param_grads)


class _StreamedBlock(torch.autograd.Function):
    """One frozen block whose weights and activations live only inside forward/backward.

    Forward: take the block from the model's loader, name the next read (the next
    foresight block; after the last one, the last block again for its recompute, when a
    backward will follow), run under no_grad, drop it; save only the input h.
    Backward: take the block again, name the read below it (backward runs top down),
    recompute with grad, return dL/dh_in = J_block(h_in)ᵀ · dL/dh_out.
    Each block is therefore read once per forward and once per recompute, each read
    overlapping the compute of the block before it.
    """

    @staticmethod
    def forward(
        ctx,
        h: torch.Tensor,
        model: StreamingModel,
        layers: tuple[int, ...],
        position: int,
        attn: AttentionContext,
        backward_follows: bool,
    ):
        ctx.model, ctx.layers, ctx.position, ctx.attn = model, layers, position, attn
        ctx.save_for_backward(h)
        layer = layers[position]
        block = model.loader.take(("foresight", layer), lambda: model.load_block(layer))
        if position + 1 < len(layers):
            following = layers[position + 1]
            model.loader.prefetch(("foresight", following), lambda: model.load_block(following))
        elif backward_follows:
            model.loader.prefetch(("recompute", layer), lambda: model.load_block(layer))
        with torch.no_grad():
            return block(h, attn)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (h,) = ctx.saved_tensors
        model, layers, position = ctx.model, ctx.layers, ctx.position
        layer = layers[position]
        block = model.loader.take(("recompute", layer), lambda: model.load_block(layer))
        if position > 0:
            below = layers[position - 1]
            model.loader.prefetch(("recompute", below), lambda: model.load_block(below))
        with torch.enable_grad():
            h_in = h.detach().requires_grad_(True)
            out = block(h_in, ctx.attn)
            (grad_in,) = torch.autograd.grad(out, h_in, grad_out)
        return grad_in, None, None, None, None, None


class ExactForesight(nn.Module):
    """The real frozen blocks ``layers``, streamed and recomputed (no parameters)."""

    def __init__(self, model: StreamingModel, layers: range) -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def retire_below(self, layer: int) -> None:
        self.layers = range(max(self.layers.start, layer + 1), self.layers.stop)

    def forward(self, h: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        layers = tuple(self.layers)
        backward_follows = torch.is_grad_enabled() and h.requires_grad
        for position in range(len(layers)):
            h = _StreamedBlock.apply(h, self.model, layers, position, ctx, backward_follows)
        return h
