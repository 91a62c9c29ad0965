"""Fused back-projection of a (sequence) linear layer:

    dW = Σ_{i,t} U_i,t a_i,tᵀ,  db = Σ_{i,t} U_i,t,  with U_i,t = Σ_k u_ik G_ik,t

as one GEMM dW = Uᵀ A over the b·T rows, where the contraction over k happens while the U tile
is loaded (U is never written to memory) and the bias gradient is summed from the same tiles.
One program per (out, in) tile of dW; when those tiles are too few to fill the GPU, the rows
are split over several programs that add their partial sums atomically (split-K).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check_inputs, configs, operand

# Rows of the reduction one split-K program handles at least (fewer would make the atomic adds
# of the partial tiles cost as much as the GEMM itself).
_MIN_ROWS_PER_SPLIT = 1024
_TYPICAL_TILE = 128


@triton.autotune(
    configs=configs(
        [
            triton.Config({"BLOCK_O": 64, "BLOCK_I": 64, "BLOCK_R": 32}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_O": 128, "BLOCK_I": 64, "BLOCK_R": 32}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_O": 128, "BLOCK_I": 128, "BLOCK_R": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_O": 64, "BLOCK_I": 128, "BLOCK_R": 64}, num_warps=4, num_stages=3),
        ],
        triton.Config({"BLOCK_O": 32, "BLOCK_I": 32, "BLOCK_R": 32}),
    ),
    key=["s", "n_rows", "n_in", "n_out", "rows_per_split"],
    reset_to_zero=["dW", "db"],  # split-K programs add into zeroed outputs
)
@triton.jit
def _backproject_kernel(
    dW, db, A, G, u, s, T, n_rows, n_in, n_out, rows_per_split,
    stride_ab, stride_at, stride_ai, stride_gb, stride_gs, stride_gt, stride_go, stride_ub, stride_us,
    BIAS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
):
    po = tl.program_id(0)
    pi = tl.program_id(1)
    split = tl.program_id(2)
    o = po * BLOCK_O + tl.arange(0, BLOCK_O)
    f = pi * BLOCK_I + tl.arange(0, BLOCK_I)
    o_mask = o < n_out
    f_mask = f < n_in
    acc = tl.zeros((BLOCK_O, BLOCK_I), ACC)
    acc_b = tl.zeros((BLOCK_O,), ACC)
    r_end = tl.minimum(n_rows, (split + 1) * rows_per_split)
    for r0 in range(split * rows_per_split, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)  # row r = (sample i, position t)
        r_mask = r < r_end
        i = r // T
        t = r % T
        U = tl.zeros((BLOCK_R, BLOCK_O), ACC)
        for k in range(0, s):
            u_k = tl.load(u + i * stride_ub + k * stride_us, mask=r_mask, other=0.0).to(ACC)
            g = tl.load(
                G + (i * stride_gb + k * stride_gs + t * stride_gt)[:, None] + o[None, :] * stride_go,
                mask=r_mask[:, None] & o_mask[None, :], other=0.0,
            )
            U += u_k[:, None] * g.to(ACC)
        a = tl.load(
            A + (i * stride_ab + t * stride_at)[:, None] + f[None, :] * stride_ai,
            mask=r_mask[:, None] & f_mask[None, :], other=0.0,
        )
        acc = tl.dot(tl.trans(U), a.to(ACC), acc, input_precision=PREC, out_dtype=ACC)
        if BIAS:
            acc_b += tl.sum(U, axis=0)
    ptr = dW + o[:, None] * n_in + f[None, :]
    mask = o_mask[:, None] & f_mask[None, :]
    if ATOMIC:
        tl.atomic_add(ptr, acc, mask=mask)
    else:
        tl.store(ptr, acc, mask=mask)
    if BIAS:
        if pi == 0:  # one column of tiles owns the bias
            if ATOMIC:
                tl.atomic_add(db + o, acc_b, mask=o_mask)
            else:
                tl.store(db + o, acc_b, mask=o_mask)


def _split_count(n_rows: int, n_out: int, n_in: int, device: torch.device) -> int:
    """How many programs share the b·T rows of each dW tile: enough tiles for two per SM."""
    if device.type != "cuda":
        return 1
    tiles = triton.cdiv(n_out, _TYPICAL_TILE) * triton.cdiv(n_in, _TYPICAL_TILE)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, tiles), n_rows // _MIN_ROWS_PER_SPLIT))


def backproject(
    A: torch.Tensor, G: torch.Tensor, u: torch.Tensor, bias: bool, splits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """J̃ᵀu for a (sequence) linear layer, in one fused launch:
    dW = Σ_{i,t} (Σ_k u_ik G_ik,t) a_i,tᵀ, db = Σ_{i,k,t} u_ik G_ik,t.

    A: (b, T, in), G: (b, s, T, out) in fp16/bf16/fp32/fp64, u: (b, s) fp32/fp64
    -> dW (out, in), db (out,) or None, in u's dtype (the GEMM runs in u's dtype; fp32 uses
    TF32 exactly when torch's matmuls do). splits: programs sharing the b·T rows of each dW
    tile (None: enough for two programs per SM); with more than one the partial sums are added
    atomically, so the last bits can differ from run to run.
    """
    if A.dim() != 3 or G.dim() != 4 or u.dim() != 2:
        raise ValueError(f"expected A (b, T, in), G (b, s, T, out), u (b, s); got {tuple(A.shape)}, {tuple(G.shape)}, {tuple(u.shape)}")
    b, s, T, n_out = G.shape
    n_in = A.shape[2]
    if A.shape[:2] != (b, T) or u.shape != (b, s):
        raise ValueError(f"shapes disagree: A {tuple(A.shape)}, G {tuple(G.shape)}, u {tuple(u.shape)}")
    check_inputs("u", u, A, G)
    n_rows = b * T
    if splits is None:
        splits = _split_count(n_rows, n_out, n_in, u.device)
    if splits < 1:
        raise ValueError(f"splits must be ≥ 1, got {splits}")
    dW = torch.zeros(n_out, n_in, dtype=u.dtype, device=u.device)
    db = torch.zeros(n_out if bias else 0, dtype=u.dtype, device=u.device)
    if n_rows == 0 or n_out == 0 or n_in == 0:
        return dW, (db if bias else None)
    _, precision = operand(u, u.dtype)
    grid = lambda meta: (triton.cdiv(n_out, meta["BLOCK_O"]), triton.cdiv(n_in, meta["BLOCK_I"]), splits)
    _backproject_kernel[grid](
        dW, db if bias else dW, A, G, u, s, T, n_rows, n_in, n_out, triton.cdiv(n_rows, splits),
        A.stride(0), A.stride(1), A.stride(2), G.stride(0), G.stride(1), G.stride(2), G.stride(3),
        u.stride(0), u.stride(1),
        BIAS=bias, ACC=acc_dtype(u.dtype), PREC=precision, ATOMIC=splits > 1,
    )
    return dW, (db if bias else None)
