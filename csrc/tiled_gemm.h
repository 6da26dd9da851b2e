// Batched strided GEMM tiles with pluggable epilogues, written as phases a thread block runs between
// barriers (load, accumulate, store). The phases are __host__ __device__ so tests/cuda_emulation can run
// them on the CPU thread by thread; csrc/kernels.cu wraps them in __global__ kernels.
//
// Shapes: C[b] (M x N) = op(A[b]) (M x K) @ op(B[b]) (K x N). Operands carry batch, row and column strides
// in elements, so transposes and shared (batch stride 0) factors need no copies. Accumulation is in T
// (float or double): plain FMA, never TF32, as docs/algorithms.md §6 requires for products feeding eigenbases.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace kldwrm {

constexpr int kTile = 64;       // rows and columns of C per thread block
constexpr int kDepth = 16;      // K slice staged in shared memory per iteration
constexpr int kThreads = 256;   // 16 x 16 threads, each owning a 4 x 4 strided micro-tile
constexpr int kMicro = 4;
constexpr int kLanes = kTile / kMicro;  // 16 threads along each tile edge
constexpr int64_t kMaxGridX = 2147483647;  // CUDA's grid limits (axis x; axes y and z)
constexpr int64_t kMaxGridY = 65535;

template <typename T>
struct Operand {
  const T* data;
  int64_t batch_stride;
  int64_t row_stride;
  int64_t col_stride;

  KLD_HD T at(int64_t batch, int64_t row, int64_t col) const {
    return data[batch * batch_stride + row * row_stride + col * col_stride];
  }
};

template <typename T>
struct SharedTiles {
  T a[kDepth][kTile + 1];  // A tile stored K-major; +1 column keeps the transposed stores off one bank
  T b[kDepth][kTile + 1];
};

struct GemmShape {
  int64_t m, n, k;
};

// The (tile row, tile column) of linear tile `t` when only tiles on or above the diagonal of a
// `tiles` x `tiles` grid are launched (symmetric products).
KLD_HD void upper_tile(int64_t t, int64_t tiles, int64_t* tile_m, int64_t* tile_n) {
  int64_t row = 0;
  while (t >= tiles - row) {
    t -= tiles - row;
    ++row;
  }
  *tile_m = row;
  *tile_n = row + t;
}

// Phase 1: stage A[rows of tile_m, k0:k0+kDepth] and B[k0:k0+kDepth, cols of tile_n]; out-of-range
// entries are zero. The element each thread loads walks the operand's unit-stride direction so a warp's
// loads coalesce whether the operand is transposed or not.
template <typename T>
KLD_HD void load_tiles(const Operand<T>& a, const Operand<T>& b, const GemmShape& shape, int64_t batch,
                       int64_t tile_m, int64_t tile_n, int64_t k0, int tid, SharedTiles<T>& tiles) {
  const bool a_k_fastest = a.col_stride == 1;
  const bool b_n_fastest = b.col_stride == 1 || b.row_stride != 1;
  for (int e = tid; e < kTile * kDepth; e += kThreads) {
    int i, kk;
    if (a_k_fastest) {
      i = e / kDepth;
      kk = e % kDepth;
    } else {
      i = e % kTile;
      kk = e / kTile;
    }
    const int64_t row = tile_m * kTile + i, col = k0 + kk;
    tiles.a[kk][i] = (row < shape.m && col < shape.k) ? a.at(batch, row, col) : T(0);
  }
  for (int e = tid; e < kTile * kDepth; e += kThreads) {
    int j, kk;
    if (b_n_fastest) {
      j = e % kTile;
      kk = e / kTile;
    } else {
      j = e / kDepth;
      kk = e % kDepth;
    }
    const int64_t row = k0 + kk, col = tile_n * kTile + j;
    tiles.b[kk][j] = (row < shape.k && col < shape.n) ? b.at(batch, row, col) : T(0);
  }
}

// Phase 2: acc[r][c] += sum_kk A(tile row ty + 16 r, kk) * B(kk, tile column tx + 16 c).
template <typename T>
KLD_HD void accumulate(int tid, const SharedTiles<T>& tiles, T (&acc)[kMicro][kMicro]) {
  const int ty = tid / kLanes, tx = tid % kLanes;
  for (int kk = 0; kk < kDepth; ++kk) {
    T a_reg[kMicro], b_reg[kMicro];
    for (int r = 0; r < kMicro; ++r) a_reg[r] = tiles.a[kk][ty + kLanes * r];
    for (int c = 0; c < kMicro; ++c) b_reg[c] = tiles.b[kk][tx + kLanes * c];
    for (int r = 0; r < kMicro; ++r)
      for (int c = 0; c < kMicro; ++c) acc[r][c] += a_reg[r] * b_reg[c];
  }
}

// Phase 3: hand every in-range entry (i, j) of this thread's micro-tile to the epilogue. With
// `upper_only`, entries below the diagonal are skipped (the epilogue writes their mirror).
template <typename T, typename Epilogue>
KLD_HD void store(const Epilogue& epilogue, const GemmShape& shape, int64_t batch, int64_t tile_m, int64_t tile_n,
                  int tid, const T (&acc)[kMicro][kMicro], bool upper_only) {
  const int ty = tid / kLanes, tx = tid % kLanes;
  for (int r = 0; r < kMicro; ++r) {
    const int64_t i = tile_m * kTile + ty + kLanes * r;
    if (i >= shape.m) continue;
    for (int c = 0; c < kMicro; ++c) {
      const int64_t j = tile_n * kTile + tx + kLanes * c;
      if (j >= shape.n || (upper_only && j < i)) continue;
      epilogue(batch, i, j, acc[r][c]);
    }
  }
}

