"""What the three kernels share: the interpreter switch, input checks, how a factor enters tl.dot,
and the tile Gram X_r X_cᵀ that both Gram kernels are built from."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..ops.precision import tf32_allowed

# triton.jit reads this when it decorates a kernel, so it is read once here too: the kernels of
# this package run on CPU tensors exactly when it was set before they were imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}
ACC_DTYPES = (torch.float32, torch.float64)


def check_device(*tensors: torch.Tensor) -> None:
    """Raise ValueError unless all tensors share one device the kernels can run on."""
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError(f"tensors are on several devices: {sorted({str(t.device) for t in tensors})}")
    if device.type == "cuda" or (device.type == "cpu" and INTERPRET):
        return
    raise ValueError(
        f"the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
        f"triton is imported), got tensors on {device}"
    )


def _check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in allowed]}, got {t.dtype}")


def check_inputs(acc_name: str, acc: torch.Tensor, A: torch.Tensor, G: torch.Tensor) -> None:
    """Raise ValueError unless `acc` (K or u) is fp32/fp64, the factors A and G are floating
    point of a dtype tl.dot takes, and all three share a device the kernels run on."""
    _check_dtype(acc_name, acc, ACC_DTYPES)
    _check_dtype("A", A, tuple(_TL_DTYPE))
    _check_dtype("G", G, tuple(_TL_DTYPE))
    check_device(acc, A, G)


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton dtype of an fp32/fp64 accumulator."""
    return _TL_DTYPE[dtype]


def operand(factor: torch.Tensor, acc: torch.dtype) -> tuple[tl.dtype, str]:
    """(dtype, input_precision) with which `factor` enters tl.dot when accumulating in `acc`.

    fp16/bf16 factors with an fp32 accumulator stay in their dtype (their products are exact in
    fp32, as in the torch backend, which upcasts first); bf16 is upcast under the interpreter,
    whose bf16 tl.dot is wrong. Everything else is computed in the accumulator's dtype. An fp32
    dot uses TF32 exactly when torch's CUDA matmuls do (`egn_fast.ops.precision.tf32_allowed`).
    """
    half = factor.dtype == torch.float16 or (factor.dtype == torch.bfloat16 and not INTERPRET)
    dtype = factor.dtype if half and acc == torch.float32 else acc
    # input_precision only matters for fp32 operands; others get Triton's default ("tf32")
    tf32 = dtype != torch.float32 or tf32_allowed()
    return _TL_DTYPE[dtype], "tf32" if tf32 else "ieee"


def gram_configs(tile: str) -> list[triton.Config]:
    """GPU autotuning candidates of a Gram kernel: square `tile` × `tile` output tiles, BLOCK_K
    features per tl.dot step."""
    return [
        triton.Config({tile: size, "BLOCK_K": block_k}, num_warps=size // 16, num_stages=3)
        for size in (64, 128)
        for block_k in (32, 64)
    ]


def configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """Autotuning candidates: `gpu` on a GPU; the single `interpreter` config under the interpreter
    (autotuning needs a GPU to time on, and few wide tiles keep the interpreter fast).
    EGN_FAST_TRITON_AUTOTUNE=0 keeps only gpu[0] (fewer compilations, e.g. for GPU test runs)."""
    if INTERPRET:
        return [interpreter]
    return gpu if os.environ.get("EGN_FAST_TRITON_AUTOTUNE", "1") != "0" else gpu[:1]


@triton.jit
def tile_gram(
    X, off_r, mask_r, off_c, mask_c, n, stride_n,
    OP: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Σ_f X[r, f] X[c, f] for the rows at element offsets off_r (R,) and off_c (C,) -> (R, C) in ACC.

    Masked rows and features load as 0, so they add nothing.
    """
    acc = tl.zeros((off_r.shape[0], off_c.shape[0]), ACC)
    for f0 in range(0, n, BLOCK_K):
        f = f0 + tl.arange(0, BLOCK_K)
        fm = f < n
        xr = tl.load(X + off_r[:, None] + f[None, :] * stride_n, mask=mask_r[:, None] & fm[None, :], other=0.0)
        xc = tl.load(X + off_c[:, None] + f[None, :] * stride_n, mask=mask_c[:, None] & fm[None, :], other=0.0)
        acc = tl.dot(xr.to(OP), tl.trans(xc.to(OP)), acc, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def add_symmetric(K, tile, rows, cols, row_mask, col_mask, stride_r, stride_c, mirror):
    """K[rows, cols] += tile, and, when `mirror` (an off-diagonal tile), K[cols, rows] += tileᵀ.

    Every program owns the K entries it touches, so plain loads and stores suffice.
    """
    mask = row_mask[:, None] & col_mask[None, :]
    ptr = K + rows[:, None] * stride_r + cols[None, :] * stride_c
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + tile, mask=mask)
    if mirror:
        ptr_t = K + cols[:, None] * stride_r + rows[None, :] * stride_c
        mask_t = col_mask[:, None] & row_mask[None, :]
        tl.store(ptr_t, tl.load(ptr_t, mask=mask_t, other=0.0) + tl.trans(tile), mask=mask_t)
