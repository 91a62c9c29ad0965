"""The factor types rules return: a layer's share of the rows J̃ (m = b·s rows, sample-major:
row i·s + k is sample i, cotangent column k), kept as activations and output-gradients.

| type              | holds                                                      | Gram op                                   |
|-------------------|------------------------------------------------------------|-------------------------------------------|
| `SeqFactors`      | per group: A (b, T, in) inputs, G (b, s, T, out) output-gradients | gram_dense (T = 1), gram_seq (ghost) or per_sample_seq + gram_per_sample |
| `EmbeddingFactors`| tokens (b, T), G (b, s, T, dim)                            | gram_embedding (ghost) or per_sample_embedding + gram_per_sample |
| `PerSampleFactors`| per parameter p: rows P_p (b, s, *p.shape)                 | gram_per_sample                           |

Every computation on factors goes through the op set (`egn_fast.ops.Backend`), so an
accelerated backend speeds up every rule that returns these types.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor, nn

from ..ops import Backend

__all__ = ["Factors", "SeqFactors", "EmbeddingFactors", "PerSampleFactors", "merge_shared", "choose_seq_method", "concat"]

# The per-sample method is not chosen when its m·out·in per-sample gradients exceed this
# many elements (1 GiB of fp32).
_PER_SAMPLE_MAX_ELEMENTS = 1 << 28
# Per-sample gradients computed for the Gram are kept for the back-projection and J̃v (m·n
# work instead of b·T·n) when they are at most this many times the factors' size.
_KEEP_ROWS_FACTOR = 4


def concat(parts: list[Tensor], dim: int) -> Tensor:
    """torch.cat that does not copy a single part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


class Factors:
    """A layer's share of J̃, kept as factors. params: the parameters these rows cover."""

    params: list[nn.Parameter]

    def add_gram(self, K: Tensor, backend: Backend) -> None:
        """K (m, m) += this layer's J̃_l J̃_lᵀ (symmetric; ops compute the lower triangle and mirror it)."""
        raise NotImplementedError

    def backproject(self, u: Tensor, backend: Backend) -> list[Tensor]:
        """J̃_lᵀu for u (b, s): one tensor per parameter of `params`, in u's dtype."""
        raise NotImplementedError

    def backproject_rows(self, u: Tensor, backend: Backend, rows: list[slice]) -> list[Tensor]:
        """Rows rows[q] (dimension 0) of J̃_lᵀu per parameter, a rank's shard (egn_fast.dtensors): by
        default the whole back-projection, cut; the built-in types compute only those rows."""
        return [d[r] for d, r in zip(self.backproject(u, backend), rows)]

    def per_sample_grads(self, backend: Backend, dtype: torch.dtype) -> list[Tensor]:
        """Rows of J̃_l per parameter: (b, s, *param.shape), in `dtype`."""
        raise NotImplementedError

    def project(self, v: list[Tensor], backend: Backend, dtype: torch.dtype) -> Tensor:
        """J̃_l v for v one tensor per parameter of `params` (their shapes): (b, s) in `dtype`.
        The adjoint of `backproject`; Monte-Carlo rows need it for J̃g (egn_fast.system)."""
        raise NotImplementedError(f"{type(self).__name__} has no project(v) (J̃v), which curvature='mc' needs")

    def project_rows(self, v: list[Tensor], backend: Backend, dtype: torch.dtype, rows: list[slice]) -> Tensor:
        """(b, s): the share of rows rows[q] of each parameter in J̃_l v, v[q] those rows only; summed
        over the ranks' shards it is J̃_l v. Built-in types only (others: J̃v takes v whole)."""
        raise NotImplementedError(f"{type(self).__name__} has no project_rows")


@lru_cache(maxsize=4096)
def choose_seq_method(b: int, s: int, T: int, n_in: int, n_out: int) -> str:
    """"ghost" or "per_sample" for a layer applied at T positions, by multiply-add count
    (both are GEMM-bound; memory decides only when per-sample gradients would not fit).

    ghost:      m²T²·out + b²T²·in     (no per-sample gradient stored)
    per_sample: m·T·out·in + m²·out·in (stores m·out·in numbers)
    """
    m = b * s
    ghost = m * m * T * T * n_out + b * b * T * T * n_in
    per_sample = m * T * n_out * n_in + m * m * n_out * n_in
    if m * n_out * n_in > _PER_SAMPLE_MAX_ELEMENTS:
        return "ghost"
    return "ghost" if ghost <= per_sample else "per_sample"


