"""Linear centred kernel alignment (CKA): how alike two layers' representations are.

FOAT (DESIGN.md §3) scores each layer by linear CKA between that layer's output and the
embedding output over one mini-batch, and starts the chain at the first layer whose score
falls below a threshold. The rows compared are **per-token representations of real
tokens**: ``hidden (B, T, d)`` is flattened to one row per non-padding token with
:func:`masked_token_rows`, so padding (which is masked out of attention and never
trained on) does not count, and both sides use the same mask, hence the same rows.

Notation: n rows (samples, here tokens), d1 and d2 feature widths; Xc, Yc are X, Y with
every column centred (column mean subtracted)::

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F · ||Yc^T Yc||_F)       feature form, d×d
              = <K, L>_F / (||K||_F · ||L||_F),  K = Xc Xc^T, L = Yc Yc^T   Gram form, n×n

Both forms are the same number; the cheaper one is used. CKA lies in [0, 1], is 1 for
X against itself and is invariant to isotropic scaling, orthogonal transforms and
translation of either side.

Bias: for independent data linear CKA is near 0 only when n ≫ d; as d approaches or
exceeds n it drifts toward 1 (centred high-dimensional Gram matrices all look alike).
Score FOAT on enough tokens that n is well above the hidden width.
"""

import torch


def masked_token_rows(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The rows of ``hidden (B, T, d)`` at real tokens (``attention_mask (B, T)`` != 0).

    Returns ``(n, d)`` with n = number of real tokens, in batch-then-position order and
    ``hidden``'s dtype, so two layers' outputs under one mask give matching rows.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, d), got shape {tuple(hidden.shape)}")
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match hidden's "
            f"(B, T) = {tuple(hidden.shape[:2])}"
        )
    return hidden[attention_mask.to(device=hidden.device) != 0]  # (n, d)


def _centred_unit(z: torch.Tensor, name: str) -> torch.Tensor:
    """Column-centred float64 copy scaled to unit Frobenius norm (CKA is scale-free)."""
    z = z.detach().to(torch.float64)
    if not torch.isfinite(z).all():
        raise ValueError(f"{name} has non-finite values")
    scale = z.abs().max()
    if scale == 0:
        raise ValueError(f"{name} is all zeros: CKA is undefined")
    z = z / scale  # keeps the squares below from overflowing / underflowing
    zc = z - z.mean(dim=0, keepdim=True)  # (n, d)
    norm = torch.linalg.matrix_norm(zc)
    if norm <= 1e-12 * torch.linalg.matrix_norm(z):
        raise ValueError(f"{name} is constant across rows: CKA is undefined")
    return zc / norm


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between ``x (n, d1)`` and ``y (n, d2)``; row i of both is sample i.

    Computed in float64 on the inputs' device, with the n×n Gram form when that costs
    fewer multiply-adds than the d×d feature form (e.g. d > n). Raises ``ValueError`` for
    non-2-D inputs, different row counts, fewer than 2 rows, non-finite values, or a side
    that is constant across rows (CKA is 0/0 there).
    """
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(
            f"x and y must be 2-D (n, d), got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    n, d1 = x.shape
    if y.shape[0] != n:
        raise ValueError(f"x and y must have the same rows (samples), got {n} and {y.shape[0]}")
    if n < 2:
        raise ValueError(f"CKA needs at least 2 rows, got {n}")
    d2 = y.shape[1]
    xc = _centred_unit(x, "x")  # (n, d1), ||xc||_F = 1
    yc = _centred_unit(y.to(device=x.device), "y")  # (n, d2), ||yc||_F = 1

    gram_cost = n * n * (d1 + d2)
    feature_cost = n * (d1 * d2 + d1 * d1 + d2 * d2)
    if gram_cost < feature_cost:
        gram_x = xc @ xc.T  # (n, n)
        gram_y = yc @ yc.T  # (n, n)
        numerator = (gram_x * gram_y).sum()
        denominator = torch.linalg.matrix_norm(gram_x) * torch.linalg.matrix_norm(gram_y)
    else:
        cross = yc.T @ xc  # (d2, d1)
        numerator = cross.square().sum()
        denominator = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    return float(numerator / denominator)
