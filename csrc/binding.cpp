// Python bindings of egn_fast._C: argument checks, dtype mapping, workspaces from torch's caching
// allocator and torch's current stream. The only file that includes torch headers, and only the
// ATen/c10/pybind ones it needs (torch/extension.h alone costs ~45 s to parse on 2 cores).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <tuple>

#include "kernels.h"

namespace {

egn::DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kHalf: return egn::DType::f16;
    case at::kBFloat16: return egn::DType::bf16;
    case at::kFloat: return egn::DType::f32;
    case at::kDouble: return egn::DType::f64;
    default: TORCH_CHECK_VALUE(false, "egn_fast._C.", op, ": unsupported dtype ", t.scalar_type());
  }
}

// The op runs on `ref`'s GPU; every tensor must be a contiguous CUDA tensor on that device.
void check_cuda(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "egn_fast._C.", op, ": ", name, " is on ", t.device(),
                    "; the cuda backend needs CUDA tensors (use backend='torch' for CPU tensors)");
  TORCH_CHECK_VALUE(t.device() == ref.device(), "egn_fast._C.", op, ": ", name, " is on ", t.device(), " but ",
                    ref.device(), " was expected");
  TORCH_CHECK_VALUE(t.is_contiguous(), "egn_fast._C.", op, ": ", name, " must be contiguous");
}

at::Tensor device_bytes(size_t bytes, const at::Tensor& ref) {
  return at::empty({(int64_t)std::max<size_t>(bytes, 1)}, ref.options().dtype(at::kByte));
}

void gram_rows(at::Tensor K, const at::Tensor& X, const std::optional<at::Tensor>& W, int64_t s,
               double bias_add, bool allow_tf32) {
  check_cuda(K, K, "gram_rows", "K");
  check_cuda(X, K, "gram_rows", "X");
  TORCH_CHECK_VALUE(K.dim() == 2 && K.size(0) == K.size(1) && X.dim() == 2 && X.size(0) == K.size(0),
                    "egn_fast._C.gram_rows: K must be (m, m) and X (m, n); got ", K.sizes(), " and ", X.sizes());
  TORCH_CHECK_VALUE(s >= 1 && K.size(0) % s == 0, "egn_fast._C.gram_rows: s=", s, " must divide m=", K.size(0));
  if (W) {
    check_cuda(*W, K, "gram_rows", "W");
    int64_t b = K.size(0) / s;
    TORCH_CHECK_VALUE(W->dim() == 2 && W->size(0) == b && W->size(1) == b && W->scalar_type() == K.scalar_type(),
                      "egn_fast._C.gram_rows: W must be (m/s, m/s) in K's dtype; got ", W->sizes());
  }
  c10::cuda::CUDAGuard guard(K.device());
  egn::gram_rows(X.data_ptr(), dtype_of(X, "gram_rows"), (int)X.size(0), (int)X.size(1),
                 W ? W->data_ptr() : nullptr, W ? W->size(1) : 0, (int)s, bias_add, K.data_ptr(),
                 dtype_of(K, "gram_rows"), K.size(1), allow_tf32, c10::cuda::getCurrentCUDAStream());
}

std::tuple<at::Tensor, std::optional<at::Tensor>> backproject(const at::Tensor& A, const at::Tensor& G,
                                                                    const at::Tensor& u, bool bias) {
  check_cuda(u, u, "backproject", "u");
  check_cuda(A, u, "backproject", "A");
  check_cuda(G, u, "backproject", "G");
  TORCH_CHECK_VALUE(A.dim() == 3 && G.dim() == 4 && u.dim() == 2 && A.size(0) == G.size(0) && A.size(1) == G.size(2) &&
                        u.size(0) == G.size(0) && u.size(1) == G.size(1) && A.scalar_type() == G.scalar_type(),
                    "egn_fast._C.backproject: expected A (b, T, in), G (b, s, T, out), u (b, s) with one factor dtype; "
                    "got ", A.sizes(), ", ", G.sizes(), ", ", u.sizes());
  c10::cuda::CUDAGuard guard(u.device());
  auto dW = at::empty({G.size(3), A.size(2)}, u.options());
  std::optional<at::Tensor> db;
  if (bias) db = at::empty({G.size(3)}, u.options());
  egn::backproject(A.data_ptr(), G.data_ptr(), dtype_of(A, "backproject"), u.data_ptr(), dtype_of(u, "backproject"),
                   (int)G.size(0), (int)G.size(1), (int)G.size(2), (int)A.size(2), (int)G.size(3), dW.data_ptr(),
                   db ? db->data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream());
  return {dW, db};
}

void check_square(const at::Tensor& A, const char* op) {
  TORCH_CHECK_VALUE(A.dim() >= 2 && A.size(-1) == A.size(-2), "egn_fast._C.", op, ": expected square matrices, got ",
                    A.sizes());
  TORCH_CHECK_VALUE(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble, "egn_fast._C.", op,
                    ": cuSOLVER needs float32 or float64, got ", A.scalar_type());
}