class SeqFactors(Factors):
    """Linear / convolution factors, one (A, G) pair per group (a grouped convolution has several).

    A: (b, T, in_g) inputs (unfolded patches for a convolution), G: (b, s, T, out_g).
    T = 1 is the dense case. weight (out, in_g·groups…) / bias (out,) are None when held fixed;
    transposed: the weight is stored (in, out) (Hugging Face's Conv1D: y = x W + b; one group).
    seq_method: "auto" (cost model per layer) | "ghost" | "per_sample".
    """

    def __init__(
        self,
        weight: nn.Parameter | None,
        bias: nn.Parameter | None,
        groups: list[tuple[Tensor, Tensor]],
        seq_method: str = "auto",
        transposed: bool = False,
    ):
        if transposed and len(groups) != 1:
            raise ValueError("a transposed weight has one group")
        self.weight, self.bias, self.groups = weight, bias, groups
        self.params = [p for p in (weight, bias) if p is not None]
        self.seq_method = seq_method
        self.transposed = transposed
        self.rows: list[Tensor] | None = None  # per group P (b, s, out_g, in_g), kept by add_gram
        self._bias_rows: list[Tensor] | None = None

    def bias_rows(self) -> list[Tensor]:
        """Per group Σ_t G (b, s, out_g): the bias's per-sample rows (computed once)."""
        if self._bias_rows is None:
            self._bias_rows = [G.sum(2) for _, G in self.groups]
        return self._bias_rows
    def _weight_view(self, dW: Tensor) -> Tensor:
        """(out, in_g·groups…) rows of the weight -> the weight's own shape."""
        return dW.T if self.transposed else dW.view(self.weight.shape)

    def method(self) -> str:
        """"dense" (T = 1), "ghost" or "per_sample"."""
        A, G = self.groups[0]
        b, s, T, n_out = G.shape
        if T == 1:
            return "dense"
        if self.seq_method != "auto":
            return self.seq_method
        return choose_seq_method(b, s, T, A.shape[2], n_out)

    def add_gram(self, K: Tensor, backend: Backend) -> None:
        method = self.method()
        has_bias = self.bias is not None
        rows = []
        for g, (A, G) in enumerate(self.groups):
            if self.weight is None:
                backend.gram_per_sample(K, self.bias_rows()[g])
            elif method == "dense":
                backend.gram_dense(K, A[:, 0], G[:, :, 0], has_bias)
            elif method == "ghost":
                backend.gram_seq(K, A, G, has_bias)
            elif method == "per_sample":
                P = backend.per_sample_seq(A, G, K.dtype)
                backend.gram_per_sample(K, P.flatten(2))
                if P.numel() <= _KEEP_ROWS_FACTOR * (A.numel() + G.numel()):
                    rows.append(P)
                if has_bias:  # a Gram of its own: cheaper than concatenating to P
                    backend.gram_per_sample(K, self.bias_rows()[g])
            else:
                raise ValueError(f"unknown sequence method {method!r}; expected 'auto', 'ghost' or 'per_sample'")
        self.rows = rows if rows and len(rows) == len(self.groups) else None

    def backproject(self, u: Tensor, backend: Backend) -> list[Tensor]:
        if self.rows is not None:  # Σ_ik u_ik P_ik: m·out·in instead of b·T·out·in
            parts = [
                (backend.backproject_per_sample(P, u), None if self.bias is None else backend.backproject_per_sample(G_sum, u))
                for P, G_sum in zip(self.rows, self.bias_rows())
            ]
        else:
            parts = [backend.backproject(A, G, u, self.bias is not None) for A, G in self.groups]
        out = []
        if self.weight is not None:
            out.append(self._weight_view(concat([dW for dW, _ in parts], 0)))
        if self.bias is not None:
            out.append(concat([db for _, db in parts], 0))
        return out

    def backproject_rows(self, u: Tensor, backend: Backend, rows: list[slice]) -> list[Tensor]:
        if len(self.groups) != 1:
            return super().backproject_rows(u, backend, rows)
        (A, G), kept = self.groups[0], self.rows[0] if self.rows is not None else None
        out, rs = [], iter(rows)
        if self.weight is not None:
            r = next(rs)  # rows of the weight: outputs, or inputs for a transposed (in, out) weight
            if kept is not None:
                P = kept[:, :, :, r] if self.transposed else kept[:, :, r]
                dW = backend.backproject_per_sample(P, u)
            else:
                dW = backend.backproject(A[..., r], G, u, False)[0] if self.transposed else backend.backproject(A, G[..., r], u, False)[0]
            out.append(dW.T if self.transposed else dW.view(-1, *self.weight.shape[1:]))
        if self.bias is not None:
            out.append(backend.backproject_per_sample(self.bias_rows()[0][:, :, next(rs)], u))
        return out

    def project(self, v: list[Tensor], backend: Backend, dtype: torch.dtype) -> Tensor:
        vs = iter(v)
        dW = next(vs) if self.weight is not None else None
        db = next(vs) if self.bias is not None else None
        if dW is not None:
            dW = dW.T if self.transposed else dW.reshape(dW.shape[0], -1)
        total = 0
        for i, ((A, G), G_sum) in enumerate(zip(self.groups, self.bias_rows())):
            n_out = G.shape[3]
            rows = slice(i * n_out, (i + 1) * n_out)
            dW_g = None if dW is None else dW[rows]
            db_g = None if db is None else db[rows]
            if dW_g is not None and self.rows is None:  # one GEMM along v: Σ_t G_ik,t · (dW a_i,t + db)
                total = total + backend.project(A, G, dW_g, db_g, dtype)
                continue
            if dW_g is not None:  # kept per-sample rows: ⟨P_ik, dW⟩
                total = total + backend.project_per_sample(self.rows[i], dW_g, dtype)
            if db_g is not None:  # the bias's rows Σ_t G_ik,t
                total = total + backend.project_per_sample(G_sum, db_g, dtype)
        return total

    def project_rows(self, v: list[Tensor], backend: Backend, dtype: torch.dtype, rows: list[slice]) -> Tensor:
        if len(self.groups) != 1:
            raise NotImplementedError("a grouped layer's rows span several groups")
        (A, G), kept = self.groups[0], self.rows[0] if self.rows is not None else None
        total, vs, rs = 0, iter(v), iter(rows)
        if self.weight is not None:
            dW, r = next(vs), next(rs)  # this rank's rows of the weight: outputs, or inputs when transposed
            P = None if kept is None else kept[:, :, :, r] if self.transposed else kept[:, :, r]
            dW = dW.T if self.transposed else dW.reshape(dW.shape[0], A.shape[2])  # (out, |r|) or (|r|, in)
            if P is not None:
                total = backend.project_per_sample(P, dW, dtype)
            else:
                total = backend.project(A[..., r], G, dW, None, dtype) if self.transposed else backend.project(A, G[..., r], dW, None, dtype)
        if self.bias is not None:
            total = total + backend.project_per_sample(self.bias_rows()[0][:, :, next(rs)], next(vs), dtype)
        return total

    def per_sample_grads(self, backend: Backend, dtype: torch.dtype) -> list[Tensor]:
        b, s = self.groups[0][1].shape[:2]
        out = []
        if self.weight is not None:
            P = concat([backend.per_sample_seq(A, G, dtype).flatten(3) for A, G in self.groups], 2)
            out.append(P.transpose(2, 3) if self.transposed else P.view(b, s, *self.weight.shape))
        if self.bias is not None:
            out.append(concat([G_sum.to(dtype) for G_sum in self.bias_rows()], 2))
        return out


