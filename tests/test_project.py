"""J̃v from the layer factors (`Factors.project`, which Monte-Carlo rows use for J̃g and the
optimizer for sᵀHs) against Sᵀ(J v) with the dense float64 J (torch.func), for every factor type and
path: ghost and per-sample sequence layers, with and without the per-sample rows the Gram keeps,
frozen weights (bias rows only), embeddings, norms, tied and generic modules."""

from __future__ import annotations

import pytest
import torch

import egn_fast
from models import MODELS, make, targets
from oracle import dense_jacobian, flat


def dense_rows_times(system: egn_fast.RowSpaceSystem, model, x, v) -> torch.Tensor:
    out, J = dense_jacobian(model, x)
    Jv = (J @ flat(v)).view(out.shape)
    return torch.einsum("bcs,bc->bs", system.head.S.double(), Jv)

KINDS = [k for k in MODELS if k != "functional_use"]  # that one is refused (a functional use)


@pytest.mark.parametrize("gram", [True, False], ids=["rows_kept", "factors_only"])
@pytest.mark.parametrize("seq_method", ["ghost", "per_sample"])
@pytest.mark.parametrize("kind", KINDS)
def test_project_is_row_jvp(kind, seq_method, gram):
    model, x = make(kind, bias=True, seed=3)
    y = targets("cross_entropy")
    system = egn_fast.build_system(model, x, y, loss="cross_entropy", seq_method=seq_method, gram=gram)
    g = torch.Generator().manual_seed(4)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in system.params]
    got = system.project(v)
    want = dense_rows_times(system, model, x, v)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))


def test_project_with_frozen_weights():
    """Only the biases trainable: SeqFactors hold no weight, J̃v comes from the bias rows."""
    model, x = make("seq_linear", bias=True, seed=5)
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bias"))
    y = targets("mse")
    system = egn_fast.build_system(model, x, y)
    v = [torch.randn_like(p) for p in system.params]
    got = system.project(v)
    assert torch.allclose(got, dense_rows_times(system, model, x, v), rtol=1e-10)
