// Runs the CUDA kernels' block phases (csrc/tiled_gemm.h, csrc/ghat_recursion.h; and exposes csrc/solver_limits.h) on the CPU, thread by thread
// and barrier by barrier, exactly as csrc/kernels.cu sequences them; built with g++ by
// tests/ops/test_cuda_emulation.py, which compares the results with NumPy. It checks tiling, masking, strides,
// triangular tile enumeration, epilogues and chunking without a GPU (not races or memory-model effects).
#include <cstdint>
#include <vector>

#include "ghat_recursion.h"
#include "solver_limits.h"
#include "tiled_gemm.h"

using namespace kldwrm;

namespace {

template <typename T>
struct Accumulators {
  T values[kMicro][kMicro];
};

template <typename T, typename Epilogue>
void emulate_gemm(const Operand<T>& a, const Operand<T>& b, const GemmShape& shape, int64_t batch,
                  const Epilogue& epilogue, bool upper) {
  const int64_t tiles_m = (shape.m + kTile - 1) / kTile, tiles_n = (shape.n + kTile - 1) / kTile;
  const int64_t blocks = upper ? tiles_n * (tiles_n + 1) / 2 : tiles_m * tiles_n;
  for (int64_t bz = 0; bz < batch; ++bz) {
    for (int64_t block = 0; block < blocks; ++block) {
      int64_t tile_m, tile_n;
      if (upper) {
        upper_tile(block, tiles_n, &tile_m, &tile_n);
      } else {
        tile_m = block / tiles_n;
        tile_n = block % tiles_n;
      }
      SharedTiles<T> tiles;
      std::vector<Accumulators<T>> acc(kThreads, Accumulators<T>{});
      for (int64_t k0 = 0; k0 < shape.k; k0 += kDepth) {
        for (int tid = 0; tid < kThreads; ++tid) load_tiles(a, b, shape, bz, tile_m, tile_n, k0, tid, tiles);
        for (int tid = 0; tid < kThreads; ++tid) accumulate(tid, tiles, acc[tid].values);
      }
      for (int tid = 0; tid < kThreads; ++tid) store(epilogue, shape, bz, tile_m, tile_n, tid, acc[tid].values, upper);
    }
  }
}

template <typename T>
void product(const T* a, const int64_t* a_strides, const T* b, const int64_t* b_strides, int64_t m, int64_t n,
             int64_t k, int64_t batch, T* out, T alpha, const T* d_row, int64_t d_row_stride, const T* d_col,
             int64_t d_col_stride, T damping) {
  const Operand<T> left{a, a_strides[0], a_strides[1], a_strides[2]};
  const Operand<T> right{b, b_strides[0], b_strides[1], b_strides[2]};
  if (d_row == nullptr) {
    emulate_gemm(left, right, GemmShape{m, n, k}, batch, ScaleEpilogue<T>{out, m, n, alpha}, false);
  } else {
    emulate_gemm(left, right, GemmShape{m, n, k}, batch,
                 DampedDivideEpilogue<T>{out, m, n, alpha, d_row, d_row_stride, d_col, d_col_stride, damping}, false);
  }
}

// As csrc/kernels.cu's factor_gemm, with the chunk length of row_chunks given (kRowsPerChunk there).
template <typename T>
void factor_update(const T* x, int64_t rows, int64_t n, int64_t row_stride, int64_t col_stride, T* local, T* ea,
                   T* reweighted, T scale, T rho, T reweight, int first, int64_t rows_per_chunk) {
  const FactorUpdateEpilogue<T> epilogue{local, ea, reweighted, n, scale, rho, reweight, first != 0};
  const RowChunks split = row_chunks(rows, n, rows_per_chunk);
  if (split.count == 1) {
    emulate_gemm(Operand<T>{x, 0, col_stride, row_stride}, Operand<T>{x, 0, row_stride, col_stride},
                 GemmShape{n, n, rows}, 1, epilogue, true);
    return;
  }
  std::vector<T> partials(static_cast<typename std::vector<T>::size_type>(split.count * n * n), T(0));
  const int64_t full = rows / split.rows, rest = rows - full * split.rows;
  const int64_t chunk_stride = split.rows * row_stride;
  const Operand<T> transposed{x, chunk_stride, col_stride, row_stride};
  const Operand<T> plain{x, chunk_stride, row_stride, col_stride};
  emulate_gemm(transposed, plain, GemmShape{n, n, split.rows}, full, PartialEpilogue<T>{partials.data(), n, 0}, true);
  if (rest > 0) {
    const T* tail = x + full * chunk_stride;
    emulate_gemm(Operand<T>{tail, 0, col_stride, row_stride}, Operand<T>{tail, 0, row_stride, col_stride},
                 GemmShape{n, n, rest}, 1, PartialEpilogue<T>{partials.data(), n, full}, true);
  }
  for (int64_t e = 0; e < n * n; ++e) reduce_chunks(partials.data(), split.count, n, e, epilogue);
}

// Tables are filled as csrc/kernels.cu fills them; width 4 takes the vectorised path (element by element here)
// for tensors whose numel it divides, as float32 tensors with aligned storage do on the GPU.
template <typename T>
void ghat(int count, T** g_hat, T** v_prev, T** v_new, T** m, const int64_t* numel, T coef, int width) {
  GhatTable<T> table{};
  table.coef = coef;
  int64_t chunks = 0;
  auto run = [&] {
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const bool vectorised = table.tensors[ghat_tensor_of(table, chunk)].vectorised;
      for (int tid = 0; tid < kGhatThreads; ++tid) {
        if (!vectorised) {
          ghat_chunk<1>(table, chunk, tid, kGhatThreads,
                        [&](const GhatTensor<T>& t, int64_t e) { ghat_element(table, t, e); });
        } else {
          ghat_chunk<4>(table, chunk, tid, kGhatThreads, [&](const GhatTensor<T>& t, int64_t e) {
            for (int i = 0; i < 4; ++i) ghat_element(table, t, e + i);
          });
        }
      }
    }
    table.count = 0;
    chunks = 0;
  };
  for (int i = 0; i < count; ++i) {
    if (numel[i] == 0) continue;
    table.tensors[table.count++] = GhatTensor<T>{g_hat[i], v_prev[i], v_new[i], m[i], numel[i], chunks, width == 4 && numel[i] % 4 == 0};
    chunks += ghat_chunks(numel[i]);
    if (table.count == kGhatTableSize) run();
  }
  run();
}

}  // namespace

