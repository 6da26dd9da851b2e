// The Ĝ recursion (S103) over many tensors in one launch: Ĝ <- V_new + coef (Ĝ - V_prev - M),
// V_prev <- V_new, element-wise. Tensors are described in a table passed by value as a kernel argument
// (no host-to-device copy); each thread block owns one chunk of one tensor. __host__ __device__ so
// tests/cuda_emulation can run a block's work on the CPU.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace kldwrm {

constexpr int kGhatThreads = 256;
constexpr int64_t kGhatChunk = 16384;  // elements per block; a multiple of every vector width used
constexpr int kGhatTableSize = 48;     // tensors per launch (keeps the argument table under 4 KiB)

template <typename T>
struct GhatTensor {
  T* g_hat;
  T* v_prev;
  const T* v_new;
  const T* m;
  int64_t numel;
  int64_t first_chunk;  // index of this tensor's first chunk among all chunks of the launch
  bool vectorised;      // all four pointers aligned to the vector width and numel a multiple of it
};

template <typename T>
struct GhatTable {
  GhatTensor<T> tensors[kGhatTableSize];
  int count;
  T coef;
};

template <typename T>
KLD_HD void ghat_element(const GhatTable<T>& table, const GhatTensor<T>& t, int64_t e) {
  const T fresh = t.v_new[e];
  t.g_hat[e] = fresh + table.coef * ((t.g_hat[e] - t.v_prev[e]) - t.m[e]);
  t.v_prev[e] = fresh;
}

// The tensor that chunk `chunk` belongs to (tables are short and sorted by first_chunk).
template <typename T>
KLD_HD int ghat_tensor_of(const GhatTable<T>& table, int64_t chunk) {
  int index = 0;
  while (index + 1 < table.count && table.tensors[index + 1].first_chunk <= chunk) ++index;
  return index;
}

// Thread `tid` of `threads` calls body(t, e) for e = start + tid * width, start + (tid + threads) * width, ...
// below the end of the chunk; `width` elements from e on are the body's (the vectorised path loads them as
// one vector, which needs width-aligned pointers and a numel divisible by width).
template <int width, typename T, typename Body>
KLD_HD void ghat_chunk(const GhatTable<T>& table, int64_t chunk, int tid, int threads, const Body& body) {
  const GhatTensor<T>& t = table.tensors[ghat_tensor_of(table, chunk)];
  const int64_t start = (chunk - t.first_chunk) * kGhatChunk;
  const int64_t end = start + kGhatChunk < t.numel ? start + kGhatChunk : t.numel;
  for (int64_t e = start + int64_t(tid) * width; e < end; e += int64_t(threads) * width) body(t, e);
}

// Chunks a tensor of `numel` elements occupies.
KLD_HD int64_t ghat_chunks(int64_t numel) { return (numel + kGhatChunk - 1) / kGhatChunk; }

}  // namespace kldwrm
