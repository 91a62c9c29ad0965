// cuSOLVER wrappers (64-bit generic API where it exists): potrf/potrs for the damped m×m solve,
// potrfBatched for per-sample factors, syevd for the many-λ path. No torch headers here.
//
// Handles: torch's own cuSOLVER handle getter lives in a lazily loaded torch library (undefined
// symbol at import), so we keep one handle per device and thread, and bind it to the caller's
// stream on every call. Handles are never destroyed: destroying them at process exit can run
// after the CUDA context is gone.
#include <cusolverDn.h>

#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "kernels.h"

namespace egn {
namespace {

const char* status_name(cusolverStatus_t status) {
  switch (status) {
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "cuSOLVER error";
  }
}

void check(cusolverStatus_t status, const char* call) {
  if (status != CUSOLVER_STATUS_SUCCESS)
    throw std::runtime_error(std::string("egn_fast._C: ") + call + " failed with status " + std::to_string(status) +
                             " (" + status_name(status) + ")");
}

struct Solver {
  cusolverDnHandle_t handle;
  cusolverDnParams_t params;
};

// The calling thread's handle for the current device, bound to `stream`.
Solver& solver_for(cudaStream_t stream) {
  thread_local std::unordered_map<int, Solver> solvers;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) throw std::runtime_error(std::string("egn_fast._C: cudaGetDevice: ") + cudaGetErrorString(err));
  auto found = solvers.find(device);
  if (found == solvers.end()) {
    Solver s{};
    check(cusolverDnCreate(&s.handle), "cusolverDnCreate");
    check(cusolverDnCreateParams(&s.params), "cusolverDnCreateParams");
    found = solvers.emplace(device, s).first;
  }
  check(cusolverDnSetStream(found->second.handle, stream), "cusolverDnSetStream");
  return found->second;
}

cudaDataType data_type(DType dtype) {
  if (dtype == DType::f32) return CUDA_R_32F;
  if (dtype == DType::f64) return CUDA_R_64F;
  throw std::invalid_argument("egn_fast._C: cuSOLVER routines take float32 or float64");
}

// Row-major lower triangle = column-major upper triangle: cuSOLVER works on the upper one.
constexpr cublasFillMode_t UPLO = CUBLAS_FILL_MODE_UPPER;

}  // namespace

WorkspaceSize potrf_workspace(DType dtype, int64_t n, void* A, cudaStream_t stream) {
  Solver& s = solver_for(stream);
  WorkspaceSize size{};
  cudaDataType t = data_type(dtype);
  check(cusolverDnXpotrf_bufferSize(s.handle, s.params, UPLO, n, t, A, n, t, &size.device_bytes, &size.host_bytes),
        "cusolverDnXpotrf_bufferSize");
  return size;
}

void potrf(DType dtype, int64_t n, void* A, void* workspace, WorkspaceSize size, int* info, cudaStream_t stream) {
  Solver& s = solver_for(stream);
  cudaDataType t = data_type(dtype);
  std::vector<char> host(size.host_bytes);
  check(cusolverDnXpotrf(s.handle, s.params, UPLO, n, t, A, n, t, workspace, size.device_bytes, host.data(),
                         size.host_bytes, info),
        "cusolverDnXpotrf");
}

void potrs(DType dtype, int64_t n, int64_t nrhs, const void* L, void* B, int* info, cudaStream_t stream) {
  Solver& s = solver_for(stream);
  cudaDataType t = data_type(dtype);
  check(cusolverDnXpotrs(s.handle, s.params, UPLO, n, nrhs, t, L, n, t, B, n, info), "cusolverDnXpotrs");
}

void potrf_batched(DType dtype, int n, void** pointers, int* info, int batch, cudaStream_t stream) {
  Solver& s = solver_for(stream);
  if (dtype == DType::f32)
    check(cusolverDnSpotrfBatched(s.handle, UPLO, n, reinterpret_cast<float**>(pointers), n, info, batch),
          "cusolverDnSpotrfBatched");
  else if (dtype == DType::f64)
    check(cusolverDnDpotrfBatched(s.handle, UPLO, n, reinterpret_cast<double**>(pointers), n, info, batch),
          "cusolverDnDpotrfBatched");
  else
    data_type(dtype);  // throws the dtype error
}

WorkspaceSize syevd_workspace(DType dtype, int64_t n, void* A, void* evals, cudaStream_t stream) {
  Solver& s = solver_for(stream);
  WorkspaceSize size{};
  cudaDataType t = data_type(dtype);
  check(cusolverDnXsyevd_bufferSize(s.handle, s.params, CUSOLVER_EIG_MODE_VECTOR, UPLO, n, t, A, n, t, evals, t,
                                    &size.device_bytes, &size.host_bytes),
        "cusolverDnXsyevd_bufferSize");
  return size;
}

void syevd(DType dtype, int64_t n, void* A, void* evals, void* workspace, WorkspaceSize size, int* info,
           cudaStream_t stream) {
  Solver& s = solver_for(stream);
  cudaDataType t = data_type(dtype);
  std::vector<char> host(size.host_bytes);
  check(cusolverDnXsyevd(s.handle, s.params, CUSOLVER_EIG_MODE_VECTOR, UPLO, n, t, A, n, t, evals, t, workspace,
                         size.device_bytes, host.data(), size.host_bytes, info),
        "cusolverDnXsyevd");
}

}  // namespace egn