extern "C" {

void product_f64(const double* a, const int64_t* a_strides, const double* b, const int64_t* b_strides, int64_t m,
                 int64_t n, int64_t k, int64_t batch, double* out, double alpha, const double* d_row,
                 int64_t d_row_stride, const double* d_col, int64_t d_col_stride, double damping) {
  product(a, a_strides, b, b_strides, m, n, k, batch, out, alpha, d_row, d_row_stride, d_col, d_col_stride, damping);
}

void product_f32(const float* a, const int64_t* a_strides, const float* b, const int64_t* b_strides, int64_t m,
                 int64_t n, int64_t k, int64_t batch, float* out, float alpha, const float* d_row,
                 int64_t d_row_stride, const float* d_col, int64_t d_col_stride, float damping) {
  product(a, a_strides, b, b_strides, m, n, k, batch, out, alpha, d_row, d_row_stride, d_col, d_col_stride, damping);
}

void factor_update_f64(const double* x, int64_t rows, int64_t n, int64_t row_stride, int64_t col_stride,
                       double* local, double* ea, double* reweighted, double scale, double rho, double reweight,
                       int first, int64_t rows_per_chunk) {
  factor_update(x, rows, n, row_stride, col_stride, local, ea, reweighted, scale, rho, reweight, first,
                rows_per_chunk);
}

int64_t row_chunk_count(int64_t rows, int64_t n, int64_t rows_per_chunk) {
  return row_chunks(rows, n, rows_per_chunk).count;
}

int64_t rows_per_chunk_default() { return kRowsPerChunk; }

void ghat_f64(int count, double** g_hat, double** v_prev, double** v_new, double** m, const int64_t* numel,
              double coef, int width) {
  ghat(count, g_hat, v_prev, v_new, m, numel, coef, width);
}

int64_t ghat_chunk_size() { return kGhatChunk; }
int ghat_table_size() { return kGhatTableSize; }
int64_t syev_batched_capacity_of(int64_t n) { return syev_batched_capacity(n); }
}
