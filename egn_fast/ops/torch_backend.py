"""The torch backend: the reference implementation of the op set, and the fast CPU path.

Shapes (rows are sample-major: row i·s + k belongs to sample i and cotangent column k):
    A  (b, in)          dense layer input               A  (b, T, in)     sequence layer input
    G  (b, s, out)      dense output-gradients          G  (b, s, T, out) sequence output-gradients
    P  (b, s, n)        per-sample gradient rows (n = number of parameters of the layer)
    K  (m, m)           Gram, m = b·s; ops add into its lower triangle (the strict upper triangle
                        is scratch: `symmetrize_` mirrors the lower one when all layers are in)
    u  (b, s)           row-space coefficients of a back-projection J̃ᵀu

Factors may be bf16/fp16; every op computes in K's dtype (fp32 or fp64).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

# Largest temporary an op may allocate, in elements (64 MiB of fp32).
_TEMP_ELEMENTS = 1 << 24
# Row strips this tall (or taller, to fit a whole sample) tile the lower triangle; a Gram with
# at most this many rows is one GEMM.
_STRIP_ROWS = 1024


def _strips(b: int, s: int, elems_per_sample_pair: int) -> Iterator[tuple[int, int]]:
    """Sample ranges [i0, i1) of row strips of the lower triangle: strip I covers columns [0, i1).

    The strip size is chosen so that (i1 − i0) · b · elems_per_sample_pair ≤ _TEMP_ELEMENTS.
    """
    per_strip = min(max(1, _STRIP_ROWS // s), max(1, _TEMP_ELEMENTS // max(1, b * elems_per_sample_pair)))
    for i0 in range(0, b, per_strip):
        yield i0, min(b, i0 + per_strip)


def _row_gram(K: Tensor, X: Tensor, weights: Tensor | None, s: int) -> None:
    """K[lower] += (X Xᵀ) ∘ (weights ⊗ 1_{s×s}) for X (m, n) and weights (b, b) or None."""
    b = X.shape[0] // s
    for i0, i1 in _strips(b, s, s * s):
        blk = X[i0 * s : i1 * s] @ X[: i1 * s].T  # (bi·s, i1·s)
        if weights is not None:
            blk = blk.view(i1 - i0, s, i1, s).mul_(weights[i0:i1, None, :i1, None]).view_as(blk)
        K[i0 * s : i1 * s, : i1 * s] += blk


def gram_dense(K: Tensor, A: Tensor, G: Tensor, bias: bool) -> None:
    """K += (G Gᵀ) ∘ expand(A Aᵀ + bias) for a dense layer.

    A: (b, in), G: (b, s, out), bias: whether the layer has a bias (adds 1 to A Aᵀ).
    """
    b, s, out = G.shape
    A = A.to(K.dtype)
    AA = A @ A.T
    if bias:
        AA += 1.0
    _row_gram(K, G.reshape(b * s, out).to(K.dtype), AA, s)


def _ghost(K: Tensor, G: Tensor, input_kernel: Callable[[int, int, int], Tensor]) -> None:
    """K[(i,k),(j,l)] += Σ_{t,t'} (G_ik,t · G_jl,t') · M_ij[t, t'] without any (m·T)² temporary.

    G: (b, s, T, out); input_kernel(i0, i1, j1) -> M (i1−i0, j1, T, T), the input-side kernel
    (a_i,t · a_j,t' for a linear layer). Contracted as K_ij = G_i · (M_ij G_j): cost
    b²·s·T²·out + m²·T·out instead of m²·T²·out.
    """
    b, s, T, out = G.shape
    G = G.to(K.dtype)
    Gt = G.permute(0, 2, 1, 3).reshape(b, T, s * out)  # (b, T, s·out)
    for i0, i1 in _strips(b, s, T * T + T * s * out):
        M = input_kernel(i0, i1, i1)  # (bi, bj, T, T)
        Y = torch.matmul(M, Gt[:i1].unsqueeze(0)).view(i1 - i0, i1, T, s, out)
        blk = torch.einsum("ikto,ijtlo->ikjl", G[i0:i1], Y)
        K[i0 * s : i1 * s, : i1 * s] += blk.reshape((i1 - i0) * s, i1 * s)


def gram_seq(K: Tensor, A: Tensor, G: Tensor, bias: bool) -> None:
    """Ghost Gram of a layer applied at T positions: K += Σ_{t,t'} (G_ik,t·G_jm,t')(a_i,t·a_j,t').

    A: (b, T, in), G: (b, s, T, out). With a bias, adds (Σ_t G)(Σ_t G)ᵀ.
    """
    b, T, n_in = A.shape
    A = A.to(K.dtype)
    A_flat = A.reshape(b * T, n_in)

    def input_kernel(i0: int, i1: int, j1: int) -> Tensor:
        M = A_flat[i0 * T : i1 * T] @ A_flat[: j1 * T].T
        return M.view(i1 - i0, T, j1, T).transpose(1, 2)

    _ghost(K, G, input_kernel)
    if bias:
        _row_gram(K, G.to(K.dtype).sum(2).reshape(b * G.shape[1], -1), None, G.shape[1])


def gram_embedding(K: Tensor, tokens: Tensor, G: Tensor) -> None:
    """Gram of an embedding table: K += Σ_{t,t'} [tok_i,t = tok_j,t'] (G_ik,t · G_jm,t').

    tokens: (b, T) integer, G: (b, s, T, dim) (rows of padding tokens already zeroed).
    """

    def input_kernel(i0: int, i1: int, j1: int) -> Tensor:
        eq = tokens[i0:i1, None, :, None] == tokens[None, :j1, None, :]
        return eq.to(K.dtype)

    _ghost(K, G, input_kernel)


def gram_per_sample(K: Tensor, P: Tensor) -> None:
    """K += P Pᵀ for per-sample gradient rows P: (b, s, n)."""
    b, s, n = P.shape
    _row_gram(K, P.reshape(b * s, n).to(K.dtype), None, s)


def per_sample_seq(A: Tensor, G: Tensor, dtype: torch.dtype) -> Tensor:
    """Per-sample gradients of a sequence layer: P_ik = Σ_t G_ik,t a_i,tᵀ -> (b, s, out, in).

    A: (b, T, in), G: (b, s, T, out).
    """
    b, s, T, out = G.shape
    Gt = G.to(dtype).transpose(2, 3).reshape(b, s * out, T)
    return torch.bmm(Gt, A.to(dtype)).view(b, s, out, A.shape[2])


def backproject(A: Tensor, G: Tensor, u: Tensor, bias: bool) -> tuple[Tensor, Tensor | None]:
    """J̃ᵀu for a (sequence) linear layer: dW = Σ_{i,t} (Σ_k u_ik G_ik,t) a_i,tᵀ, db = Σ_{i,k,t} u_ik G_ik,t.

    A: (b, T, in), G: (b, s, T, out), u: (b, s) -> dW (out, in), db (out,) or None.
    Computes in u's dtype.
    """
    b, s, T, out = G.shape
    U = torch.bmm(u.unsqueeze(1), G.to(u.dtype).reshape(b, s, T * out)).view(b * T, out)
    dW = U.T @ A.to(u.dtype).reshape(b * T, -1)
    return dW, (U.sum(0) if bias else None)


def backproject_embedding(tokens: Tensor, G: Tensor, u: Tensor, num_embeddings: int) -> Tensor:
    """J̃ᵀu for an embedding table: scatter-add of Σ_k u_ik G_ik,t into row tok_i,t.

    tokens: (b, T), G: (b, s, T, dim), u: (b, s) -> (num_embeddings, dim).
    """
    b, s, T, dim = G.shape
    U = torch.bmm(u.unsqueeze(1), G.to(u.dtype).reshape(b, s, T * dim)).view(b * T, dim)
    return torch.zeros(num_embeddings, dim, dtype=u.dtype, device=u.device).index_add_(0, tokens.reshape(-1), U)


def cholesky_solve(A: Tensor, B: Tensor) -> tuple[Tensor | None, int]:
    """Solve A X = B for SPD A (m, m) by Cholesky; B (m, k). Returns (X, 0), or (None, info > 0)
    when the factorization breaks down at column `info` (A is not numerically SPD)."""
    L, info = torch.linalg.cholesky_ex(A)
    info = int(info)
    if info:
        return None, info
    return torch.cholesky_solve(B, L), 0


def symmetrize(K: Tensor) -> Tensor:
    """The symmetric matrix whose lower triangle is K's."""
    L = K.tril()
    return L.add_(L.tril(-1).mT)
