"""The Triton kernels against the torch backend (the reference) and, through egn_fast.direction
with backend="triton", against the dense float64 oracle. Without a GPU they run under the
Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1); with one, on the GPU."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

import egn_fast  # noqa: E402
from egn_fast import ops  # noqa: E402
from egn_fast import triton_kernels as tk  # noqa: E402
from egn_fast import resolve_loss  # noqa: E402
from egn_fast.ops import torch_backend  # noqa: E402
from egn_fast.ops.triton_backend import TritonBackend  # noqa: E402
from egn_fast.triton_kernels import _common  # noqa: E402
from models import make, targets  # noqa: E402
from oracle import dense_direction, rel_err  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FACTOR_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(autouse=True)
def no_tf32():
    """Compare fp32 against fp32: neither torch nor the kernels may round to TF32 here."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    yield
    matmul.fp32_precision = before


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def acc_for(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def symmetric_start(gen, m, dtype):
    """A random symmetric K to accumulate into (the ops add; they must not overwrite)."""
    K = torch.randn(m, m, generator=gen, dtype=dtype).to(DEVICE)
    return K + K.T


def assert_close_to(got, want, dtype):
    """Equal up to accumulation order: fp64 to ~1e-12, everything else to fp32 rounding."""
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)


# (b, s, in, out): one tile; ragged tiles with s > 1 (rows of one sample across tile edges);
# features longer than one BLOCK_K chunk; more rows per sample than a tile has.
DENSE_SHAPES = [(5, 1, 3, 4), (23, 3, 7, 9), (40, 1, 70, 33), (9, 4, 2, 37), (3, 40, 5, 6)]


@pytest.mark.parametrize("dtype", FACTOR_DTYPES, ids=str)
@pytest.mark.parametrize("b,s,n_in,n_out", DENSE_SHAPES)
def test_gram_dense_matches_torch(b, s, n_in, n_out, dtype):
    gen = torch.Generator().manual_seed(b * 1000 + s * 100 + n_in)
    bias = (b + s) % 2 == 0
    A = randn(gen, b, n_in, dtype=dtype)
    G = randn(gen, b, s, n_out, dtype=dtype)
    K = symmetric_start(gen, b * s, acc_for(dtype))
    want = K.clone()
    torch_backend.gram_dense(want, A, G, bias)
    tk.gram_dense(K, A, G, bias)
    assert_close_to(K, want, dtype)


def test_gram_dense_strided_factors_and_bias():
    """Non-contiguous A and G (as the layer rules pass them: G[:, :, 0] of a (b, s, T, out))."""
    gen = torch.Generator().manual_seed(7)
    A = randn(gen, 11, 6).T  # (b, in) = (6, 11) with strides (1, 6)
    G = randn(gen, 6, 2, 3, 5)[:, :, 1]
    for bias in (True, False):
        K = symmetric_start(gen, 12, torch.float32)
        want = K.clone()
        torch_backend.gram_dense(want, A, G, bias)
        tk.gram_dense(K, A, G, bias)
        assert_close_to(K, want, torch.float32)


# (b, s, T, in, out): one T tile; s > 1; ragged T over two tiles with features over two chunks.
SEQ_SHAPES = [(5, 1, 3, 3, 4), (4, 3, 7, 5, 6), (3, 2, 37, 40, 9)]


