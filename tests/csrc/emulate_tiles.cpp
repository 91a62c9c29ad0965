// CPU emulation of the CUDA kernels' index math (csrc/tiles.cuh), compiled with g++ by
// tests/test_cuda_ext.py. It replays the kernels' block/thread structure (one block per
// lower-triangle tile, THREADS threads owning MICRO × MICRO micro-tiles, BK-wide k-steps) with
// the same tiles.cuh functions, on random ragged inputs, against direct references:
//   gram:        K0 + (X Xᵀ) ∘ (W ⊗ 1_{s×s} + bias_add)   (and W absent: K0 + X Xᵀ)
//   backproject: dW = Σ_{i,t} (Σ_k u_ik G_ik,t) a_i,tᵀ, db = Σ_{i,k,t} u_ik G_ik,t
// Shared memory, warps and the tensor-core path are not emulated. Prints one line per failure,
// exits 1 on any.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "tiles.cuh"

using egn::BK;
using egn::MICRO;
using egn::THREADS;
using egn::TILE;

static int failures = 0;
static std::mt19937_64 rng(1234);

static std::vector<double> randn(size_t n) {
  std::normal_distribution<double> dist;
  std::vector<double> v(n);
  for (double& x : v) x = dist(rng);
  return v;
}

static void expect_close(const char* what, double got, double want, long long where) {
  if (std::fabs(got - want) > 1e-11 * (1.0 + std::fabs(want))) {
    if (failures++ < 10) std::printf("FAIL %s at %lld: got %.17g want %.17g\n", what, where, got, want);
  }
}

// Every linear block index maps to a distinct lower-triangle tile, in row order, covering all.
static void check_lower_tiles(int n_tiles) {
  long long linear = 0;
  for (int ti = 0; ti < n_tiles; ++ti)
    for (int tj = 0; tj <= ti; ++tj, ++linear) {
      egn::TilePair t = egn::lower_tile(linear);
      if (t.row != ti || t.col != tj) {
        if (failures++ < 10) std::printf("FAIL lower_tile(%lld) = (%d, %d), want (%d, %d)\n", linear, t.row, t.col, ti, tj);
      }
    }
}

// Each (lr, lc) of a tile is owned by exactly one (thread, i, j).
static void check_micro_tiles() {
  std::vector<int> owners(TILE * TILE, 0);
  for (int tid = 0; tid < THREADS; ++tid) {
    egn::MicroTile mt = egn::micro_tile(tid);
    for (int i = 0; i < MICRO; ++i)
      for (int j = 0; j < MICRO; ++j) owners[(mt.row0 + i) * TILE + mt.col0 + j]++;
  }
  for (int e = 0; e < TILE * TILE; ++e)
    if (owners[e] != 1 && failures++ < 10) std::printf("FAIL micro-tile entry %d owned %d times\n", e, owners[e]);
}

static void check_gram(int b, int s, int n, bool weighted, double bias_add) {
  int m = b * s;
  std::vector<double> X = randn((size_t)m * n), K0 = randn((size_t)m * m), A = randn((size_t)b * 3);
  std::vector<double> W((size_t)b * b);  // symmetric like A Aᵀ, as the mirror assumes
  for (int i = 0; i < b; ++i)
    for (int j = 0; j < b; ++j) W[i * b + j] = A[i * 3] * A[j * 3] + A[i * 3 + 1] * A[j * 3 + 1] + A[i * 3 + 2] * A[j * 3 + 2];
  const double* Wp = weighted ? W.data() : nullptr;
  std::vector<double> K = K0;
  for (long long block = 0; block < egn::lower_tile_count(m); ++block) {
    egn::TilePair tile = egn::lower_tile(block);
    for (int tid = 0; tid < THREADS; ++tid) {
      egn::MicroTile mt = egn::micro_tile(tid);
      double acc[MICRO][MICRO] = {};
      for (int k0 = 0; k0 < n; k0 += BK)  // the kernel's k-steps, zero past the ends
        for (int k = k0; k < k0 + BK && k < n; ++k)
          for (int i = 0; i < MICRO; ++i)
            for (int j = 0; j < MICRO; ++j) {
              int r = tile.row * TILE + mt.row0 + i, c = tile.col * TILE + mt.col0 + j;
              if (r < m && c < m) acc[i][j] += X[(size_t)r * n + k] * X[(size_t)c * n + k];
            }
      for (int i = 0; i < MICRO; ++i)
        for (int j = 0; j < MICRO; ++j) {
          int lr = mt.row0 + i, lc = mt.col0 + j;
          egn::gram_store(K.data(), m, m, tile, lr, lc, acc[i][j], Wp, b, s, bias_add);
        }
    }
  }
  for (int r = 0; r < m; ++r)
    for (int c = 0; c < m; ++c) {
      double dot = 0;
      for (int k = 0; k < n; ++k) dot += X[(size_t)r * n + k] * X[(size_t)c * n + k];
      double weight = weighted ? W[(r / s) * b + c / s] + bias_add : 1.0;
      expect_close("gram", K[(size_t)r * m + c], K0[(size_t)r * m + c] + dot * weight, (long long)r * m + c);
    }
}

