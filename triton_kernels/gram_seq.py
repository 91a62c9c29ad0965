"""Fused ghost Gram of a layer applied at T positions, flash-attention style:

    K[(i,k),(j,l)] += Σ_{t,t'} (G_ik,t · G_jl,t') (a_i,t · a_j,t' [+ 1 with a bias])

One program per sample pair (i, j) of the lower triangle. It walks the T×T position grid in
BLOCK_T×BLOCK_T tiles; per tile it forms the input block A_i A_jᵀ once and, for every cotangent
pair (k, l), the output-gradient block G_ik G_jlᵀ, multiplies them and reduces to a number. The
T×T blocks live in registers only; the s×s result is added to K and mirrored. The bias term
(Σ_t G_ik,t)·(Σ_t' G_jl,t') is the same sum with the input block replaced by ones, so it rides
along as +1 on the input block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, add_symmetric, check_inputs, configs, gram_configs, operand, tile_gram


@triton.autotune(
    configs=configs(gram_configs("BLOCK_T"), triton.Config({"BLOCK_T": 32, "BLOCK_K": 32})),
    key=["s", "T", "n_in", "n_out"],
    restore_value=["K"],  # the kernel accumulates into K: timing runs must not change it
)
@triton.jit
def _gram_seq_kernel(
    K, A, G, s, T, n_in, n_out,
    stride_km, stride_kn, stride_ab, stride_at, stride_ai, stride_gb, stride_gs, stride_gt, stride_go,
    BIAS: tl.constexpr, ACC: tl.constexpr,
    A_OP: tl.constexpr, A_PREC: tl.constexpr, G_OP: tl.constexpr, G_PREC: tl.constexpr,
    S_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i = tl.program_id(0)
    j = tl.program_id(1)
    if j > i:  # upper triangle: written by the mirror of pair (j, i)
        return
    kl = tl.arange(0, S_PAD)
    acc = tl.zeros((S_PAD, S_PAD), ACC)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_mask = t < T
        for u0 in range(0, T, BLOCK_T):
            u = u0 + tl.arange(0, BLOCK_T)
            u_mask = u < T
            aa = tile_gram(A, i * stride_ab + t * stride_at, t_mask, j * stride_ab + u * stride_at, u_mask, n_in, stride_ai, A_OP, A_PREC, ACC, BLOCK_K)
            if BIAS:
                aa += 1.0  # masked positions have zero output-gradient blocks
            for k in range(0, s):
                for l in range(0, s):
                    gg = tile_gram(
                        G, i * stride_gb + k * stride_gs + t * stride_gt, t_mask,
                        j * stride_gb + l * stride_gs + u * stride_gt, u_mask,
                        n_out, stride_go, G_OP, G_PREC, ACC, BLOCK_K,
                    )
                    total = tl.sum(tl.sum(gg * aa, axis=1), axis=0)
                    acc += tl.where((kl[:, None] == k) & (kl[None, :] == l), total, 0.0)
    add_symmetric(K, acc, i * s + kl, j * s + kl, kl < s, kl < s, stride_km, stride_kn, i != j)


def gram_seq(K: torch.Tensor, A: torch.Tensor, G: torch.Tensor, bias: bool) -> None:
    """Ghost Gram of a layer applied at T positions, in one fused launch:
    K += Σ_{t,t'} (G_ik,t·G_jm,t')(a_i,t·a_j,t' + bias).

    K: (m, m) fp32/fp64 with m = b·s, A: (b, T, in), G: (b, s, T, out); A and G in
    fp16/bf16/fp32/fp64, accumulated in K's dtype. Cost m²T²·out + b²T²·in (half of it by
    symmetry); memory: none beyond K.
    """
    if A.dim() != 3 or G.dim() != 4 or K.dim() != 2:
        raise ValueError(f"expected K (m, m), A (b, T, in), G (b, s, T, out); got {tuple(K.shape)}, {tuple(A.shape)}, {tuple(G.shape)}")
    b, s, T, n_out = G.shape
    m = b * s
    if A.shape[:2] != (b, T) or K.shape != (m, m):
        raise ValueError(f"shapes disagree: K {tuple(K.shape)}, A {tuple(A.shape)}, G {tuple(G.shape)} (need K (b·s, b·s), A (b, T, in))")
    check_inputs("K", K, A, G)
    if m == 0 or T == 0:
        return
    a_op, a_prec = operand(A, K.dtype)
    g_op, g_prec = operand(G, K.dtype)
    _gram_seq_kernel[(b, b)](
        K, A, G, s, T, A.shape[2], n_out,
        K.stride(0), K.stride(1), A.stride(0), A.stride(1), A.stride(2),
        G.stride(0), G.stride(1), G.stride(2), G.stride(3),
        BIAS=bias, ACC=acc_dtype(K.dtype), A_OP=a_op, A_PREC=a_prec, G_OP=g_op, G_PREC=g_prec,
        S_PAD=triton.next_power_of_2(s),
    )
