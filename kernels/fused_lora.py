"""Fused LoRA linear: ``y = x Wᵀ + b + scale · (x Aᵀ) Bᵀ`` as one autograd function.

Notation (PEFT / ``torch.nn.Linear`` conventions)::

    x  (..., d_in)    activations; flattened to (M, d_in), M = number of tokens
    W  (d_out, d_in)  frozen base weight          b (d_out,)  frozen base bias, optional
    A  (r, d_in)      adapter down-projection     B (d_out, r) adapter up-projection
    h = x Aᵀ  (M, r)  the rank-r adapter activation

Layers of this file, bottom up:

1. ``@triton.jit`` kernels. ``_fused_lora_matmul_kernel`` computes
   ``out = a·p + scale·(a·q)·s (+ bias)`` and writes the rank-r intermediate ``a·q``; it
   serves the forward (``a = x``) and the grad-x backward (``a = g``), so ``x Aᵀ`` is
   computed in the same pass over ``x`` as ``x Wᵀ``. ``_thin_matmul_kernel`` computes
   ``uᵀ v`` for a ``v`` with r columns (the grad-A / grad-B reductions over tokens).
   The steps of the first (tile placement, the K loop, the low-rank term and bias, the
   stores) are ``@triton.jit`` helpers, which Triton inlines into the kernel.
2. Host wrappers: check operands, allocate, launch.
3. ``LoRALinearFunction``: the autograd function, one saving policy for both paths.
4. ``lora_linear_reference``: the unfused formula in plain torch, the specification.

``lora_linear`` is the public entry: it validates the inputs and picks the Triton path
(CUDA tensors and Triton importable) or the torch path. ``CHAINFED_KERNELS=triton|torch|auto``
(read at every call, default ``auto``) forces a path. The Triton kernels also run on CPU
tensors when ``TRITON_INTERPRET=1`` was set before this module was imported (Triton fixes
interpreted vs compiled when it decorates a kernel); that is how the tests run them.

Triton is optional: without it this module imports and only the torch path exists.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from chainfed.kernels.int8 import dequantize_int8, dequantized_grad_input, dequantized_linear

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path needs no Triton
    triton = None

__all__ = ["LoRALinearFunction", "lora_linear", "lora_linear_reference", "triton_available"]

#: Largest adapter rank the Triton path takes: the rank-r accumulators live in registers
#: next to the output tile. ``auto`` sends larger ranks to the torch path.
MAX_TRITON_RANK = 128

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Triton reads TRITON_INTERPRET when it decorates a kernel, i.e. when this module is imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "").lower() in {"1", "true", "on", "yes"}
# The grad-A / grad-B reductions run over tokens; long token ranges are split across
# programs writing fp32 partial sums (summed on the host: deterministic, no atomics). The
# transient partial buffer is at most _MAX_SPLITS x d x r fp32 (d = 11008, r = 64: 22 MiB).
_ROWS_PER_SPLIT = 512
_MAX_SPLITS = 8


# ---------------------------------------------------------------------------------------
# 1. Triton kernels
# ---------------------------------------------------------------------------------------

if triton is not None:

    def _configs(
        compiled: list[dict[str, int]], interpreted: dict[str, int]
    ) -> list[triton.Config]:
        """Autotune candidates: a real search when compiled, one small config when
        interpreted (the interpreter runs every candidate at Python speed)."""
        if _INTERPRET:
            return [triton.Config(interpreted)]
        return [
            triton.Config(
                {k: v for k, v in c.items() if k not in ("warps", "stages")},
                num_warps=c["warps"],
                num_stages=c["stages"],
            )
            for c in compiled
        ]

    @triton.jit
    def _grouped_tile(
        pid,
        M,
        N,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """``(pid_m, pid_n)``, the (row block, column block) program ``pid`` computes.

        Grouped ordering: consecutive programs walk GROUP_M row blocks down one column block
        before moving right, so GROUP_M row blocks share their p columns while in L2. Every
        tile of the grid is covered exactly once.
        """
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        first_pid_m = (pid // num_pid_in_group) * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
        pid_n = (pid % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @triton.jit
    def _accumulate_over_k(
        # pointers
        a_ptr,  # (M, K)
        p_ptr,  # (K, N), a's dtype or int8
        q_ptr,  # (K, R)
        ks_ptr,  # (K,) float32, read only if K_SCALE
        # tile: int64 row indices, column and rank offsets, their masks
        rows,
        offs_n,
        offs_r,
        mask_m,
        mask_n,
        mask_r,
        # sizes
        K,
        # strides
        stride_am,
        stride_ak,
        stride_pk,
        stride_pn,
        stride_qk,
        stride_qr,
        # meta
        K_SCALE: tl.constexpr,
        R_PAD: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """``(a·p, a·q)`` for the tile, fp32 (BLOCK_M, BLOCK_N) and (BLOCK_M, R_PAD); with
        K_SCALE, ``(a·diag(ks)·p, a·q)``: the int8 backward's pre-scaled gradient.

        Each ``a`` tile is loaded once per K step and feeds both products. An int8 ``p`` tile
        is cast to ``a``'s dtype (exact: |p| <= 127). Out-of-range rows, columns, ranks and
        K entries load as 0, so they add nothing.
        """
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        low = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(
                a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )  # (BLOCK_M, BLOCK_K)
            p = tl.load(
                p_ptr + offs_k[:, None] * stride_pk + offs_n[None, :] * stride_pn,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0,
            ).to(a_ptr.dtype.element_ty)  # (BLOCK_K, BLOCK_N)
            q = tl.load(
                q_ptr + offs_k[:, None] * stride_qk + offs_r[None, :] * stride_qr,
                mask=mask_k[:, None] & mask_r[None, :],
                other=0.0,
            )  # (BLOCK_K, R_PAD)
            if K_SCALE:
                ks = tl.load(ks_ptr + offs_k, mask=mask_k, other=0.0)  # (BLOCK_K,)
                a_p = (a.to(tl.float32) * ks[None, :]).to(a_ptr.dtype.element_ty)
                acc = tl.dot(a_p, p, acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(a, p, acc, input_precision=DOT_PRECISION)
            low = tl.dot(a, q, low, input_precision=DOT_PRECISION)
        return acc, low

    @triton.jit
    def _add_lora_and_bias(
        # pointers
        s_ptr,  # (R, N)
        bias_ptr,  # (N,), read only if HAS_BIAS
        # tile: the fp32 products, column and rank offsets, their masks
        acc,
        low,
        offs_n,
        offs_r,
        mask_n,
        mask_r,
        # strides
        stride_sr,
        stride_sn,
        # scalars
        scale,
        # meta
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """``(acc + scale·(a·q)·s + bias, a·q)`` with ``a·q`` rounded to the input dtype.

        ``low`` (fp32 ``a·q``) is rounded to ``s``'s dtype before the second product, as eager
        torch does; that rounded tile is also what the caller stores. Accumulation stays fp32.
        """
        low_in = low.to(s_ptr.dtype.element_ty)  # (BLOCK_M, R_PAD)
        s = tl.load(
            s_ptr + offs_r[:, None] * stride_sr + offs_n[None, :] * stride_sn,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )  # (R_PAD, BLOCK_N)
        acc += scale * tl.dot(low_in, s, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        return acc, low_in

    @triton.jit
    def _store_tiles(
        # pointers
        out_ptr,  # (M, N)
        low_ptr,  # (M, R), written only if STORE_LOW
        # tile: the results, int64 row indices, column and rank offsets, their masks
        acc,
        low_in,
        rows,
        offs_n,
        offs_r,
        mask_m,
        mask_n,
        mask_r,
        pid_n,
        # strides
        stride_om,
        stride_on,
        stride_lm,
        stride_lr,
        # meta
        STORE_LOW: tl.constexpr,
    ):
        """Store ``acc`` to ``out`` in its dtype; with STORE_LOW, the first column block
        (``pid_n == 0``) alone stores ``low_in`` to ``low``, so each row is written once."""
        tl.store(
            out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on,
            acc.to(out_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_n[None, :],
        )
        if STORE_LOW:
            if pid_n == 0:
                tl.store(
                    low_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                    low_in,
                    mask=mask_m[:, None] & mask_r[None, :],
                )

    # Tuned once per (N, K, rank, dtypes, layout of p, variant): the token count M changes
    # from step to step and re-tuning on each new M would stall training. p's layout
    # (stride_pn: K for the forward's Wᵀ, 1 for grad-x's W) and the variant flags are in
    # the key because the forward and grad-x of one model meet on the same (N, K): a
    # square layer's, or an up-projection's grad-x and the down-projection's forward.
    @triton.autotune(
        configs=_configs(
            [
                dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, warps=8, stages=3),
                dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, warps=8, stages=3),
                dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, warps=8, stages=3),
                dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, warps=8, stages=3),
                dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, warps=4, stages=4),
                dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, warps=4, stages=4),
                dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, warps=4, stages=4),
            ],
            dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2),
        ),
        key=["N", "K", "R_PAD", "stride_pn", "HAS_BIAS", "STORE_LOW", "N_SCALE", "K_SCALE"],
    )
    @triton.jit
    def _fused_lora_matmul_kernel(
        # pointers
        a_ptr,  # (M, K)
        p_ptr,  # (K, N), a's dtype or int8
        q_ptr,  # (K, R)
        s_ptr,  # (R, N)
        bias_ptr,  # (N,), read only if HAS_BIAS
        ws_ptr,  # float32 per-channel scale of an int8 p: (N,) if N_SCALE, (K,) if K_SCALE
        out_ptr,  # (M, N)
        low_ptr,  # (M, R), written only if STORE_LOW
        # sizes
        M,
        N,
        K,
        R,
        # strides
        stride_am,
        stride_ak,
        stride_pk,
        stride_pn,
        stride_qk,
        stride_qr,
        stride_sr,
        stride_sn,
        stride_om,
        stride_on,
        stride_lm,
        stride_lr,
        # scalars
        scale,
        # meta
        HAS_BIAS: tl.constexpr,
        STORE_LOW: tl.constexpr,
        N_SCALE: tl.constexpr,
        K_SCALE: tl.constexpr,
        R_PAD: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """One (BLOCK_M, BLOCK_N) tile of ``out = a·p + scale·(a·q)·s + bias``.

        int8 ``p`` (quantised frozen weight, see ``chainfed.kernels.int8``): with N_SCALE
        (forward, ``p = W_qᵀ``) the fp32 ``a·p`` tile is multiplied by the output channels'
        scales after the K loop; with K_SCALE (grad-x, ``p = W_q``) each ``a`` tile is scaled
        per K entry before its product with ``p`` only: ``(g·s) W_q``, while ``a·q = g B``
        stays unscaled. The K loop reads each ``a`` tile once and feeds both products.
        Every N-tile of a row block recomputes its ``a·q`` (R_PAD/BLOCK_N extra work), the
        price of one pass; only the first N-tile writes it to ``low``. fp32 accumulation
        throughout; ``a·q`` is rounded to the input dtype before the second product, as eager
        torch does.
        """
        pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, R_PAD)
        rows = offs_m.to(tl.int64)  # M * K can pass 2**31
        mask_m = offs_m < M
        mask_n = offs_n < N
        mask_r = offs_r < R

        acc, low = _accumulate_over_k(
            a_ptr, p_ptr, q_ptr, ws_ptr,
            rows, offs_n, offs_r, mask_m, mask_n, mask_r,
            K,
            stride_am, stride_ak, stride_pk, stride_pn, stride_qk, stride_qr,
            K_SCALE, R_PAD, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        if N_SCALE:
            acc = acc * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        acc, low_in = _add_lora_and_bias(
            s_ptr, bias_ptr,
            acc, low, offs_n, offs_r, mask_n, mask_r,
            stride_sr, stride_sn,
            scale,
            HAS_BIAS, DOT_PRECISION,
        )  # fmt: skip
        _store_tiles(
            out_ptr, low_ptr,
            acc, low_in, rows, offs_n, offs_r, mask_m, mask_n, mask_r, pid_n,
            stride_om, stride_on, stride_lm, stride_lr,
            STORE_LOW,
        )  # fmt: skip

    # Tuned once per (P, rank, dtypes); P is d_in or d_out, fixed per layer.
    @triton.autotune(
        configs=_configs(
            [
                dict(BLOCK_P=64, BLOCK_M=64, warps=4, stages=3),
                dict(BLOCK_P=128, BLOCK_M=64, warps=4, stages=3),
                dict(BLOCK_P=128, BLOCK_M=128, warps=8, stages=3),
                dict(BLOCK_P=256, BLOCK_M=64, warps=8, stages=3),
                dict(BLOCK_P=64, BLOCK_M=128, warps=4, stages=4),
            ],
            dict(BLOCK_P=32, BLOCK_M=32),
        ),
        key=["P", "R_PAD"],
    )
    @triton.jit
    def _thin_matmul_kernel(
        # pointers
        u_ptr,  # (M, P)
        v_ptr,  # (M, R)
        out_ptr,  # (SPLITS, P, R) fp32 partial sums
        # sizes
        M,
        P,
        R,
        rows_per_split,
        # strides
        stride_um,
        stride_up,
        stride_vm,
        stride_vr,
        stride_os,
        stride_op,
        stride_or,
        # meta
        R_PAD: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """One (BLOCK_P, R) tile of the partial sum ``uᵀ v`` over one split of the M rows."""
        pid_p = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_r = tl.arange(0, R_PAD)
        mask_p = offs_p < P
        mask_r = offs_r < R
        m_start = pid_s * rows_per_split
        m_end = min(M, m_start + rows_per_split)

        acc = tl.zeros((BLOCK_P, R_PAD), dtype=tl.float32)
        for m0 in range(m_start, m_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            rows = offs_m.to(tl.int64)
            mask_m = offs_m < m_end
            u_t = tl.load(
                u_ptr + offs_p[:, None] * stride_up + rows[None, :] * stride_um,
                mask=mask_p[:, None] & mask_m[None, :],
                other=0.0,
            )  # (BLOCK_P, BLOCK_M)
            v = tl.load(
                v_ptr + rows[:, None] * stride_vm + offs_r[None, :] * stride_vr,
                mask=mask_m[:, None] & mask_r[None, :],
                other=0.0,
            )  # (BLOCK_M, R_PAD)
            acc = tl.dot(u_t, v, acc, input_precision=DOT_PRECISION)

        tl.store(
            out_ptr + pid_s * stride_os + offs_p[:, None] * stride_op + offs_r[None, :] * stride_or,
            acc,
            mask=mask_p[:, None] & mask_r[None, :],
        )


# ---------------------------------------------------------------------------------------
# 2. Host wrappers
# ---------------------------------------------------------------------------------------


def _rank_pad(rank: int) -> int:
    """Rank padded to a power of two of at least 16, the smallest ``tl.dot`` operand."""
    return max(16, triton.next_power_of_2(rank))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 products honour ``torch.backends.cuda.matmul.allow_tf32`` like torch matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _check_operands(*tensors: torch.Tensor) -> None:
    """Kernel preconditions: one device, one supported dtype."""
    first = tensors[0]
    if first.dtype not in _TRITON_DTYPES:
        raise TypeError(f"Triton path supports {_TRITON_DTYPES}, got {first.dtype}")
    for t in tensors[1:]:
        if t.device != first.device or t.dtype != first.dtype:
            raise ValueError(
                f"operands must share device and dtype: {first.device}/{first.dtype} "
                f"vs {t.device}/{t.dtype}"
            )


def _check_int8_operand(
    a: torch.Tensor, p: torch.Tensor, p_scale: torch.Tensor, length: int
) -> None:
    """An int8 ``p`` with a float32 ``p_scale`` of ``length`` entries, on ``a``'s device."""
    if p.dtype != torch.int8 or p_scale.dtype != torch.float32 or p_scale.shape != (length,):
        raise ValueError(
            f"an int8 operand needs a float32 ({length},) scale, got {p.dtype} with "
            f"{p_scale.dtype} {tuple(p_scale.shape)}"
        )
    if p.device != a.device or p_scale.device != a.device:
        raise ValueError(f"operands must share a device: {a.device}, {p.device}, {p_scale.device}")