// A X = B for SPD A (m, m), B (m, k): (X, 0), or (None, info > 0) when potrf breaks down at
// column info (the caller retries with jitter).
std::tuple<std::optional<at::Tensor>, int64_t> cholesky_solve(const at::Tensor& A, const at::Tensor& B) {
  check_cuda(A, A, "cholesky_solve", "A");
  check_cuda(B, A, "cholesky_solve", "B");
  check_square(A, "cholesky_solve");
  TORCH_CHECK_VALUE(A.dim() == 2 && B.dim() == 2 && B.size(0) == A.size(0) && B.scalar_type() == A.scalar_type(),
                    "egn_fast._C.cholesky_solve: expected A (m, m) and B (m, k) of one dtype; got ", A.sizes(), " and ",
                    B.sizes());
  c10::cuda::CUDAGuard guard(A.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  egn::DType dtype = dtype_of(A, "cholesky_solve");
  int64_t n = A.size(0);
  auto L = A.clone();
  auto info = at::zeros({1}, A.options().dtype(at::kInt));
  egn::WorkspaceSize size = egn::potrf_workspace(dtype, n, L.data_ptr(), stream);
  auto workspace = device_bytes(size.device_bytes, A);
  egn::potrf(dtype, n, L.data_ptr(), workspace.data_ptr(), size, info.data_ptr<int>(), stream);
  int64_t failed = info.item<int>();  // synchronizes: the answer decides the jitter retry
  if (failed) return {std::nullopt, failed};
  auto X = B.t().contiguous();  // column-major B for potrs
  egn::potrs(dtype, n, B.size(1), L.data_ptr(), X.data_ptr(), info.data_ptr<int>(), stream);
  return {X.t(), 0};
}

// Per-matrix Cholesky of A (batch, n, n): (L lower triangular, info (batch,) int32, 0 = success).
std::tuple<at::Tensor, at::Tensor> cholesky_batched(const at::Tensor& A) {
  check_cuda(A, A, "cholesky_batched", "A");
  check_square(A, "cholesky_batched");
  TORCH_CHECK_VALUE(A.dim() == 3, "egn_fast._C.cholesky_batched: expected A (batch, n, n), got ", A.sizes());
  c10::cuda::CUDAGuard guard(A.device());
  int64_t batch = A.size(0), n = A.size(1);
  auto L = A.clone();
  auto info = at::zeros({batch}, A.options().dtype(at::kInt));
  if (batch == 0 || n == 0) return {L, info};
  // potrfBatched takes a device array of matrix pointers
  auto pointers = at::arange(batch, A.options().dtype(at::kLong)) * (n * n * (int64_t)A.element_size()) +
                  (int64_t) reinterpret_cast<uintptr_t>(L.data_ptr());
  egn::potrf_batched(dtype_of(A, "cholesky_batched"), (int)n, reinterpret_cast<void**>(pointers.data_ptr()),
                     info.data_ptr<int>(), (int)batch, c10::cuda::getCurrentCUDAStream());
  return {L.tril_(), info};
}

// Symmetric eigendecomposition of A (m, m): (evals ascending, evecs with eigenvectors as columns).
std::tuple<at::Tensor, at::Tensor> eigh(const at::Tensor& A) {
  check_cuda(A, A, "eigh", "A");
  check_square(A, "eigh");
  TORCH_CHECK_VALUE(A.dim() == 2, "egn_fast._C.eigh: expected A (m, m), got ", A.sizes());
  c10::cuda::CUDAGuard guard(A.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  egn::DType dtype = dtype_of(A, "eigh");
  int64_t n = A.size(0);
  auto V = A.clone();
  auto evals = at::empty({n}, A.options());
  auto info = at::zeros({1}, A.options().dtype(at::kInt));
  if (n == 0) return {evals, V};
  egn::WorkspaceSize size = egn::syevd_workspace(dtype, n, V.data_ptr(), evals.data_ptr(), stream);
  auto workspace = device_bytes(size.device_bytes, A);
  egn::syevd(dtype, n, V.data_ptr(), evals.data_ptr(), workspace.data_ptr(), size, info.data_ptr<int>(), stream);
  int64_t failed = info.item<int>();
  TORCH_CHECK(failed == 0, "egn_fast._C.eigh: cusolverDnXsyevd did not converge (info=", failed, ")");
  return {evals, V.t()};  // rows of the row-major result are the eigenvectors
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "egn_fast CUDA kernels (Gram, back-projection) and cuSOLVER wrappers";
  m.def("gram_rows", &gram_rows, "K += (X Xᵀ) ∘ (W ⊗ 1_{s×s} + bias_add), or K += X Xᵀ without W", py::arg("K"),
        py::arg("X"), py::arg("W"), py::arg("s"), py::arg("bias_add"), py::arg("allow_tf32"));
  m.def("backproject", &backproject, "(dW, db) = J̃ᵀu of a (sequence) linear layer", py::arg("A"), py::arg("G"),
        py::arg("u"), py::arg("bias"));
  m.def("cholesky_solve", &cholesky_solve, "SPD solve by cuSOLVER potrf/potrs: (X, 0) or (None, info)",
        py::arg("A"), py::arg("B"));
  m.def("cholesky_batched", &cholesky_batched, "batched Cholesky (potrfBatched): (L, info)", py::arg("A"));
  m.def("eigh", &eigh, "symmetric eigendecomposition (syevd): (evals, evecs)", py::arg("A"));
}
