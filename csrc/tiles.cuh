// Index math shared by the CUDA kernels (gram.cu, backproject.cu) and the CPU emulation test
// (tests/csrc/emulate_tiles.cpp). Everything here is plain arithmetic on host and device, so the
// tiling, lower-triangle enumeration, mirroring, weighting and the fused back-projection load can
// be checked by g++ on a machine without a GPU.
//
// Conventions (docs/design.md §2): rows are sample-major, row r = i·s + k belongs to sample i = r / s.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#ifndef __CUDACC__
#define EGN_HD inline
#else
#define EGN_HD __host__ __device__ __forceinline__
#endif

namespace egn {

// Output tile of every kernel: TILE × TILE entries, one block of THREADS threads. In the FMA
// kernels each thread owns a MICRO × MICRO micro-tile; operands are staged BK k-columns at a time.
constexpr int TILE = 64;
constexpr int THREADS = 256;
constexpr int BK = 16;
constexpr int MICRO = 4;
static_assert(MICRO * MICRO * THREADS == TILE * TILE, "micro-tiles must cover the tile");

// Top-left corner (row, column) of thread `tid`'s micro-tile inside the tile.
struct MicroTile {
  int row0, col0;
};
EGN_HD MicroTile micro_tile(int tid) {
  return MicroTile{(tid / (TILE / MICRO)) * MICRO, (tid % (TILE / MICRO)) * MICRO};
}

// A factor value in the accumulation type. torch builds with __CUDA_NO_HALF_CONVERSIONS__, so the
// 16-bit types are converted by name.
template <typename Acc, typename In>
EGN_HD Acc widen(In x) {
  return Acc(x);
}
#ifdef __CUDACC__
template <>
EGN_HD float widen<float, half>(half x) {
  return __half2float(x);
}
template <>
EGN_HD float widen<float, __nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
#endif

struct TilePair {
  int row;  // tile row index ti
  int col;  // tile column index tj ≤ ti
};

// Number of tiles on one side of an m × m matrix.
EGN_HD int tiles_per_side(int m) { return (m + TILE - 1) / TILE; }

// Number of lower-triangle tiles (ti ≥ tj): one thread block each.
EGN_HD long long lower_tile_count(int m) {
  long long n = tiles_per_side(m);
  return n * (n + 1) / 2;
}

// The linear block index → (ti, tj) with ti ≥ tj, row by row: row ti starts at ti(ti+1)/2.
// Found by the integer square root and corrected by ±1 so float rounding cannot misplace it.
EGN_HD TilePair lower_tile(long long linear) {
  long long ti = (long long)((sqrt(8.0 * (double)linear + 1.0) - 1.0) * 0.5);
  while (ti * (ti + 1) / 2 > linear) --ti;
  while ((ti + 1) * (ti + 2) / 2 <= linear) ++ti;
  return TilePair{(int)ti, (int)(linear - ti * (ti + 1) / 2)};
}

// Adds dot·weight to K for the entry (lr, lc) of tile pair (ti, tj), i.e. r = ti·TILE + lr,
// c = tj·TILE + lc, where dot = (X Xᵀ)[r, c] and weight = W[r/s, c/s] + bias_add for a symmetric
// sample-level weight W (b, b) (leading dimension ldw), or 1 when W is null. Entries past m are
// skipped before W is read. A diagonal tile (ti == tj) is computed whole and adds only K[r, c]; a
// tile below the diagonal also adds the mirror K[c, r], which no block computes. So every entry of
// K is written by exactly one thread of one block: no atomics.
template <typename T>
EGN_HD void gram_store(T* K, long long ldk, int m, TilePair tile, int lr, int lc, T dot, const T* W, long long ldw,
                       int s, T bias_add) {
  int r = tile.row * TILE + lr;
  int c = tile.col * TILE + lc;
  if (r >= m || c >= m) return;
  T value = W ? dot * (W[(long long)(r / s) * ldw + c / s] + bias_add) : dot;
  K[(long long)r * ldk + c] += value;
  if (tile.row != tile.col) K[(long long)c * ldk + r] += value;
}

// The fused back-projection's left operand: U[n, o] = Σ_k u[i, k] · G[i, k, t, o] for the flattened
// position n = i·T + t. u (b, s) and G (b, s, T, out) are contiguous.
template <typename Acc, typename In>
EGN_HD Acc backproject_u(const Acc* u, const In* G, int n, int o, int s, int T, int out) {
  int i = n / T, t = n - i * T;
  Acc sum = Acc(0);
  for (int k = 0; k < s; ++k)
    sum += u[(long long)i * s + k] * widen<Acc>(G[(((long long)i * s + k) * T + t) * out + o]);
  return sum;
}

}  // namespace egn