// C = alpha * (A @ B), C contiguous (batch, m, n).
template <typename T>
struct ScaleEpilogue {
  T* out;
  int64_t m, n;
  T alpha;
  KLD_HD void operator()(int64_t batch, int64_t i, int64_t j, T value) const {
    out[(batch * m + i) * n + j] = alpha * value;
  }
};

// C = alpha * (A @ B) / (d_row[i] * d_col[j] + damping): the damped eigenvalue division of P_{A,G}.
// d_row is (batch, m) and d_col (batch, n), each with its own batch stride.
template <typename T>
struct DampedDivideEpilogue {
  T* out;
  int64_t m, n;
  T alpha;
  const T* d_row;
  int64_t d_row_batch_stride;
  const T* d_col;
  int64_t d_col_batch_stride;
  T damping;
  KLD_HD void operator()(int64_t batch, int64_t i, int64_t j, T value) const {
    const T denominator = d_row[batch * d_row_batch_stride + i] * d_col[batch * d_col_batch_stride + j] + damping;
    out[(batch * m + i) * n + j] = alpha * value / denominator;
  }
};

// Factor update (docs/algorithms.md §6.1) for entry (i, j), i <= j, of S = scale * x^T x, written with its mirror:
// local = S, ea = rho * ea_old + (1 - rho) S and, when `reweighted` is set, reweighted = rho * ea_old + c S.
// ea_old is S itself on the first statistic. Each unordered pair is owned by one thread, so the in-place
// read-modify-write of ea needs no synchronisation. All matrices contiguous (n, n).
template <typename T>
struct FactorUpdateEpilogue {
  T* local;
  T* ea;
  T* reweighted;  // nullptr: not wanted
  int64_t n;
  T scale, rho, reweight;
  bool first;
  KLD_HD void operator()(int64_t, int64_t i, int64_t j, T value) const {
    const T s = scale * value;
    const int64_t upper = i * n + j, lower = j * n + i;
    const T old = first ? s : ea[upper];
    local[upper] = s;
    local[lower] = s;
    const T averaged = rho * old + (T(1) - rho) * s;
    ea[upper] = averaged;
    ea[lower] = averaged;
    if (reweighted != nullptr) {
      const T hat = rho * old + reweight * s;
      reweighted[upper] = hat;
      reweighted[lower] = hat;
    }
  }
};

// Row-parallel factor update (docs/algorithms.md §6.1): when the upper tiles alone would give the GPU few blocks
// (a convolution's input factor: batch x locations rows, small n), the rows are split into chunks. Stage 1 is the
// batched GEMM with one chunk per batch entry, writing partial Gram entries (PartialEpilogue); stage 2 sums each
// entry's chunks in chunk order and applies the factor-update epilogue (reduce_chunks). No atomics: the result
// does not depend on scheduling. The split is a function of the shapes only.
constexpr int64_t kRowsPerChunk = 4096;  // a chunk has at least this many rows (rounded up to kDepth)
constexpr int64_t kTargetBlocks = 1024;  // chunks are added until upper tiles x chunks reach about this many

struct RowChunks {
  int64_t count;  // number of chunks; the last may be shorter
  int64_t rows;   // rows per chunk
};

KLD_HD RowChunks row_chunks(int64_t rows, int64_t n, int64_t rows_per_chunk = kRowsPerChunk) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int64_t upper = tiles * (tiles + 1) / 2;
  const int64_t by_rows = (rows + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t by_blocks = kTargetBlocks / upper > 1 ? kTargetBlocks / upper : 1;
  const int64_t wanted = by_rows < by_blocks ? by_rows : by_blocks;
  if (wanted <= 1) return RowChunks{1, rows};
  const int64_t per_chunk = kDepth * (((rows + wanted - 1) / wanted + kDepth - 1) / kDepth);
  return RowChunks{(rows + per_chunk - 1) / per_chunk, per_chunk};
}

// Stage 1: entry (i, j) of chunk `chunk_offset + batch`'s partial Gram into partials (chunks, n, n).
template <typename T>
struct PartialEpilogue {
  T* partials;
  int64_t n;
  int64_t chunk_offset;
  KLD_HD void operator()(int64_t batch, int64_t i, int64_t j, T value) const {
    partials[((chunk_offset + batch) * n + i) * n + j] = value;
  }
};

// Stage 2, for linear entry e = i * n + j of the n x n factor: entries on or above the diagonal sum their chunks
// in chunk order and go to the epilogue (which writes the mirror); entries below are skipped.
template <typename T, typename Epilogue>
KLD_HD void reduce_chunks(const T* partials, int64_t chunks, int64_t n, int64_t e, const Epilogue& epilogue) {
  const int64_t i = e / n, j = e % n;
  if (j < i) return;
  T sum = T(0);
  for (int64_t c = 0; c < chunks; ++c) sum += partials[c * n * n + e];
  epilogue(0, i, j, sum);
}

}  // namespace kldwrm
