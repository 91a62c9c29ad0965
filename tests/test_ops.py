"""The torch backend's ops against J̃ built explicitly from the same factors, on ragged shapes,
s > 1 and with the strip tiling forced (tiny temporary budget)."""

import pytest
import torch

from egn_fast import ops
from egn_fast.ops import torch_backend

T64 = torch.float64


def explicit_rows(A, G, bias):
    """J̃ rows of a (sequence) linear layer, (b·s, out·in [+ out]): P_ik = Σ_t G_ik,t a_i,tᵀ."""
    b, s, T, out = G.shape
    P = torch.einsum("bkto,bti->bkoi", G, A).reshape(b * s, -1)
    if bias:
        P = torch.cat([P, G.sum(2).reshape(b * s, out)], 1)
    return P


@pytest.fixture(params=[False, True], ids=["one_strip", "tiled"])
def tiling(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(torch_backend, "_TEMP_ELEMENTS", 64)
        monkeypatch.setattr(torch_backend, "_STRIP_ROWS", 5)
    return request.param


@pytest.mark.parametrize("b,s,n_in,n_out", [(5, 1, 3, 4), (7, 3, 5, 2), (4, 4, 1, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_gram_dense(tiling, b, s, n_in, n_out, bias):
    g = torch.Generator().manual_seed(b * 100 + s)
    A = torch.randn(b, n_in, generator=g, dtype=T64)
    G = torch.randn(b, s, n_out, generator=g, dtype=T64)
    P = explicit_rows(A[:, None], G[:, :, None], bias)
    K = torch.zeros(b * s, b * s, dtype=T64)
    torch_backend.gram_dense(K, A, G, bias)
    torch.testing.assert_close(K, P @ P.T)


@pytest.mark.parametrize("b,s,T,n_in,n_out", [(5, 1, 3, 3, 4), (6, 3, 5, 2, 3), (3, 2, 7, 4, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_gram_seq_and_per_sample(tiling, b, s, T, n_in, n_out, bias):
    g = torch.Generator().manual_seed(b * 100 + T)
    A = torch.randn(b, T, n_in, generator=g, dtype=T64)
    G = torch.randn(b, s, T, n_out, generator=g, dtype=T64)
    P = explicit_rows(A, G, bias)
    K = torch.zeros(b * s, b * s, dtype=T64)
    torch_backend.gram_seq(K, A, G, bias)
    torch.testing.assert_close(K, P @ P.T)
    K2 = torch.zeros(b * s, b * s, dtype=T64)
    torch_backend.gram_per_sample(K2, P.view(b, s, -1))
    torch.testing.assert_close(K2, P @ P.T)
    torch.testing.assert_close(torch_backend.per_sample_seq(A, G, T64).reshape(b * s, -1), explicit_rows(A, G, False))


def test_gram_embedding(tiling):
    g = torch.Generator().manual_seed(3)
    b, s, T, V, dim = 6, 2, 4, 5, 3
    tokens = torch.randint(0, V, (b, T), generator=g)
    G = torch.randn(b, s, T, dim, generator=g, dtype=T64)
    onehot = torch.nn.functional.one_hot(tokens, V).to(T64)  # an embedding is a linear layer on one-hots
    P = explicit_rows(onehot, G, False)
    K = torch.zeros(b * s, b * s, dtype=T64)
    torch_backend.gram_embedding(K, tokens, G)
    torch.testing.assert_close(K, P @ P.T)
    u = torch.randn(b, s, generator=g, dtype=T64)
    dW = torch_backend.backproject_embedding(tokens, G, u, V)
    torch.testing.assert_close(dW, (u.reshape(-1) @ P).view(dim, V).T)
    rows = torch_backend.per_sample_embedding(tokens, G, V, T64)  # (b, s, V, dim)
    torch.testing.assert_close(rows.transpose(2, 3).reshape(b * s, -1), P)


def test_backproject_per_sample():
    g = torch.Generator().manual_seed(6)
    P = torch.randn(5, 3, 4, 2, generator=g, dtype=T64)  # rows of a (4, 2) parameter
    u = torch.randn(5, 3, generator=g, dtype=T64)
    want = (u.reshape(-1) @ P.reshape(15, 8)).view(4, 2)
    torch.testing.assert_close(torch_backend.backproject_per_sample(P.float(), u), want)
    assert torch_backend.backproject_per_sample(P.float(), u).dtype == T64  # computes in u's dtype


@pytest.mark.parametrize("bias", [True, False])
def test_backproject(bias):
    g = torch.Generator().manual_seed(4)
    b, s, T, n_in, n_out = 5, 3, 4, 3, 2
    A = torch.randn(b, T, n_in, generator=g, dtype=T64)
    G = torch.randn(b, s, T, n_out, generator=g, dtype=T64)
    u = torch.randn(b, s, generator=g, dtype=T64)
    want = u.reshape(-1) @ explicit_rows(A, G, bias)
    dW, db = torch_backend.backproject(A, G, u, bias)
    got = torch.cat([dW.reshape(-1)] + ([db] if bias else []))
    torch.testing.assert_close(got, want)
    assert (db is None) == (not bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_factors_accumulate_in_fp32(dtype):
    g = torch.Generator().manual_seed(5)
    A = torch.randn(6, 2, 5, generator=g).to(dtype)
    G = torch.randn(6, 2, 2, 4, generator=g).to(dtype)
    P = explicit_rows(A.double(), G.double(), True)
    K = torch.zeros(12, 12, dtype=torch.float32)
    torch_backend.gram_seq(K, A, G, True)
    assert K.dtype == torch.float32
    torch.testing.assert_close(K.double(), P @ P.T, rtol=1e-5, atol=1e-5)


def test_cholesky_solve_reports_breakdown():
    A = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=T64)  # indefinite
    X, info = torch_backend.cholesky_solve(A, torch.ones(2, 1, dtype=T64))
    assert X is None and info > 0
    S = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=T64)
    X, info = torch_backend.cholesky_solve(S, torch.ones(2, 1, dtype=T64))
    assert info == 0
    torch.testing.assert_close(S @ X, torch.ones(2, 1, dtype=T64))


def test_backend_registry():
    cpu = torch.device("cpu")
    assert ops.get_backend("auto", cpu).name == "torch"
    assert "torch" in ops.available_backends()
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ops.get_backend("nope", cpu)

    class Doubling(ops.Backend):
        name = "doubling"

        @staticmethod
        def gram_dense(K, A, G, bias):
            torch_backend.gram_dense(K, A, G, bias)
            K.mul_(2.0)

    ops.register_backend("doubling", Doubling)
    try:
        K = torch.zeros(2, 2, dtype=T64)
        ops.get_backend("doubling", cpu).gram_dense(K, torch.ones(2, 1, dtype=T64), torch.ones(2, 1, 1, dtype=T64), False)
        assert torch.equal(K.tril(), torch.tensor([[2.0, 0.0], [2.0, 2.0]], dtype=T64))
    finally:
        ops._REGISTRY.pop("doubling")
        ops._INSTANCES.pop("doubling", None)
