"""The CUDA extension egn_fast._C and the "cuda" backend.

Runs everywhere: the kernels' index math in a CPU emulation (g++), the module loads and exposes
its functions, the backend is registered and rejects CPU tensors with a clear error.
Runs only with a GPU: every op against the torch backend, cuSOLVER against torch.linalg, and
egn_fast.direction(backend="cuda") against the dense float64 oracle.
"""

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import egn_fast
from egn_fast import ops
from egn_fast import resolve_loss
from egn_fast.ops.precision import tf32_allowed
from egn_fast.ops import torch_backend
from egn_fast.system.solve import EigenSolver, damped_solve
from benchmark_scripts import load_benchmark
from models import make, targets
from oracle import dense_direction, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLKIT = torch.version.cuda is not None and (shutil.which("nvcc") or os.path.isfile("/usr/local/cuda/bin/nvcc"))
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU here: the kernels and cuSOLVER calls are only compiled, not run"
)


def load_extension():
    """egn_fast._C; a failure when the toolkit is present (the build should have made it), else a skip."""
    try:
        from egn_fast import _C
    except ImportError as error:
        if TOOLKIT:
            pytest.fail(f"egn_fast._C is not built although nvcc and a CUDA torch are present ({error}); see `pip install -v -e .`")
        pytest.skip("egn_fast._C not built: no CUDA toolkit or CPU-only torch")
    return _C


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to compile the CPU emulation")
def test_kernel_index_math_in_cpu_emulation(tmp_path):
    exe = tmp_path / "emulate_tiles"
    src = os.path.join(ROOT, "tests", "csrc", "emulate_tiles.cpp")
    subprocess.run(["g++", "-O1", "-std=c++17", "-I", os.path.join(ROOT, "csrc"), src, "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "OK", run.stdout


def test_module_loads_and_exposes_its_functions():
    _C = load_extension()
    for name in ["gram_rows", "backproject", "cholesky_solve", "cholesky_batched", "eigh"]:
        assert callable(getattr(_C, name)), name


def test_backend_registered_and_rejects_cpu_tensors():
    load_extension()
    assert "cuda" in ops.available_backends()
    with pytest.raises(ValueError, match="does not support tensors on cpu"):
        ops.get_backend("cuda", torch.device("cpu"))
    from egn_fast.ops.cuda_backend import CudaBackend

    A, G, K = torch.randn(3, 2), torch.randn(3, 2, 4), torch.zeros(6, 6)
    calls = {
        "gram_dense": lambda: CudaBackend.gram_dense(K, A, G, True),
        "gram_per_sample": lambda: CudaBackend.gram_per_sample(K, G),
        "backproject": lambda: CudaBackend.backproject(A[:, None], G[:, :, None], torch.randn(3, 2), True),
        "cholesky_solve": lambda: CudaBackend.cholesky_solve(torch.eye(3), torch.randn(3, 1)),
        "cholesky_batched": lambda: CudaBackend.cholesky_batched(torch.eye(3)[None]),
        "eigh": lambda: CudaBackend.eigh(torch.eye(3)),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            call()


def test_reference_cholesky_batched_and_eigh():
    """The torch implementations of the two ops this extension added to the op set (CPU)."""
    g = torch.Generator().manual_seed(19)
    X = torch.randn(6, 5, 7, generator=g, dtype=torch.float64)
    A = X @ X.mT + 0.1 * torch.eye(5, dtype=torch.float64)
    A[2] = -A[2]
    L, info = torch_backend.cholesky_batched(A)
    assert (info > 0).tolist() == [False, False, True, False, False, False]
    ok = [0, 1, 3, 4, 5]
    torch.testing.assert_close(L[ok] @ L[ok].mT, A[ok])
    assert torch.equal(L[ok], L[ok].tril())
    evals, V = torch_backend.eigh(A[0])
    assert torch.all(evals[1:] >= evals[:-1])
    torch.testing.assert_close(V @ torch.diag(evals) @ V.T, A[0])
    assert ops.Backend.cholesky_batched is torch_backend.cholesky_batched and ops.Backend.eigh is torch_backend.eigh


def test_missing_extension_gives_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "egn_fast._C", None)  # as if the build had been skipped
    monkeypatch.delattr(egn_fast, "_C", raising=False)
    monkeypatch.delitem(sys.modules, "egn_fast.ops.cuda_backend", raising=False)
    monkeypatch.delitem(ops._INSTANCES, "cuda", raising=False)
    with pytest.raises(ImportError, match="needs the CUDA extension egn_fast._C, which is not built"):
        ops.get_backend("cuda", torch.device("cpu"))
    assert ops.get_backend("torch", torch.device("cpu")).name == "torch"


# ---------------------------------------------------------------------------- GPU only


@pytest.fixture
def cuda():
    """The cuda backend, with tf32 off (the exact fp32 path) unless a test turns it on."""
    load_extension()
    saved = tf32_allowed()  # reading allow_tf32 itself raises once a test used the new fp32_precision API
    torch.backends.cuda.matmul.allow_tf32 = False
    yield ops.get_backend("cuda", torch.device("cuda"))
    torch.backends.cuda.matmul.allow_tf32 = saved


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)


# (factor dtype, K dtype, relative tolerance): the reference widens factors to K's dtype, so the
# only difference is the order of summation.
DTYPES = [
    (torch.float64, torch.float64, 1e-12),
    (torch.float32, torch.float32, 1e-5),
    (torch.bfloat16, torch.float32, 1e-5),
    (torch.float16, torch.float32, 1e-5),
]
RAGGED = [(1, 1, 1, 1), (5, 3, 7, 4), (67, 3, 33, 70), (130, 2, 129, 17)]  # (b, s, in, out)


def assert_rel(got, want, tol):
    assert ((got - want).norm() / want.norm().clamp(min=1e-30)).item() < tol


@needs_gpu
@pytest.mark.parametrize("factor_dtype,k_dtype,tol", DTYPES)
@pytest.mark.parametrize("b,s,n_in,n_out", RAGGED)
@pytest.mark.parametrize("bias", [True, False])
def test_gram_dense_matches_torch(cuda, factor_dtype, k_dtype, tol, b, s, n_in, n_out, bias):
    A, G = randn(b, n_in, dtype=factor_dtype, seed=1), randn(b, s, n_out, dtype=factor_dtype, seed=2)
    K0 = randn(b * s, b * s, dtype=k_dtype, seed=3)  # the ops add to K
    K0 = K0 + K0.T
    want, got = K0.clone(), K0.clone()
    torch_backend.gram_dense(want, A, G, bias)
    cuda.gram_dense(got, A, G, bias)
    assert_rel(got - K0, want - K0, tol)
    assert_rel(got, got.T, tol)


@needs_gpu
@pytest.mark.parametrize("factor_dtype,k_dtype,tol", DTYPES)
def test_gram_per_sample_matches_torch(cuda, factor_dtype, k_dtype, tol):
    P = randn(45, 3, 150, dtype=factor_dtype, seed=4)
    want, got = torch.zeros(135, 135, dtype=k_dtype, device="cuda"), torch.zeros(135, 135, dtype=k_dtype, device="cuda")
    torch_backend.gram_per_sample(want, P)
    cuda.gram_per_sample(got, P)
    assert_rel(got, want, tol)


@needs_gpu
def test_gram_tf32_when_torch_allows_it(cuda):
    A, G = randn(70, 200, seed=5), randn(70, 2, 90, seed=6)
    want = torch.zeros(140, 140, device="cuda")
    got = torch.zeros_like(want)
    torch_backend.gram_dense(want, A, G, True)
    torch.backends.cuda.matmul.allow_tf32 = True
    cuda.gram_dense(got, A, G, True)
    assert_rel(got, want, 5e-3)  # tf32 keeps 10 mantissa bits


@needs_gpu
@pytest.mark.parametrize("factor_dtype,acc_dtype,tol", DTYPES)
@pytest.mark.parametrize("b,s,T,n_in,n_out", [(1, 1, 1, 1, 1), (5, 3, 1, 7, 4), (6, 2, 11, 70, 66), (3, 4, 40, 129, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_backproject_matches_torch(cuda, factor_dtype, acc_dtype, tol, b, s, T, n_in, n_out, bias):
    A, G = randn(b, T, n_in, dtype=factor_dtype, seed=7), randn(b, s, T, n_out, dtype=factor_dtype, seed=8)
    u = randn(b, s, dtype=acc_dtype, seed=9)
    want_dW, want_db = torch_backend.backproject(A, G, u, bias)
    dW, db = cuda.backproject(A, G, u, bias)
    assert dW.dtype == acc_dtype and dW.shape == (n_out, n_in)
    assert_rel(dW, want_dW, tol)
    if bias:
        assert_rel(db, want_db, tol)
    else:
        assert db is None


@needs_gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-11)])
@pytest.mark.parametrize("m,k", [(1, 1), (70, 1), (300, 3)])
def test_cholesky_solve_matches_torch_linalg(cuda, dtype, tol, m, k):
    X = randn(m, m + 5, dtype=dtype, seed=10)
    A = X @ X.T / m + torch.eye(m, dtype=dtype, device="cuda")
    B = randn(m, k, dtype=dtype, seed=11)
    got, info = cuda.cholesky_solve(A, B)
    assert info == 0
    assert_rel(got, torch.linalg.solve(A, B), tol)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_solve_reports_breakdown(cuda, dtype):
    A = torch.diag(torch.tensor([2.0, 1.0, -1e-3, 3.0], dtype=dtype, device="cuda"))
    X, info = cuda.cholesky_solve(A, torch.ones(4, 1, dtype=dtype, device="cuda"))
    assert X is None and info == 3  # 1-based column of the first non-positive pivot, as LAPACK


@needs_gpu
def test_nearly_singular_takes_the_jitter_path_like_torch(cuda):
    X = randn(120, 20, dtype=torch.float64, seed=12)
    K = X @ X.T  # rank 20, then pushed just below semi-definite:
    K -= 3e-7 * K.diagonal().mean() * torch.eye(120, dtype=K.dtype, device="cuda")
    w = randn(120, dtype=torch.float64, seed=13)
    # jitters 1e-10 … 1e-7 (× mean diag) leave K indefinite, 1e-6 makes it safely SPD: both backends stop there
    with pytest.warns(RuntimeWarning, match="jitter"):
        got = damped_solve(K, w, 0.0, cuda)
    with pytest.warns(RuntimeWarning, match="jitter"):
        want = damped_solve(K, w, 0.0, ops.get_backend("torch", K.device))
    assert got.jitter == want.jitter == pytest.approx(1e-6 * float(X.square().sum(1).mean()))
    assert_rel(got.gamma, want.gamma, 1e-6)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_batched_matches_torch_and_flags_indefinite(cuda, dtype):
    X = randn(9, 6, 8, dtype=dtype, seed=14)
    A = X @ X.mT + 0.1 * torch.eye(6, dtype=dtype, device="cuda")
    A[4] = -A[4]  # not SPD
    L, info = cuda.cholesky_batched(A)
    want_L, want_info = torch.linalg.cholesky_ex(A)
    assert info.tolist()[4] > 0 and [i for j, i in enumerate(info.tolist()) if j != 4] == [0] * 8
    assert (want_info > 0).tolist() == (info > 0).tolist()
    ok = [j for j in range(9) if j != 4]
    assert_rel(L[ok], want_L[ok], 1e-4 if dtype == torch.float32 else 1e-12)
    assert torch.equal(L[ok], L[ok].tril())


@needs_gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-11)])
def test_eigh_matches_torch(cuda, dtype, tol):
    X = randn(90, 40, dtype=dtype, seed=15)
    A = X @ X.T
    evals, V = cuda.eigh(A)
    want_evals, _ = torch.linalg.eigh(A)
    assert_rel(evals, want_evals, tol)
    assert_rel(V @ torch.diag(evals) @ V.T, A, tol)
    eig = EigenSolver(A, backend=cuda)
    w = randn(90, dtype=dtype, seed=16)
    assert_rel((A + 0.5 * torch.eye(90, dtype=dtype, device="cuda")) @ eig.solve(w, 0.5), w, tol * 10)


