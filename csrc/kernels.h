// The plain C++ interface of the CUDA kernels and the cuSOLVER wrappers: no torch headers, so
// gram.cu, backproject.cu and solver.cpp compile fast; only binding.cpp includes torch.
// All pointers are device pointers of contiguous row-major arrays; every call is asynchronous on
// `stream` (except where it returns a cuSOLVER info, which binding.cpp reads back).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace egn {

enum class DType { f16, bf16, f32, f64 };

// K += (X Xᵀ) ∘ (W ⊗ 1_{s×s} + bias_add), or K += X Xᵀ when W is null.
// X (m, n) of x_dtype; W (m/s, m/s) with leading dimension ldw and K (m, m) with leading
// dimension ldk, both of k_dtype. Supported (x_dtype, k_dtype): (f16|bf16, f32) on tensor cores,
// (f32, f32) exact FMA or tf32 tensor cores when allow_tf32, (f64, f64) exact FMA.
void gram_rows(const void* X, DType x_dtype, int m, int n, const void* W, long long ldw, int s, double bias_add,
               void* K, DType k_dtype, long long ldk, bool allow_tf32, cudaStream_t stream);

// Fused back-projection of a (sequence) linear layer, U[i·T + t, o] = Σ_k u[i, k] G[i, k, t, o]
// never stored: dW (out, in) = Uᵀ A, and db (out,) = Σ_n U[n, :] when db is not null.
// A (b, T, in) and G (b, s, T, out) of in_dtype; u (b, s), dW, db of acc_dtype.
// Supported (in_dtype, acc_dtype): (f16|bf16|f32, f32) and (f64, f64); exact FMA in acc_dtype.
void backproject(const void* A, const void* G, DType in_dtype, const void* u, DType acc_dtype, int b, int s, int T,
                 int n_in, int n_out, void* dW, void* db, cudaStream_t stream);

// cuSOLVER (solver.cpp). Row-major symmetric matrices are handed over as they are: cuSOLVER
// reads them column-major, i.e. transposed, which for a symmetric matrix is the same matrix.
// dtype is f32 or f64. Workspaces: ask for the sizes, allocate device bytes (torch's allocator in
// binding.cpp), pass them in; host workspace is handled inside.
struct WorkspaceSize {
  size_t device_bytes;
  size_t host_bytes;
};

// Cholesky in place: afterwards A's lower triangle (row-major) holds L with L Lᵀ = A.
WorkspaceSize potrf_workspace(DType dtype, int64_t n, void* A, cudaStream_t stream);
void potrf(DType dtype, int64_t n, void* A, void* workspace, WorkspaceSize size, int* info, cudaStream_t stream);
// Solves A X = B with the factor from potrf; B is given column-major (n, nrhs), i.e. Bᵀ row-major,
// and overwritten by X the same way.
void potrs(DType dtype, int64_t n, int64_t nrhs, const void* L, void* B, int* info, cudaStream_t stream);
// Batched Cholesky of `batch` n×n matrices; pointers: a device array of `batch` matrix pointers.
void potrf_batched(DType dtype, int n, void** pointers, int* info, int batch, cudaStream_t stream);
// Symmetric eigendecomposition in place: evals ascending; A's rows (row-major) become the
// eigenvectors (A = Vᵀ in row-major terms).
WorkspaceSize syevd_workspace(DType dtype, int64_t n, void* A, void* evals, cudaStream_t stream);
void syevd(DType dtype, int64_t n, void* A, void* evals, void* workspace, WorkspaceSize size, int* info,
           cudaStream_t stream);

}  // namespace egn
