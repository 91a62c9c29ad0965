// The exact (FMA, no tensor cores) tile product shared by the Gram and back-projection kernels:
// one 64×64 output tile per block of 256 threads, each thread a 4×4 micro-tile, operands staged
// through shared memory BK k-columns at a time by loader functors (which is where the kernels
// differ: plain rows of X, or the fused U = Σ_k u_k G_k of the back-projection).
#pragma once

#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>

#include "tiles.cuh"

namespace egn {

// acc[i][j] = Σ_k left(row0 + i, k) · right(col0 + j, k) over k < kdim for this thread's
// micro_tile (row0, col0), where
// load_left / load_right fill tile[k][row] for k-columns [k0, k0 + BK) (zero past the ends).
template <typename T, class LoadLeft, class LoadRight>
__device__ void simt_tile_product(const LoadLeft& load_left, const LoadRight& load_right, int kdim,
                                  T (&acc)[MICRO][MICRO]) {
  __shared__ T left[BK][TILE + 1];  // +1: successive k of one row fall in different banks
  __shared__ T right[BK][TILE + 1];
  MicroTile mine = micro_tile(threadIdx.x);
  for (int i = 0; i < MICRO; ++i)
    for (int j = 0; j < MICRO; ++j) acc[i][j] = T(0);
  for (int k0 = 0; k0 < kdim; k0 += BK) {
    load_left(left, k0);
    load_right(right, k0);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      T a[MICRO], b[MICRO];
      for (int i = 0; i < MICRO; ++i) a[i] = left[k][mine.row0 + i];
      for (int j = 0; j < MICRO; ++j) b[j] = right[k][mine.col0 + j];
      for (int i = 0; i < MICRO; ++i)
        for (int j = 0; j < MICRO; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
}

// Turns a failed kernel launch into a C++ exception (a Python RuntimeError through pybind11).
inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("egn_fast._C.") + what + ": CUDA launch failed: " + cudaGetErrorString(err));
}

}  // namespace egn