class EmbeddingFactors(Factors):
    """weight (num_embeddings, dim); tokens (b, T) and G (b, s, T, dim), the rows of padding
    tokens zeroed."""

    def __init__(self, weight: nn.Parameter, tokens: Tensor, G: Tensor):
        self.weight, self.tokens, self.G = weight, tokens, G
        self.params = [weight]
        self.rows: Tensor | None = None  # P (b, s, num_embeddings, dim), kept by add_gram

    def method(self) -> str:
        """"ghost" (m²T²·dim) or "per_sample" (m·T·dim + m²·num_embeddings·dim, when its rows
        fit in memory): a small table (positions, characters) is cheaper as per-sample rows."""
        b, s, T, dim = self.G.shape
        num = self.weight.shape[0]
        if b * s * num * dim > _PER_SAMPLE_MAX_ELEMENTS or num >= T * T:
            return "ghost"
        return "per_sample"

    def add_gram(self, K: Tensor, backend: Backend) -> None:
        if self.method() == "ghost":
            backend.gram_embedding(K, self.tokens, self.G)
            return
        P = backend.per_sample_embedding(self.tokens, self.G, self.weight.shape[0], K.dtype)
        backend.gram_per_sample(K, P.flatten(2))
        if P.numel() <= _KEEP_ROWS_FACTOR * self.G.numel():
            self.rows = P

    def backproject(self, u: Tensor, backend: Backend) -> list[Tensor]:
        if self.rows is not None:
            return [backend.backproject_per_sample(self.rows, u)]
        return [backend.backproject_embedding(self.tokens, self.G, u, self.weight.shape[0])]

    def backproject_rows(self, u: Tensor, backend: Backend, rows: list[slice]) -> list[Tensor]:
        if self.rows is not None:
            return [backend.backproject_per_sample(self.rows[:, :, rows[0]], u)]
        tokens, G = self._inside(rows[0])
        return [backend.backproject_embedding(tokens, G, u, len(range(*rows[0].indices(self.weight.shape[0]))))]

    def per_sample_grads(self, backend: Backend, dtype: torch.dtype) -> list[Tensor]:
        return [backend.per_sample_embedding(self.tokens, self.G, self.weight.shape[0], dtype)]

    def project(self, v: list[Tensor], backend: Backend, dtype: torch.dtype) -> Tensor:
        if self.rows is not None:
            return backend.project_per_sample(self.rows, v[0], dtype)
        return backend.project_embedding(self.tokens, self.G, v[0], dtype)

    def project_rows(self, v: list[Tensor], backend: Backend, dtype: torch.dtype, rows: list[slice]) -> Tensor:
        if self.rows is not None:
            return backend.project_per_sample(self.rows[:, :, rows[0]], v[0], dtype)
        tokens, G = self._inside(rows[0])
        return backend.project_embedding(tokens, G, v[0], dtype)

    def _inside(self, rows: slice) -> tuple[Tensor, Tensor]:
        """(tokens − lo, G) with the tokens outside rows [lo, hi) of the table mapped to row 0 and
        their G zeroed: they touch none of those rows."""
        lo, hi, _ = rows.indices(self.weight.shape[0])
        inside = (self.tokens >= lo) & (self.tokens < hi)
        return torch.where(inside, self.tokens - lo, 0), self.G * inside[:, None, :, None].to(self.G.dtype)