@needs_gpu
@pytest.mark.parametrize("kind", ["mlp", "seq_linear", "conv1d", "embedding"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "bce"])
def test_direction_cuda_matches_dense_oracle(kind, loss):
    load_extension()
    model, x = make(kind, True, 17)
    y = targets(loss, seed=17)
    want = dense_direction(model, x, y, resolve_loss(loss), 0.1)
    gpu = copy.deepcopy(model).cuda()
    d = egn_fast.direction(gpu, x.cuda(), y.cuda(), loss=loss, damping=0.1, backend="cuda")
    assert rel_err([t.cpu() for t in d], want) < 1e-8


@needs_gpu
@pytest.mark.parametrize("kind", ["mlp", "seq_linear"])
def test_direction_cuda_float32_within_1e_4(cuda, kind):
    model, x = make(kind, True, 20)
    y = targets("cross_entropy", seed=20)
    want = dense_direction(model, x, y, resolve_loss("cross_entropy"), 0.1)
    gpu = copy.deepcopy(model).float().cuda()
    d = egn_fast.direction(gpu, x.float().cuda(), y.cuda(), loss="cross_entropy", damping=0.1, backend="cuda")
    assert all(t.dtype == torch.float32 for t in d)
    assert rel_err([t.double().cpu() for t in d], want) < 1e-4