static void check_backproject(int b, int s, int T, int n_in, int n_out) {
  int positions = b * T;
  std::vector<double> A = randn((size_t)positions * n_in), G = randn((size_t)b * s * T * n_out), u = randn((size_t)b * s);
  std::vector<double> dW((size_t)n_out * n_in, NAN), db(n_out, 0.0);
  for (int by = 0; by < (n_out + TILE - 1) / TILE; ++by)
    for (int bx = 0; bx < (n_in + TILE - 1) / TILE; ++bx)
      for (int tid = 0; tid < THREADS; ++tid) {
        egn::MicroTile mt = egn::micro_tile(tid);
        double acc[MICRO][MICRO] = {};
        for (int k0 = 0; k0 < positions; k0 += BK)
          for (int pos = k0; pos < k0 + BK && pos < positions; ++pos)
            for (int i = 0; i < MICRO; ++i)
              for (int j = 0; j < MICRO; ++j) {
                int o = by * TILE + mt.row0 + i, p = bx * TILE + mt.col0 + j;
                if (o < n_out && p < n_in)
                  acc[i][j] += egn::backproject_u(u.data(), G.data(), pos, o, s, T, n_out) * A[(size_t)pos * n_in + p];
              }
        for (int i = 0; i < MICRO; ++i)
          for (int j = 0; j < MICRO; ++j) {
            int o = by * TILE + mt.row0 + i, p = bx * TILE + mt.col0 + j;
            if (o < n_out && p < n_in) dW[(size_t)o * n_in + p] = acc[i][j];
          }
      }
  for (int o = 0; o < n_out; ++o)
    for (int pos = 0; pos < positions; ++pos) db[o] += egn::backproject_u(u.data(), G.data(), pos, o, s, T, n_out);
  for (int o = 0; o < n_out; ++o) {
    double want_db = 0;
    for (int p = 0; p < n_in; ++p) {
      double want = 0;
      for (int i = 0; i < b; ++i)
        for (int k = 0; k < s; ++k)
          for (int t = 0; t < T; ++t) {
            double g = G[(((size_t)i * s + k) * T + t) * n_out + o];
            want += u[i * s + k] * g * A[((size_t)i * T + t) * n_in + p];
            if (p == 0) want_db += u[i * s + k] * g;
          }
      expect_close("backproject dW", dW[(size_t)o * n_in + p], want, (long long)o * n_in + p);
    }
    expect_close("backproject db", db[o], want_db, o);
  }
}

int main() {
  for (int n_tiles : {1, 2, 3, 17, 300, 2048}) check_lower_tiles(n_tiles);
  check_micro_tiles();
  // ragged sizes: m not a multiple of TILE, s not dividing TILE, n not a multiple of BK
  check_gram(1, 1, 1, false, 0.0);
  check_gram(7, 3, 5, true, 1.0);
  check_gram(45, 3, 37, true, 0.0);   // m = 135: three tile rows, six blocks
  check_gram(33, 4, 19, true, 1.0);   // m = 132, tile edges cut samples
  check_gram(70, 1, 16, false, 0.0);  // W absent (per-sample Gram), n = BK exactly
  check_backproject(3, 2, 1, 5, 4);
  check_backproject(5, 3, 7, 70, 66);  // two tiles each way, positions 35 not a multiple of BK
  check_backproject(2, 1, 40, 1, 129);
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("OK\n");
  return 0;
}
