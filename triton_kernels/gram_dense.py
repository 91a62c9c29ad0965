"""Fused Gram of a dense layer: K += (G Gᵀ) ∘ expand(A Aᵀ [+ 1]) without an m×m intermediate.

One program per lower-triangle tile of K (BLOCK × BLOCK rows of the sample-major row space,
row i·s + k = sample i, cotangent k). It forms the tile of G Gᵀ and the tile of A Aᵀ for the
samples its rows belong to, expands the latter to rows (each sample covers s rows), multiplies,
adds the product to K and mirrors it into the upper triangle. Nothing but K is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, add_symmetric, check_inputs, configs, gram_configs, operand, tile_gram


def _samples_per_tile(block: int, s: int) -> int:
    """A power of two ≥ 16 (tl.dot's minimum) ≥ the number of samples that `block` consecutive
    rows can touch: ⌊(block − 1)/s⌋ + 2."""
    return max(16, triton.next_power_of_2((block - 1) // s + 2))


@triton.autotune(
    configs=configs(gram_configs("BLOCK"), triton.Config({"BLOCK": 32, "BLOCK_K": 32})),
    key=["m", "s", "n_in", "n_out"],
    restore_value=["K"],  # the kernel accumulates into K: timing runs must not change it
)
@triton.heuristics({"SAMPLES": lambda args: _samples_per_tile(args["BLOCK"], args["s"])})
@triton.jit
def _gram_dense_kernel(
    K, A, G, m, s, n_in, n_out,
    stride_km, stride_kn, stride_ab, stride_ai, stride_gb, stride_gs, stride_go,
    BIAS: tl.constexpr, ACC: tl.constexpr,
    A_OP: tl.constexpr, A_PREC: tl.constexpr, G_OP: tl.constexpr, G_PREC: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, SAMPLES: tl.constexpr,
):
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    if tj > ti:  # upper triangle: written by the mirror of tile (tj, ti)
        return
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < m
    col_mask = cols < m
    gg = tile_gram(
        G, (rows // s) * stride_gb + (rows % s) * stride_gs, row_mask,
        (cols // s) * stride_gb + (cols % s) * stride_gs, col_mask,
        n_out, stride_go, G_OP, G_PREC, ACC, BLOCK_K,
    )
    if s == 1:
        aa = tile_gram(A, rows * stride_ab, row_mask, cols * stride_ab, col_mask, n_in, stride_ai, A_OP, A_PREC, ACC, BLOCK_K)
    else:
        # A Aᵀ once per sample pair (not per row pair: s² times less work), then expanded to rows.
        b = m // s
        first_i = (ti * BLOCK) // s
        first_j = (tj * BLOCK) // s
        si = first_i + tl.arange(0, SAMPLES)
        sj = first_j + tl.arange(0, SAMPLES)
        aa_samples = tile_gram(A, si * stride_ab, si < b, sj * stride_ab, sj < b, n_in, stride_ai, A_OP, A_PREC, ACC, BLOCK_K)
        # rows past m are clamped to the last sample slot; their products are never stored
        ri = tl.minimum(rows // s - first_i, SAMPLES - 1)
        cj = tl.minimum(cols // s - first_j, SAMPLES - 1)
        aa = tl.gather(aa_samples, tl.broadcast_to(ri[:, None], (BLOCK, SAMPLES)), 0)
        aa = tl.gather(aa, tl.broadcast_to(cj[None, :], (BLOCK, BLOCK)), 1)
    if BIAS:
        aa += 1.0
    add_symmetric(K, gg * aa, rows, cols, row_mask, col_mask, stride_km, stride_kn, ti != tj)


def gram_dense(K: torch.Tensor, A: torch.Tensor, G: torch.Tensor, bias: bool) -> None:
    """K += (G Gᵀ) ∘ expand(A Aᵀ + bias) for a dense layer, in one fused launch.

    K: (m, m) fp32/fp64 with m = b·s, A: (b, in), G: (b, s, out); A and G in fp16/bf16/fp32/fp64,
    accumulated in K's dtype. bias: whether the layer has a bias (adds 1 to A Aᵀ).
    Only the lower triangle is computed; K stays symmetric if it was.
    """
    if A.dim() != 2 or G.dim() != 3 or K.dim() != 2:
        raise ValueError(f"expected K (m, m), A (b, in), G (b, s, out); got {tuple(K.shape)}, {tuple(A.shape)}, {tuple(G.shape)}")
    b, s, n_out = G.shape
    m = b * s
    if A.shape[0] != b or K.shape != (m, m):
        raise ValueError(f"shapes disagree: K {tuple(K.shape)}, A {tuple(A.shape)}, G {tuple(G.shape)} (need K (b·s, b·s), A (b, in))")
    check_inputs("K", K, A, G)
    if m == 0:
        return
    a_op, a_prec = operand(A, K.dtype)
    g_op, g_prec = operand(G, K.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK"]), triton.cdiv(m, meta["BLOCK"]))
    _gram_dense_kernel[grid](
        K, A, G, m, s, A.shape[1], n_out,
        K.stride(0), K.stride(1), A.stride(0), A.stride(1), G.stride(0), G.stride(1), G.stride(2),
        BIAS=bias, ACC=acc_dtype(K.dtype), A_OP=a_op, A_PREC=a_prec, G_OP=g_op, G_PREC=g_prec,
    )
