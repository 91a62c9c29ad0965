"""The torch backend: the reference implementation of the op set, and the fast CPU path.

Shapes (rows are sample-major: row i·s + k belongs to sample i and cotangent column k):
    A  (b, in)          dense layer input               A  (b, T, in)     sequence layer input
    G  (b, s, out)      dense output-gradients          G  (b, s, T, out) sequence output-gradients
    P  (b, s, n)        per-sample gradient rows (n = number of parameters of the layer)
    K  (m, m)           Gram, m = b·s; ops add their (symmetric) contribution to all of K but
                        compute only its lower triangle, strip by strip
    u  (b, s)           row-space coefficients of a back-projection J̃ᵀu
    v                   a parameter-space vector (one tensor per parameter) of a projection J̃v -> (b, s)

Factors may be bf16/fp16; every op computes in K's dtype (fp32 or fp64).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

# Largest temporary an op may allocate, in elements (64 MiB of fp32).
_TEMP_ELEMENTS = 1 << 24
# Row strips at most this tall tile the lower triangle of K (only it is computed; each strip's
# off-diagonal part is mirrored into the upper triangle).
_STRIP_ROWS = 256


def _strips(b: int, s: int, elems_per_sample_pair: int) -> Iterator[tuple[int, int]]:
    """Sample ranges [i0, i1) of row strips of the lower triangle: strip I covers columns [0, i1).

    The strip size is chosen so that (i1 − i0) · b · elems_per_sample_pair ≤ _TEMP_ELEMENTS.
    """
    per_strip = min(max(1, _STRIP_ROWS // s), max(1, _TEMP_ELEMENTS // max(1, b * elems_per_sample_pair)))
    for i0 in range(0, b, per_strip):
        yield i0, min(b, i0 + per_strip)


def _add_strip(K: Tensor, blk: Tensor, r0: int, r1: int) -> None:
    """K[r0:r1, :r1] += blk, and mirror its part left of the diagonal block into K[:r0, r0:r1]."""
    K[r0:r1, :r1] += blk
    if r0:
        K[:r0, r0:r1] += blk[:, :r0].T


def _row_gram(K: Tensor, X: Tensor, weights: Tensor | None, s: int) -> None:
    """K += (X Xᵀ) ∘ (weights ⊗ 1_{s×s}) for X (m, n) and weights (b, b) or None."""
    b = X.shape[0] // s
    if s == 1 and weights is not None and b <= _STRIP_ROWS:  # one strip, one sample per row: no views
        K.addcmul_(X @ X.T, weights)
        return
    for i0, i1 in _strips(b, s, s * s):
        blk = X[i0 * s : i1 * s] @ X[: i1 * s].T  # (bi·s, i1·s)
        if weights is None:
            _add_strip(K, blk, i0 * s, i1 * s)
        elif i0 == 0:  # nothing to mirror: weight and add in one pass
            K[: i1 * s, : i1 * s].view(i1, s, i1, s).addcmul_(blk.view(i1, s, i1, s), weights[:i1, None, :i1, None])
        else:
            blk.view(i1 - i0, s, i1, s).mul_(weights[i0:i1, None, :i1, None])
            _add_strip(K, blk, i0 * s, i1 * s)


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


def _ghost(K: Tensor, G: Tensor, input_kernel: Callable[[int, int], Tensor]) -> None:
    """K[(i,k),(j,l)] += Σ_{t,t'} (G_ik,t · G_jl,t') · M_ij[t, t'], strip by strip.

    G: (b, s, T, out); input_kernel(i0, i1) -> M (i1−i0, T, i1, T), the input-side kernel of
    samples [i0, i1) against samples [0, i1) (a_i,t · a_j,t' for a linear layer). Per strip: one GEMM for all (G_ik,t · G_jl,t'), then
    the product with M and the sum over t, t'. Cost m²T²·out + b²T²·in, one (strip·T)×(m·T)
    temporary.
    """
    b, s, T, out = G.shape
    X = G.to(K.dtype).reshape(b * s * T, out)
    for i0, i1 in _strips(b, s, s * s * T * T):
        GG = X[i0 * s * T : i1 * s * T] @ X[: i1 * s * T].T  # (bi·s·T, i1·s·T)
        GG = GG.view(i1 - i0, s, T, i1, s, T).mul_(input_kernel(i0, i1)[:, None, :, :, None, :])
        _add_strip(K, GG.sum((2, 5)).view((i1 - i0) * s, i1 * s), i0 * s, i1 * s)


def gram_seq(K: Tensor, A: Tensor, G: Tensor, bias: bool) -> None:
    """Ghost Gram of a layer applied at T positions: K += Σ_{t,t'} (G_ik,t·G_jm,t')(a_i,t·a_j,t').

    A: (b, T, in), G: (b, s, T, out). With a bias, adds (Σ_t G)(Σ_t G)ᵀ.
    """
    b, T, n_in = A.shape
    A_flat = A.to(K.dtype).reshape(b * T, n_in)

    def input_kernel(i0: int, i1: int) -> Tensor:
        return (A_flat[i0 * T : i1 * T] @ A_flat[: i1 * T].T).view(i1 - i0, T, i1, T)

    _ghost(K, G, input_kernel)
    if bias:
        _row_gram(K, G.to(K.dtype).sum(2).reshape(b * G.shape[1], -1), None, G.shape[1])


def gram_embedding(K: Tensor, tokens: Tensor, G: Tensor) -> None:
    """Gram of an embedding table: K += Σ_{t,t'} [tok_i,t = tok_j,t'] (G_ik,t · G_jm,t').

    tokens: (b, T) integer, G: (b, s, T, dim) (rows of padding tokens already zeroed).
    """

    def input_kernel(i0: int, i1: int) -> Tensor:
        return (tokens[i0:i1, :, None, None] == tokens[None, None, :i1, :]).to(K.dtype)

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
    if s == 1:  # one row per sample: a scaling, not b tiny GEMMs
        U = (G.to(u.dtype).reshape(b, T * out) * u).view(b * T, out)
    else:
        U = torch.bmm(u.unsqueeze(1), G.to(u.dtype).reshape(b, s, T * out)).view(b * T, out)
    dW = U.T @ A.to(u.dtype).reshape(b * T, -1)
    return dW, (U.sum(0) if bias else None)


def per_sample_embedding(tokens: Tensor, G: Tensor, num_embeddings: int, dtype: torch.dtype) -> Tensor:
    """Per-sample gradients of an embedding table: row tok_i,t of P_ik gets G_ik,t -> (b, s, num_embeddings, dim).

    tokens: (b, T), G: (b, s, T, dim).
    """
    b, s, T, dim = G.shape
    P = torch.zeros(b, s, num_embeddings, dim, dtype=dtype, device=G.device)
    return P.scatter_add_(2, tokens[:, None, :, None].expand(b, s, T, dim), G.to(dtype))


def backproject_per_sample(P: Tensor, u: Tensor) -> Tensor:
    """J̃ᵀu from per-sample gradient rows: Σ_{i,k} u_ik P_ik. P: (b, s, *shape), u: (b, s) -> (*shape),
    in u's dtype."""
    return torch.tensordot(u, P.to(u.dtype), dims=2)


def backproject_embedding(tokens: Tensor, G: Tensor, u: Tensor, num_embeddings: int) -> Tensor:
    """J̃ᵀu for an embedding table: scatter-add of Σ_k u_ik G_ik,t into row tok_i,t.

    tokens: (b, T), G: (b, s, T, dim), u: (b, s) -> (num_embeddings, dim).
    """
    b, s, T, dim = G.shape
    U = torch.bmm(u.unsqueeze(1), G.to(u.dtype).reshape(b, s, T * dim)).view(b * T, dim)
    return torch.zeros(num_embeddings, dim, dtype=u.dtype, device=u.device).index_add_(0, tokens.reshape(-1), U)


def project(A: Tensor, G: Tensor, dW: Tensor, db: Tensor | None, dtype: torch.dtype) -> Tensor:
    """J̃v for a (sequence) linear layer: (J̃v)_ik = Σ_t G_ik,t · (dW a_i,t + db) -> (b, s).

    A: (b, T, in), G: (b, s, T, out), dW: (out, in), db: (out,) or None. Cost b·T·in·out (one
    GEMM, the forward of the layer along v) + b·s·T·out; computes in `dtype`.
    """
    b, s, T, out = G.shape
    Z = A.to(dtype).reshape(b * T, -1) @ dW.to(dtype).T  # (b·T, out)
    if db is not None:
        Z += db.to(dtype)
    return torch.bmm(G.to(dtype).reshape(b, s, T * out), Z.view(b, T * out, 1)).squeeze(2)


def project_embedding(tokens: Tensor, G: Tensor, dE: Tensor, dtype: torch.dtype) -> Tensor:
    """J̃v for an embedding table: (J̃v)_ik = Σ_t G_ik,t · dE[tok_i,t] -> (b, s).

    tokens: (b, T), G: (b, s, T, dim), dE: (num_embeddings, dim); computes in `dtype`.
    """
    b, s, T, dim = G.shape
    Z = dE.to(dtype)[tokens.reshape(-1)].view(b, T * dim, 1)
    return torch.bmm(G.to(dtype).reshape(b, s, T * dim), Z).squeeze(2)


def project_per_sample(P: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
    """J̃v from per-sample gradient rows: (J̃v)_ik = ⟨P_ik, v⟩. P: (b, s, *shape), v: (*shape) -> (b, s)."""
    b, s = P.shape[:2]
    return P.to(dtype).reshape(b, s, -1) @ v.to(dtype).reshape(-1)


def cholesky_solve(A: Tensor, B: Tensor) -> tuple[Tensor | None, int]:
    """Solve A X = B for SPD A (m, m) by Cholesky; B (m, k). Returns (X, 0), or (None, info > 0)
    when the factorization breaks down at column `info` (A is not numerically SPD)."""
    L, info = torch.linalg.cholesky_ex(A)
    info = int(info)
    if info:
        return None, info
    # two triangular solves: torch.cholesky_solve copies L through tril first (slower on CPU)
    Y = torch.linalg.solve_triangular(L, B, upper=False)
    return torch.linalg.solve_triangular(L.mT, Y, upper=True), 0


def cholesky_batched(A: Tensor) -> tuple[Tensor, Tensor]:
    """Cholesky factors of a batch of SPD matrices A (batch, n, n) -> (L, info): L (batch, n, n)
    lower triangular with L Lᵀ = A, info (batch,) int32, > 0 where a matrix is not numerically SPD."""
    return torch.linalg.cholesky_ex(A)


def eigh(A: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric eigendecomposition of A (m, m) -> (evals (m,) ascending, evecs (m, m) with the
    eigenvectors as columns)."""
    return torch.linalg.eigh(A)
