"""The "cuda" backend: the CUDA extension egn_fast._C (csrc/).

Overrides, with the shapes of `torch_backend`:
    gram_dense, gram_per_sample   Gram kernels: tensor cores (wmma) for fp16/bf16 factors and for
                                  fp32 when torch's fp32 matmuls may use TF32 (`precision.tf32_allowed`,
                                  either torch API), exact FMA for fp32 otherwise and for fp64; K accumulates in
                                  its own dtype (fp32/fp64)
    backproject                   fused back-projection (U = Σ_k u_k G_k formed while loading), exact FMA
    cholesky_solve                cuSOLVER potrf + potrs; info > 0 feeds the jitter retry of solve.py
    cholesky_batched              cuSOLVER potrfBatched
    eigh                          cuSOLVER syevd
The other ops (gram_seq, gram_embedding, backproject_embedding) are the torch ones, on the GPU.
Every op needs CUDA tensors and raises ValueError otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import Backend
from .precision import tf32_allowed

try:
    from .. import _C
except ImportError as error:
    raise ImportError(
        "backend 'cuda' needs the CUDA extension egn_fast._C, which is not built: reinstall egn_fast "
        "with a CUDA toolkit (nvcc) and a CUDA build of torch present (see README)"
    ) from error

__all__ = ["CudaBackend"]

# Factor dtypes the kernels read directly, per accumulation dtype; others are converted first.
_GRAM_FACTOR_DTYPES = {torch.float32: (torch.float16, torch.bfloat16, torch.float32), torch.float64: (torch.float64,)}


def _factor(X: Tensor, acc_dtype: torch.dtype) -> Tensor:
    """X as the kernels read it: contiguous, in a dtype they take for `acc_dtype` accumulation."""
    if X.dtype not in _GRAM_FACTOR_DTYPES.get(acc_dtype, ()):
        X = X.to(acc_dtype)
    return X.contiguous()


class CudaBackend(Backend):
    """Gram, back-projection and the dense solves through egn_fast._C."""

    name = "cuda"

    @staticmethod
    def supports(device: torch.device) -> bool:
        return device.type == "cuda"

    @staticmethod
    def gram_dense(K: Tensor, A: Tensor, G: Tensor, bias: bool) -> None:
        """K += (G Gᵀ) ∘ expand(A Aᵀ + bias). A: (b, in), G: (b, s, out), K: (b·s, b·s) contiguous."""
        b, s, out = G.shape
        AA = torch.zeros(b, b, dtype=K.dtype, device=K.device)
        _C.gram_rows(AA, _factor(A, K.dtype), None, 1, 0.0, tf32_allowed())
        _C.gram_rows(K, _factor(G.reshape(b * s, out), K.dtype), AA, s, 1.0 if bias else 0.0, tf32_allowed())

    @staticmethod
    def gram_per_sample(K: Tensor, P: Tensor) -> None:
        """K += P Pᵀ for per-sample gradient rows P: (b, s, n)."""
        b, s, n = P.shape
        _C.gram_rows(K, _factor(P.reshape(b * s, n), K.dtype), None, s, 0.0, tf32_allowed())

    @staticmethod
    def backproject(A: Tensor, G: Tensor, u: Tensor, bias: bool) -> tuple[Tensor, Tensor | None]:
        """J̃ᵀu of a (sequence) linear layer. A: (b, T, in), G: (b, s, T, out), u: (b, s) fp32/fp64
        -> dW (out, in), db (out,) or None, in u's dtype."""
        if u.dtype not in _GRAM_FACTOR_DTYPES:
            raise ValueError(f"backproject: u must be float32 or float64, got {u.dtype}")
        # one factor dtype for A and G, read directly by the kernel when it can
        factor_dtype = A.dtype if A.dtype == G.dtype else u.dtype
        A = _factor(A.to(factor_dtype), u.dtype)
        G = _factor(G.to(A.dtype), u.dtype)
        return _C.backproject(A, G, u.contiguous(), bias)

    @staticmethod
    def cholesky_solve(A: Tensor, B: Tensor) -> tuple[Tensor | None, int]:
        """Solve A X = B for SPD A (m, m), B (m, k) by cuSOLVER: (X, 0), or (None, info > 0)."""
        return _C.cholesky_solve(A.contiguous(), B.contiguous())

    @staticmethod
    def cholesky_batched(A: Tensor) -> tuple[Tensor, Tensor]:
        """(L, info) for A (batch, n, n) by cuSOLVER potrfBatched; info (batch,) int32."""
        return _C.cholesky_batched(A.contiguous())

    @staticmethod
    def eigh(A: Tensor) -> tuple[Tensor, Tensor]:
        """(evals ascending, evecs as columns) of symmetric A (m, m) by cuSOLVER syevd."""
        return _C.eigh(A.contiguous())