class PerSampleFactors(Factors):
    """Per-sample gradient rows: P[q] (b, s, *params[q].shape) for each parameter params[q]."""

    def __init__(self, params: list[nn.Parameter], P: list[Tensor]):
        self.params, self.P = params, P

    def add_gram(self, K: Tensor, backend: Backend) -> None:
        # one Gram per parameter (they add up): concatenating the rows would copy all of them
        for P in self.P:
            backend.gram_per_sample(K, P.reshape(*P.shape[:2], -1))  # 0-dim params too

    def backproject(self, u: Tensor, backend: Backend) -> list[Tensor]:
        return [backend.backproject_per_sample(P, u) for P in self.P]

    def backproject_rows(self, u: Tensor, backend: Backend, rows: list[slice]) -> list[Tensor]:
        return [backend.backproject_per_sample(P[:, :, r], u) for P, r in zip(self.P, rows)]

    def per_sample_grads(self, backend: Backend, dtype: torch.dtype) -> list[Tensor]:
        return [P.to(dtype) for P in self.P]

    def project(self, v: list[Tensor], backend: Backend, dtype: torch.dtype) -> Tensor:
        return sum(backend.project_per_sample(P, x, dtype) for P, x in zip(self.P, v))

    def project_rows(self, v: list[Tensor], backend: Backend, dtype: torch.dtype, rows: list[slice]) -> Tensor:
        return sum(backend.project_per_sample(P[:, :, r], x, dtype) for P, x, r in zip(self.P, v, rows))


def merge_shared(factors: list[Factors], backend: Backend, dtype: torch.dtype) -> list[Factors]:
    """Parameters shared by several layers (tied across different modules): their rows are the
    sums of each layer's rows, so those layers are merged into one PerSampleFactors."""
    owners: dict[int, list[int]] = {}
    for i, f in enumerate(factors):
        for p in f.params:
            owners.setdefault(id(p), []).append(i)
    shared = {i for idx in owners.values() if len(idx) > 1 for i in idx}
    if not shared:
        return factors
    # Close the set: a merged layer pulls in every other layer that shares any of its parameters.
    changed = True
    while changed:
        changed = False
        for idx in owners.values():
            if shared.intersection(idx) and not shared.issuperset(idx):
                shared.update(idx)
                changed = True
    params: list[nn.Parameter] = []
    rows: dict[int, Tensor] = {}
    for i in sorted(shared):
        for p, P in zip(factors[i].params, factors[i].per_sample_grads(backend, dtype)):
            if id(p) in rows:
                rows[id(p)] = rows[id(p)] + P
            else:
                params.append(p)
                rows[id(p)] = P
    merged = PerSampleFactors(params, [rows[id(p)] for p in params])
    return [f for i, f in enumerate(factors) if i not in shared] + [merged]
