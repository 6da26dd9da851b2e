// KLD_HD marks functions that run in CUDA kernels and, compiled by a plain C++ compiler, on the CPU
// (tests/cuda_emulation runs the kernels' block phases that way).
#pragma once

#if defined(__CUDACC__)
#define KLD_HD __host__ __device__ __forceinline__
#else
#define KLD_HD inline
#endif
