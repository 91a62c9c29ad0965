"""Which form of a layer's rows travels in exact data-parallel EGN (docs/design.md §6): its factors
(A: b_r·T·in, G: m_r·T·out numbers) or its per-sample rows (m_r·n_l numbers), whichever is smaller;
the tensors a factor object is made of, and a factor object rebuilt over their gathered copies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import Backend
from ..rules import EmbeddingFactors, Factors, PerSampleFactors, SeqFactors

__all__ = ["sendable", "factor_bytes", "row_bytes", "tensors_of", "rebuilt", "rebuilt_layers"]


def tensors_of(f: Factors) -> list[Tensor]:
    """The batch-first tensors a factor object is made of (what the exact route all-gathers)."""
    if isinstance(f, SeqFactors):
        return [t for A, G in f.groups for t in (A, G)]
    if isinstance(f, EmbeddingFactors):
        return [f.tokens, f.G]
    assert isinstance(f, PerSampleFactors), type(f)
    return list(f.P)


def rebuilt(f: Factors, tensors: list[Tensor]) -> Factors:
    """A factor object like `f` over the gathered tensors (same order as `tensors_of`)."""
    if isinstance(f, SeqFactors):
        return SeqFactors(f.weight, f.bias, list(zip(tensors[::2], tensors[1::2])), f.seq_method, transposed=f.transposed)
    if isinstance(f, EmbeddingFactors):
        return EmbeddingFactors(f.weight, tensors[0], tensors[1])
    return PerSampleFactors(f.params, tensors)


def rebuilt_layers(layers: list[Factors], tensors: list[Tensor]) -> list[Factors]:
    """`rebuilt` for each layer in turn, over consecutive runs of `tensors` (their `tensors_of`)."""
    out = []
    for f in layers:
        n = len(tensors_of(f))
        out.append(rebuilt(f, tensors[:n]))
        tensors = tensors[n:]
    return out


def factor_bytes(f: Factors) -> int:
    """Bytes a rank contributes to the all-gather of this layer's factors."""
    return sum(t.numel() * t.element_size() for t in tensors_of(f))


def row_bytes(f: Factors, dtype: torch.dtype) -> int:
    """Bytes of this layer's per-sample gradient rows (m_r × n_l numbers in `dtype`)."""
    b, s = _batch_and_s(f)
    return b * s * sum(p.numel() for p in f.params) * torch.empty((), dtype=dtype).element_size()


def _batch_and_s(f: Factors) -> tuple[int, int]:
    """(b_r, s) of a built-in factor object."""
    G = f.groups[0][1] if isinstance(f, SeqFactors) else f.G if isinstance(f, EmbeddingFactors) else f.P[0]
    return G.shape[0], G.shape[1]


def sendable(f: Factors, backend: Backend, dtype: torch.dtype) -> Factors:
    """The form of a layer's rows that moves fewer bytes: its factors, or its per-sample gradient
    rows when those are smaller (a sequence layer with T·(in + s·out) > s·in·out). Both scale with
    b_r, so every rank picks the same. A factor type of a user rule travels as per-sample rows."""
    if type(f) in (SeqFactors, EmbeddingFactors):
        if factor_bytes(f) <= row_bytes(f, dtype):
            return f
    elif type(f) is PerSampleFactors:
        return f
    return PerSampleFactors(f.params, f.per_sample_grads(backend, dtype))
