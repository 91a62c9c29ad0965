// Gram kernels: K += (X Xᵀ) ∘ (W ⊗ 1_{s×s} + bias_add), one thread block per 64×64 tile of K's
// lower triangle, mirrored into the upper one (index math in tiles.cuh).
//   - gram_simt_kernel: exact FMA in float or double (the reference's arithmetic).
//   - gram_mma_kernel:  tensor cores (wmma) for f16/bf16 inputs and tf32, fp32 accumulation.
#include <mma.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "kernels.h"
#include "simt.cuh"
#include "tiles.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "egn_fast._C needs compute capability 8.0 or newer (bf16/tf32 tensor cores): set TORCH_CUDA_ARCH_LIST"
#endif

namespace egn {
namespace {

using namespace nvcuda;

// Rows [row0, row0 + TILE) of X (rows, n), columns [k0, k0 + BK), transposed into tile[k][row];
// zero outside X.
template <typename T>
struct RowsLoader {
  const T* X;
  int rows, n, row0;
  __device__ void operator()(T (&tile)[BK][TILE + 1], int k0) const {
    for (int e = threadIdx.x; e < BK * TILE; e += THREADS) {
      int row = e / BK, k = e % BK;  // consecutive threads read consecutive k: coalesced
      int gr = row0 + row, gk = k0 + k;
      tile[k][row] = (gr < rows && gk < n) ? X[(long long)gr * n + gk] : T(0);
    }
  }
};

template <typename T>
__global__ void __launch_bounds__(THREADS) gram_simt_kernel(const T* X, int m, int n, const T* W, long long ldw,
                                                            int s, T bias_add, T* K, long long ldk) {
  TilePair tile = lower_tile(blockIdx.x);
  T acc[MICRO][MICRO];
  simt_tile_product(RowsLoader<T>{X, m, n, tile.row * TILE}, RowsLoader<T>{X, m, n, tile.col * TILE}, n, acc);
  MicroTile mine = micro_tile(threadIdx.x);
  for (int i = 0; i < MICRO; ++i)
    for (int j = 0; j < MICRO; ++j) {
      int lr = mine.row0 + i, lc = mine.col0 + j;
      gram_store(K, ldk, m, tile, lr, lc, acc[i][j], W, ldw, s, bias_add);
    }
}

// Fragment element type and k-step of one wmma for each input type.
template <typename In>
struct Mma;
template <>
struct Mma<half> {
  using Frag = half;
  static constexpr int KS = 16;
};
template <>
struct Mma<__nv_bfloat16> {
  using Frag = __nv_bfloat16;
  static constexpr int KS = 16;
};
template <>
struct Mma<float> {  // tf32: operands rounded to 10 mantissa bits, products summed in fp32
  using Frag = wmma::precision::tf32;
  static constexpr int KS = 8;
};

constexpr int MMA_BK = 32;          // k-columns staged in shared memory per step
constexpr int MMA_LD = MMA_BK + 8;  // row pitch: a multiple of 16 bytes, as wmma loads need
constexpr int OUT_LD = TILE + 4;

template <typename In>
__device__ void stage_rows(In (&tile)[TILE][MMA_LD], const In* X, int rows, int n, int row0, int k0) {
  const In zero{};  // all-zero bits: 0 in every format
  for (int e = threadIdx.x; e < TILE * MMA_BK; e += THREADS) {
    int row = e / MMA_BK, k = e % MMA_BK;
    int gr = row0 + row, gk = k0 + k;
    tile[row][k] = (gr < rows && gk < n) ? X[(long long)gr * n + gk] : zero;
  }
}

// 8 warps; warp w computes rows 16·(w/2) … +16 and columns 32·(w%2) … +32 of the 64×64 tile.
template <typename In>
__global__ void __launch_bounds__(THREADS) gram_mma_kernel(const In* X, int m, int n, const float* W, long long ldw,
                                                           int s, float bias_add, float* K, long long ldk) {
  using Frag = typename Mma<In>::Frag;
  constexpr int KS = Mma<In>::KS;
  __shared__ __align__(32) In rows_i[TILE][MMA_LD];
  __shared__ __align__(32) In rows_j[TILE][MMA_LD];
  __shared__ __align__(32) float out[TILE][OUT_LD];

  TilePair tile = lower_tile(blockIdx.x);
  int warp = threadIdx.x / 32;
  int wr = (warp / 2) * 16, wc = (warp % 2) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, KS, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);