@pytest.mark.parametrize("b,s,T,n_in,n_out", SEQ_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_gram_seq_matches_torch(b, s, T, n_in, n_out, bias):
    gen = torch.Generator().manual_seed(b * 1000 + T * 10 + s)
    A = randn(gen, b, T, n_in)
    G = randn(gen, b, s, T, n_out)
    K = symmetric_start(gen, b * s, torch.float32)
    want = K.clone()
    torch_backend.gram_seq(want, A, G, bias)
    tk.gram_seq(K, A, G, bias)
    assert_close_to(K, want, torch.float32)


@pytest.mark.parametrize("dtype", FACTOR_DTYPES[1:], ids=str)
def test_gram_seq_dtypes(dtype):
    gen = torch.Generator().manual_seed(11)
    A = randn(gen, 4, 6, 5, dtype=dtype)
    G = randn(gen, 4, 2, 6, 3, dtype=dtype)
    K = symmetric_start(gen, 8, acc_for(dtype))
    want = K.clone()
    torch_backend.gram_seq(want, A, G, True)
    tk.gram_seq(K, A, G, True)
    assert_close_to(K, want, dtype)


# (b, s, T, in, out): rows b·T over several BLOCK_R chunks; dW over several tiles in both directions.
BACKPROJECT_SHAPES = [(5, 1, 1, 3, 4), (6, 3, 7, 40, 9), (4, 2, 17, 5, 33)]


@pytest.mark.parametrize("dtype", FACTOR_DTYPES, ids=str)
@pytest.mark.parametrize("b,s,T,n_in,n_out", BACKPROJECT_SHAPES)
@pytest.mark.parametrize("splits", [1, 3])
def test_backproject_matches_torch(b, s, T, n_in, n_out, dtype, splits):
    gen = torch.Generator().manual_seed(b * 100 + T)
    bias = T % 2 == 1
    A = randn(gen, b, T, n_in, dtype=dtype)
    G = randn(gen, b, s, T, n_out, dtype=dtype)
    u = randn(gen, b, s, dtype=acc_for(dtype))
    dW, db = tk.backproject(A, G, u, bias, splits=splits)
    want_dW, want_db = torch_backend.backproject(A, G, u, bias)
    assert dW.dtype == u.dtype and dW.shape == (n_out, n_in)
    assert_close_to(dW, want_dW, dtype)
    if bias:
        assert_close_to(db, want_db, dtype)
    else:
        assert db is None


def test_bad_input_raises_clear_errors(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    A, G = randn(gen, 4, 3), randn(gen, 4, 2, 5)
    with pytest.raises(ValueError, match="shapes disagree"):
        tk.gram_dense(torch.zeros(7, 7, device=DEVICE), A, G, True)
    with pytest.raises(ValueError, match="K must have dtype"):
        tk.gram_dense(torch.zeros(8, 8, dtype=torch.float16, device=DEVICE), A, G, True)
    with pytest.raises(ValueError, match=r"expected K \(m, m\), A \(b, T, in\)"):
        tk.gram_seq(torch.zeros(8, 8, device=DEVICE), A, G, True)
    with pytest.raises(ValueError, match="u must have dtype"):
        tk.backproject(A[:, None], G[:, :, None], torch.zeros(4, 2, dtype=torch.bfloat16, device=DEVICE), True)
    with pytest.raises(ValueError, match="several devices"):
        tk.gram_dense(torch.zeros(8, 8, device="meta"), A, G, True)
    # CPU tensors without the interpreter: a clear error, not a crash
    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        tk.gram_dense(torch.zeros(8, 8), A.cpu(), G.cpu(), True)
    assert not TritonBackend.supports(torch.device("cpu"))


def test_backend_registration():
    backend = ops.get_backend("triton", DEVICE)
    assert backend.name == "triton"
    assert backend.gram_dense is tk.gram_dense and backend.backproject is tk.backproject
    assert backend.gram_embedding is torch_backend.gram_embedding  # not a Triton op: torch's


# dense layers (gram_dense; s = 3 for mse, 2 for cross-entropy), a weight shared by two calls,
# a sequence linear layer and grouped convolutions (gram_seq, forced: the cost model would pick
# per-sample gradients at these sizes)
ORACLE_CASES = [
    ("mlp", "mse", "auto"),
    ("mlp", "cross_entropy", "auto"),
    ("tied", "cross_entropy", "auto"),
    ("seq_linear", "cross_entropy", "ghost"),
    ("conv1d", "cross_entropy", "ghost"),
]


@pytest.mark.parametrize("kind,loss,seq_method", ORACLE_CASES)
def test_direction_matches_dense_oracle(kind, loss, seq_method):
    model, x = make(kind, True, seed=len(kind) * 10 + len(loss))
    y = targets(loss, seed=3)
    want = dense_direction(model, x, y, resolve_loss(loss), 0.1)
    model, x, y = model.to(DEVICE), x.to(DEVICE), y.to(DEVICE)
    d = egn_fast.direction(model, x, y, loss=loss, damping=0.1, backend="triton", seq_method=seq_method)
    assert rel_err([t.cpu() for t in d], want) < 1e-8  # float64 model: the kernels accumulate in fp64
    d32 = egn_fast.direction(model.float(), x.float(), y.float() if y.is_floating_point() else y, loss=loss, damping=0.1, backend="triton", seq_method=seq_method)
    assert rel_err([t.cpu() for t in d32], want) < 1e-4
