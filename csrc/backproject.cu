// Fused back-projection of a (sequence) linear layer: dW = Uᵀ A and db = Σ_n U[n, :] with
// U[i·T + t, o] = Σ_k u[i, k] G[i, k, t, o] formed while staging tiles, never stored.
// Exact FMA in the accumulation type (float or double); f16/bf16 factors are widened on load.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>

#include "kernels.h"
#include "simt.cuh"
#include "tiles.cuh"

namespace egn {
namespace {

// Columns [o0, o0 + TILE) of U for positions [k0, k0 + BK): tile[k][o] = U[k0 + k, o0 + o].
template <typename Acc, typename In>
struct ULoader {
  const Acc* u;
  const In* G;
  int positions, s, T, n_out, o0;
  __device__ void operator()(Acc (&tile)[BK][TILE + 1], int k0) const {
    for (int e = threadIdx.x; e < BK * TILE; e += THREADS) {
      int k = e / TILE, o = e % TILE;  // consecutive threads read consecutive outputs o: coalesced
      int n = k0 + k, go = o0 + o;
      tile[k][o] = (n < positions && go < n_out) ? backproject_u(u, G, n, go, s, T, n_out) : Acc(0);
    }
  }
};

// Columns [p0, p0 + TILE) of A (positions, n_in): tile[k][p] = A[k0 + k, p0 + p].
template <typename Acc, typename In>
struct ALoader {
  const In* A;
  int positions, n_in, p0;
  __device__ void operator()(Acc (&tile)[BK][TILE + 1], int k0) const {
    for (int e = threadIdx.x; e < BK * TILE; e += THREADS) {
      int k = e / TILE, p = e % TILE;
      int n = k0 + k, gp = p0 + p;
      tile[k][p] = (n < positions && gp < n_in) ? widen<Acc>(A[(long long)n * n_in + gp]) : Acc(0);
    }
  }
};

// grid (tiles over in, tiles over out): block (x, y) writes dW[y·TILE …, x·TILE …].
template <typename Acc, typename In>
__global__ void __launch_bounds__(THREADS) backproject_kernel(const In* A, const In* G, const Acc* u, int b, int s,
                                                               int T, int n_in, int n_out, Acc* dW) {
  int o0 = blockIdx.y * TILE, p0 = blockIdx.x * TILE, positions = b * T;
  Acc acc[MICRO][MICRO];
  simt_tile_product(ULoader<Acc, In>{u, G, positions, s, T, n_out, o0}, ALoader<Acc, In>{A, positions, n_in, p0},
                    positions, acc);
  MicroTile mine = micro_tile(threadIdx.x);
  for (int i = 0; i < MICRO; ++i)
    for (int j = 0; j < MICRO; ++j) {
      int o = o0 + mine.row0 + i, p = p0 + mine.col0 + j;
      if (o < n_out && p < n_in) dW[(long long)o * n_in + p] = acc[i][j];
    }
}

// db[o] = Σ_n U[n, o]: block (32, 8) per 32 outputs; the 8 rows of threads stride over n.
template <typename Acc, typename In>
__global__ void backproject_bias_kernel(const In* G, const Acc* u, int b, int s, int T, int n_out, Acc* db) {
  __shared__ Acc partial[8][32];
  int o = blockIdx.x * 32 + threadIdx.x;
  Acc sum = Acc(0);
  if (o < n_out)
    for (int n = threadIdx.y; n < b * T; n += 8) sum += backproject_u(u, G, n, o, s, T, n_out);
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && o < n_out) {
    for (int r = 1; r < 8; ++r) sum += partial[r][threadIdx.x];
    db[o] = sum;
  }
}

template <typename Acc, typename In>
void launch(const void* A, const void* G, const void* u, int b, int s, int T, int n_in, int n_out, void* dW, void* db,
            cudaStream_t stream) {
  dim3 grid((n_in + TILE - 1) / TILE, (n_out + TILE - 1) / TILE);
  backproject_kernel<Acc, In><<<grid, THREADS, 0, stream>>>(static_cast<const In*>(A), static_cast<const In*>(G),
                                                            static_cast<const Acc*>(u), b, s, T, n_in, n_out,
                                                            static_cast<Acc*>(dW));
  check_launch("backproject");
  if (db) {
    backproject_bias_kernel<Acc, In><<<(n_out + 31) / 32, dim3(32, 8), 0, stream>>>(
        static_cast<const In*>(G), static_cast<const Acc*>(u), b, s, T, n_out, static_cast<Acc*>(db));
    check_launch("backproject (bias)");
  }
}

}  // namespace

void backproject(const void* A, const void* G, DType in_dtype, const void* u, DType acc_dtype, int b, int s, int T,
                 int n_in, int n_out, void* dW, void* db, cudaStream_t stream) {
  if (n_in == 0 || n_out == 0) return;
  if (acc_dtype == DType::f32 && in_dtype == DType::f16)
    launch<float, half>(A, G, u, b, s, T, n_in, n_out, dW, db, stream);
  else if (acc_dtype == DType::f32 && in_dtype == DType::bf16)
    launch<float, __nv_bfloat16>(A, G, u, b, s, T, n_in, n_out, dW, db, stream);
  else if (acc_dtype == DType::f32 && in_dtype == DType::f32)
    launch<float, float>(A, G, u, b, s, T, n_in, n_out, dW, db, stream);
  else if (acc_dtype == DType::f64 && in_dtype == DType::f64)
    launch<double, double>(A, G, u, b, s, T, n_in, n_out, dW, db, stream);
  else
    throw std::invalid_argument("egn_fast._C.backproject: unsupported (factor, coefficient) dtype pair");
}

}  // namespace egn