  for (int k0 = 0; k0 < n; k0 += MMA_BK) {
    stage_rows(rows_i, X, m, n, tile.row * TILE, k0);
    stage_rows(rows_j, X, m, n, tile.col * TILE, k0);
    __syncthreads();
    for (int kk = 0; kk < MMA_BK; kk += KS) {
      wmma::fragment<wmma::matrix_a, 16, 16, KS, Frag, wmma::row_major> a;
      wmma::load_matrix_sync(a, &rows_i[wr][kk], MMA_LD);
      if constexpr (sizeof(In) == 4)
        for (int t = 0; t < a.num_elements; ++t) a.x[t] = wmma::__float_to_tf32(a.x[t]);
      for (int h = 0; h < 2; ++h) {
        // (X Xᵀ)[r, c] needs row c of X as a column: rows_j read column-major is exactly that.
        wmma::fragment<wmma::matrix_b, 16, 16, KS, Frag, wmma::col_major> bt;
        wmma::load_matrix_sync(bt, &rows_j[wc + 16 * h][kk], MMA_LD);
        if constexpr (sizeof(In) == 4)
          for (int t = 0; t < bt.num_elements; ++t) bt.x[t] = wmma::__float_to_tf32(bt.x[t]);
        wmma::mma_sync(acc[h], a, bt, acc[h]);
      }
    }
    __syncthreads();
  }
  wmma::store_matrix_sync(&out[wr][wc], acc[0], OUT_LD, wmma::mem_row_major);
  wmma::store_matrix_sync(&out[wr][wc + 16], acc[1], OUT_LD, wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < TILE * TILE; e += THREADS) {
    int lr = e / TILE, lc = e % TILE;
    gram_store(K, ldk, m, tile, lr, lc, out[lr][lc], W, ldw, s, bias_add);
  }
}

template <typename In>
void launch_mma(const void* X, int m, int n, const void* W, long long ldw, int s, double bias_add, void* K,
                long long ldk, cudaStream_t stream) {
  gram_mma_kernel<In><<<(unsigned)lower_tile_count(m), THREADS, 0, stream>>>(
      static_cast<const In*>(X), m, n, static_cast<const float*>(W), ldw, s, (float)bias_add, static_cast<float*>(K),
      ldk);
}

template <typename T>
void launch_simt(const void* X, int m, int n, const void* W, long long ldw, int s, double bias_add, void* K,
                 long long ldk, cudaStream_t stream) {
  gram_simt_kernel<T><<<(unsigned)lower_tile_count(m), THREADS, 0, stream>>>(
      static_cast<const T*>(X), m, n, static_cast<const T*>(W), ldw, s, (T)bias_add, static_cast<T*>(K), ldk);
}

}  // namespace

void gram_rows(const void* X, DType x_dtype, int m, int n, const void* W, long long ldw, int s, double bias_add,
               void* K, DType k_dtype, long long ldk, bool allow_tf32, cudaStream_t stream) {
  if (m == 0) return;
  if (k_dtype == DType::f32 && x_dtype == DType::f16)
    launch_mma<half>(X, m, n, W, ldw, s, bias_add, K, ldk, stream);
  else if (k_dtype == DType::f32 && x_dtype == DType::bf16)
    launch_mma<__nv_bfloat16>(X, m, n, W, ldw, s, bias_add, K, ldk, stream);
  else if (k_dtype == DType::f32 && x_dtype == DType::f32 && allow_tf32)
    launch_mma<float>(X, m, n, W, ldw, s, bias_add, K, ldk, stream);
  else if (k_dtype == DType::f32 && x_dtype == DType::f32)
    launch_simt<float>(X, m, n, W, ldw, s, bias_add, K, ldk, stream);
  else if (k_dtype == DType::f64 && x_dtype == DType::f64)
    launch_simt<double>(X, m, n, W, ldw, s, bias_add, K, ldk, stream);
  else
    throw std::invalid_argument("egn_fast._C.gram_rows: unsupported (factor, Gram) dtype pair");
  check_launch("gram_rows");
}

}  // namespace egn