def _fused_lora_matmul(
    a: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    *,
    store_low: bool,
    p_scale: torch.Tensor | None = None,
    p_scale_axis: str = "n",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(a·p + scale·(a·q)·s + bias, a·q)`` with ``a (M,K)``, ``p (K,N)``, ``q (K,R)``,
    ``s (R,N)``; any strides. The second result is ``None`` unless ``store_low``.

    With ``p_scale`` (float32), ``p`` is int8 and stands for ``p_scale · p`` scaled along
    ``p_scale_axis``: ``"n"`` (``p_scale (N,)``, applied to ``a·p`` after the K loop) or
    ``"k"`` (``p_scale (K,)``, applied to ``a`` before its product with ``p``)."""
    M, K = a.shape
    N, R = p.shape[1], q.shape[1]
    if p.shape[0] != K or q.shape[0] != K or s.shape != (R, N):
        raise ValueError(
            f"shapes do not chain: a{tuple(a.shape)} p{tuple(p.shape)} "
            f"q{tuple(q.shape)} s{tuple(s.shape)}"
        )
    if R > MAX_TRITON_RANK:
        raise ValueError(f"Triton path supports rank <= {MAX_TRITON_RANK}, got {R}")
    _check_operands(a, q, s, *(() if bias is None else (bias,)), *((p,) if p_scale is None else ()))
    if p_scale is not None:
        _check_int8_operand(a, p, p_scale, N if p_scale_axis == "n" else K)

    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    low = torch.empty((M, R), device=a.device, dtype=a.dtype) if store_low else None
    if M == 0:
        return out, low

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    low_arg = out if low is None else low  # never written when STORE_LOW is False
    _fused_lora_matmul_kernel[grid](
        a, p, q, s, out if bias is None else bias, out if p_scale is None else p_scale,
        out, low_arg,
        M, N, K, R,
        a.stride(0), a.stride(1), p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        s.stride(0), s.stride(1), out.stride(0), out.stride(1),
        low_arg.stride(0), low_arg.stride(1),
        float(scale),
        HAS_BIAS=bias is not None,
        STORE_LOW=store_low,
        N_SCALE=p_scale is not None and p_scale_axis == "n",
        K_SCALE=p_scale is not None and p_scale_axis == "k",
        R_PAD=_rank_pad(R),
        DOT_PRECISION=_dot_precision(a.dtype),
    )  # fmt: skip
    return out, low


def _thin_matmul(
    u: torch.Tensor, v: torch.Tensor, scale: float, *, transpose: bool, out_dtype: torch.dtype
) -> torch.Tensor:
    """``scale · uᵀ v`` for ``u (M,P)``, ``v (M,R)`` with small R, reduced over M in fp32,
    returned contiguous in ``out_dtype`` as ``(P, R)``, or as ``(R, P)`` (its transpose)
    when ``transpose``. Any input strides."""
    M, P = u.shape
    R = v.shape[1]
    if v.shape[0] != M:
        raise ValueError(f"row counts differ: u{tuple(u.shape)} v{tuple(v.shape)}")
    if R > MAX_TRITON_RANK:
        raise ValueError(f"Triton path supports rank <= {MAX_TRITON_RANK}, got {R}")
    _check_operands(u, v)
    out_shape = (R, P) if transpose else (P, R)
    if M == 0:
        return torch.zeros(out_shape, device=u.device, dtype=out_dtype)

    splits = min(_MAX_SPLITS, triton.cdiv(M, _ROWS_PER_SPLIT))
    rows_per_split = triton.cdiv(M, splits)
    partial = torch.empty((splits, *out_shape), device=u.device, dtype=torch.float32)
    stride_p, stride_r = partial.stride()[1:][::-1] if transpose else partial.stride()[1:]

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(P, meta["BLOCK_P"]), splits)

    _thin_matmul_kernel[grid](
        u, v, partial,
        M, P, R, rows_per_split,
        u.stride(0), u.stride(1), v.stride(0), v.stride(1),
        partial.stride(0), stride_p, stride_r,
        R_PAD=_rank_pad(R),
        DOT_PRECISION=_dot_precision(u.dtype),
    )  # fmt: skip
    return (partial.sum(0) * scale).to(out_dtype)


# ---------------------------------------------------------------------------------------
# 3. Autograd function
# ---------------------------------------------------------------------------------------


def _base_forward(
    x2: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Torch path ``x2 Wᵀ + b`` (M, d_out); an int8 ``W`` is dequantised block by block."""
    if weight_scale is None:
        return F.linear(x2, weight, bias)
    return dequantized_linear(x2, weight, weight_scale, bias)


def _base_grad_input(
    g: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None
) -> torch.Tensor:
    """Torch path ``g W`` (M, d_in); an int8 ``W`` is dequantised block by block."""
    if weight_scale is None:
        return g @ weight
    return dequantized_grad_input(g, weight, weight_scale)


def _forward_2d(
    x2: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, h)`` for flat ``x2 (M, d_in)``: ``y (M, d_out)``, ``h = x2 Aᵀ (M, r)``."""
    if use_triton:
        return _fused_lora_matmul(
            x2, weight.t(), lora_a.t(), lora_b.t(), bias, scale,
            store_low=True, p_scale=weight_scale, p_scale_axis="n",
        )  # fmt: skip
    h = x2 @ lora_a.t()  # (M, r)
    y = _base_forward(x2, weight, weight_scale, bias).add_(h @ lora_b.t(), alpha=scale)
    return y, h  # (M, d_out), (M, r)


class LoRALinearFunction(torch.autograd.Function):
    r"""``y = x Wᵀ + b + s (x Aᵀ) Bᵀ`` with a frozen base ``W, b``.

    Gradients, with ``g = ∂L/∂y (M, d_out)`` and ``h = x Aᵀ (M, r)``. Since
    ``y = x (W + s B A)ᵀ + b``::

        ∂L/∂x = g (W + s B A)   = g W + s (g B) A     (M, d_in)
        ∂L/∂B = s gᵀ (x Aᵀ)     = s gᵀ h              (d_out, r)
        ∂L/∂A = s (g B)ᵀ x                            (r, d_in)

    ``W + s B A`` is never formed: ``g B (M, r)`` is a rank-r intermediate.

    int8 base (``weight_scale`` given, see ``chainfed.kernels.int8``): ``W = diag(σ) W_q``
    with σ the per-output-channel scales, so ``x Wᵀ = (x W_qᵀ) diag(σ)`` and
    ``g W = (g diag(σ)) W_q``. The Triton path computes exactly that (σ applied to the fp32
    accumulator after the K loop in forward; ``g`` pre-scaled per channel, for the product
    with ``W_q`` only, in backward); the torch path dequantises ``W`` one block of output
    channels at a time. Only ``W_q`` and σ are saved, by reference.

    Precision. ``A`` and ``B`` may be float32 master weights under a bf16/fp16 ``x``: both
    paths cast them to ``x``'s dtype for the products (accumulating in fp32) and return
    ``∂L/∂A``, ``∂L/∂B`` in the parameters' own dtype. The Triton path reduces them over
    tokens in fp32 and rounds once, to that dtype; the torch path takes the compute-dtype
    product (fp32 accumulation inside the matmul, the result rounded to the compute dtype)
    and casts it.

    Saving policy (both paths). ∂L/∂x needs only ``g`` and the parameters; ∂L/∂B needs
    ``h``; only ∂L/∂A needs ``x``. So with ``train_a=False`` (A frozen, FFA) the only
    activation saved is ``h`` (``r/d_in`` of ``x``); with ``train_a=True`` it is ``x`` (as
    passed in, no copy) and ``h``. ``W``, ``A``, ``B`` are saved by reference: they are
    parameters that live anyway, not activations, and cost no memory here.

    ``forward`` takes ``(x, weight, bias, lora_a, lora_b, scale, train_a, use_triton,
    weight_scale)``; ``backward`` returns one value per input, ``None`` for the frozen base
    and its scales, the flags and (when ``train_a`` is False) ``A``. First-order only
    (``once_differentiable``).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scale: float,
        train_a: bool,
        use_triton: bool,
        weight_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (M, d_in)
        a_c, b_c = lora_a.to(x.dtype), lora_b.to(x.dtype)  # no copy when dtypes agree
        y, h = _forward_2d(x2, weight, weight_scale, bias, a_c, b_c, scale, use_triton)
        activations = (x, h) if train_a else (h,)
        ctx.save_for_backward(*activations, weight, lora_a, lora_b, weight_scale)
        ctx.x_shape = x.shape
        ctx.scale = scale
        ctx.train_a = train_a
        ctx.use_triton = use_triton
        return y.reshape(*x.shape[:-1], weight.shape[0])  # (..., d_out)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        if ctx.train_a:
            x, h, weight, lora_a, lora_b, weight_scale = ctx.saved_tensors
        else:
            h, weight, lora_a, lora_b, weight_scale = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        need_a = ctx.train_a and ctx.needs_input_grad[3]
        need_b = ctx.needs_input_grad[4]
        s = ctx.scale
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (M, d_out)
        a_c, b_c = lora_a.to(g.dtype), lora_b.to(g.dtype)  # as in forward

        grad_x = grad_a = grad_b = None
        if ctx.use_triton:
            gb = None  # g B (M, r)
            if need_x:
                grad_x, gb = _fused_lora_matmul(
                    g, weight, b_c, a_c, None, s,
                    store_low=need_a, p_scale=weight_scale, p_scale_axis="k",
                )  # fmt: skip
            if need_a:
                if gb is None:
                    gb = g @ b_c  # (M, r): x needs no grad, no pass over W to share
                x2 = x.reshape(-1, x.shape[-1])  # (M, d_in)
                grad_a = _thin_matmul(x2, gb, s, transpose=True, out_dtype=lora_a.dtype)
            if need_b:
                grad_b = _thin_matmul(g, h, s, transpose=False, out_dtype=lora_b.dtype)
        else:
            gb = g @ b_c if (need_x or need_a) else None  # (M, r)
            if need_x:
                grad_x = torch.addmm(_base_grad_input(g, weight, weight_scale), gb, a_c, alpha=s)
            if need_a:
                grad_a = (gb.t() @ x.reshape(-1, x.shape[-1])).mul_(s).to(lora_a.dtype)
            if need_b:
                grad_b = (g.t() @ h).mul_(s).to(lora_b.dtype)  # (d_out, r)

        if grad_x is not None:
            grad_x = grad_x.reshape(ctx.x_shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None


# ---------------------------------------------------------------------------------------
# 4. Reference and public entry
# ---------------------------------------------------------------------------------------


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unfused formula in plain torch, differentiated by autograd: the specification
    the fused paths are tested against. What it saves for backward is autograd's choice.
    Float32 ``lora_a`` / ``lora_b`` under a lower-precision ``x`` are cast to ``x``'s dtype;
    an int8 ``weight`` with its ``weight_scale`` is dequantised whole to ``x``'s dtype."""
    adapter = F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    if weight_scale is not None:
        weight = dequantize_int8(weight, weight_scale, x.dtype)
    return F.linear(x, weight, bias) + scale * adapter


def triton_available() -> bool:
    """True when Triton imported, i.e. the Triton path can run at all."""
    return triton is not None


def _triton_reason(x: torch.Tensor, rank: int) -> str | None:
    """Why the Triton path cannot take these inputs, or ``None`` if it can."""
    if triton is None:
        return "triton is not installed"
    if not (x.is_cuda or _INTERPRET):
        return "tensors are not on CUDA (and TRITON_INTERPRET was not set at import)"
    if x.dtype not in _TRITON_DTYPES:
        return f"dtype {x.dtype} is not one of {_TRITON_DTYPES}"
    if rank > MAX_TRITON_RANK:
        return f"rank {rank} > {MAX_TRITON_RANK}"
    return None


def _use_triton(x: torch.Tensor, rank: int) -> bool:
    """Apply ``CHAINFED_KERNELS``: ``torch``, ``triton`` (error if impossible) or ``auto``
    (Triton for CUDA tensors it supports; CPU tensors always take the torch path)."""
    choice = os.environ.get("CHAINFED_KERNELS", "auto").strip().lower() or "auto"
    if choice == "torch":
        return False
    reason = _triton_reason(x, rank)
    if choice == "triton":
        if reason is not None:
            raise RuntimeError(f"CHAINFED_KERNELS=triton but {reason}")
        return True
    if choice == "auto":
        return reason is None and x.is_cuda
    raise ValueError(f"CHAINFED_KERNELS must be triton, torch or auto, got {choice!r}")


def _check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    train_a: bool,
    weight_scale: torch.Tensor | None,
) -> None:
    d_out, d_in = weight.shape
    rank = lora_a.shape[0]
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {d_in}")
    if lora_a.shape != (rank, d_in) or lora_b.shape != (d_out, rank):
        raise ValueError(
            f"expected lora_a ({rank}, {d_in}) and lora_b ({d_out}, {rank}), "
            f"got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
        )
    if bias is not None and bias.shape != (d_out,):
        raise ValueError(f"bias must be ({d_out},), got {tuple(bias.shape)}")
    if (weight.dtype == torch.int8) != (weight_scale is not None):
        raise ValueError(
            f"an int8 weight needs its weight_scale and only an int8 weight takes one; got a "
            f"{weight.dtype} weight with{'out' if weight_scale is None else ''} a weight_scale"
        )
    if weight_scale is not None and (
        weight_scale.dtype != torch.float32 or weight_scale.shape != (d_out,)
    ):
        raise ValueError(
            f"weight_scale must be float32 ({d_out},), got {weight_scale.dtype} "
            f"{tuple(weight_scale.shape)}"
        )
    tensors = [x, weight, lora_a, lora_b] + ([] if bias is None else [bias])
    tensors += [] if weight_scale is None else [weight_scale]
    base = [x] + ([] if weight_scale is not None else [weight]) + ([] if bias is None else [bias])
    if (
        len({t.device for t in tensors}) != 1
        or len({t.dtype for t in base}) != 1
        or lora_a.dtype != lora_b.dtype
        or lora_a.dtype not in (x.dtype, torch.float32)
    ):
        raise ValueError(
            "x, weight, bias, lora_a, lora_b must share one device; x, weight (unless int8) "
            "and bias one dtype; lora_a and lora_b that dtype or float32, got "
            + ", ".join(f"{t.dtype}@{t.device}" for t in tensors)
        )
    if torch.is_grad_enabled():
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            raise ValueError("weight and bias are frozen: they must not require grad")
        if not train_a and lora_a.requires_grad:
            raise ValueError("train_a=False: lora_a must not require grad (it gets none)")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    train_a: bool = True,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x Wᵀ + b + scale · (x Aᵀ) Bᵀ`` for ``x (..., d_in)``, ``weight (d_out, d_in)``,
    ``bias (d_out,)`` or ``None``, ``lora_a (r, d_in)``, ``lora_b (d_out, r)``.

    An int8 ``weight`` (``chainfed.kernels.int8.quantize_int8``) comes with ``weight_scale``,
    float32 ``(d_out,)``, and stands for ``weight_scale[:, None] · weight``; it is dequantised
    inside (see ``LoRALinearFunction``), never whole.

    Guarantees: ``weight`` and ``bias`` are frozen (a ``ValueError`` if they require grad
    while grad mode is on) and never get gradients; ``W + scale·B A`` is never formed;
    with ``train_a=False`` ``lora_a`` must be frozen too and backward keeps only the rank-r
    ``x Aᵀ``, not ``x`` (see ``LoRALinearFunction``). All tensors share one device; ``x``,
    ``weight`` and ``bias`` one dtype; ``lora_a`` and ``lora_b`` that dtype or float32
    (master weights: cast to ``x``'s dtype inside, their gradients returned in float32).
    Path: Triton for CUDA tensors (fp16/bf16/fp32, rank <= ``MAX_TRITON_RANK``), torch
    otherwise; ``CHAINFED_KERNELS`` overrides.
    """
    _check_inputs(x, weight, bias, lora_a, lora_b, train_a, weight_scale)
    use_triton = _use_triton(x, lora_a.shape[0])
    return LoRALinearFunction.apply(
        x, weight, bias, lora_a, lora_b, float(scale), bool(train_a), use_triton, weight_scale
    )