@needs_gpu
def test_direction_cuda_with_a_custom_loss_uses_batched_cholesky():
    load_extension()
    model, x = make("mlp", True, 18)
    y = targets("mse", seed=18)

    def huberish(f, t):  # convex in f with a non-diagonal Hessian
        return torch.logsumexp(f - t, 0) + 0.5 * (f * f).sum()

    loss = resolve_loss(huberish)
    want = dense_direction(model, x, y, loss, 0.1)
    d = egn_fast.direction(copy.deepcopy(model).cuda(), x.cuda(), y.cuda(), loss=loss, damping=0.1, backend="cuda")
    assert rel_err([t.cpu() for t in d], want) < 1e-8


def test_solver_auto_table_follows_the_median_speedup(tmp_path, monkeypatch):
    bench = load_benchmark("kernels_cuda", monkeypatch)
    table = tmp_path / "auto_table.json"
    table.write_text(json.dumps({"devices": {"cuda": {"gram_dense": "triton", "eigh": "cuda"}, "cpu": {}}}))
    rows = [{"op": "cholesky_solve", "speedup": x} for x in (0.9, 1.2, 1.3)]
    rows += [{"op": "cholesky_batched", "speedup": x} for x in (1.04, 3.0, 0.5)]
    rows += [{"op": "eigh", "speedup": 0.8}, {"op": "gram_dense", "speedup": 0.1}]
    written = bench.write_solver_auto_table(rows, "Test GPU", table)
    want = {"gram_dense": "triton", "cholesky_solve": "cuda", "cholesky_batched": "torch", "eigh": "torch"}
    assert written["devices"]["cuda"] == want and json.loads(table.read_text()) == written
    assert "cholesky_solve/cuda 1.20×" in written["solver_note"]


def test_benchmark_script_imports_and_parses_its_arguments(tmp_path, monkeypatch):
    bench = load_benchmark("kernels_cuda", monkeypatch)
    args = bench.parse_args(["--quick", "--repeats", "4", "--out", str(tmp_path)])
    assert args.quick and args.repeats == 4 and args.out == tmp_path
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            bench.main(["--out", str(tmp_path)])
