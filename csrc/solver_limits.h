// Limits of cuSOLVER's batched symmetric eigensolver, kept apart from eigh.cpp so that
// tests/cuda_emulation can check them on a machine without CUDA.
#pragma once

#include <cstdint>

namespace kldwrm {

// cusolverDnXsyevBatched is documented to need n * lda * batchSize <= INT32_MAX (its workspace and the matrices
// are indexed in 32 bits inside). The number of n x n matrices (lda = n) one call may take, at least 0: below 2
// the batched routine has nothing to offer and each matrix goes through cusolverDnXsyevd (64-bit indexing).
inline int64_t syev_batched_capacity(int64_t n) {
  constexpr int64_t kInt32Max = 2147483647;
  return n <= 0 ? 0 : kInt32Max / (n * n);
}

}  // namespace kldwrm
