// Symmetric eigendecomposition of many equal-size factors with cuSOLVER on the input's stream:
// cusolverDnXsyevBatched for batches, in chunks within its documented size limit (solver_limits.h), and
// cusolverDnXsyevd for single matrices or sizes the batched routine cannot take. Convergence flags stay on the
// device (the caller decides when to look at them); only argument and launch errors raise here.
//
// Layout of the result, the one torch.linalg.eigh returns: eigenvectors (..., n, n) with column j the
// eigenvector of eigenvalue j, stored column-major per matrix (strides (..., 1, n)), in a tensor of its own
// (not a view: Python code may compare a tensor's `_base` to recover stacks).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cusolverDn.h>

#include <algorithm>
#include <unordered_map>
#include <vector>

#include "checks.h"
#include "operations.h"
#include "solver_limits.h"

namespace kldwrm {
namespace {

constexpr const char* kOp = "eigh_cuda";

void check_status(cusolverStatus_t status, const char* call) {
  TORCH_CHECK(status == CUSOLVER_STATUS_SUCCESS, kOp, ": ", call, " failed with cuSOLVER status ",
              static_cast<int>(status));
}

// One cuSOLVER handle per thread and device (handles must not be shared by concurrent threads), bound to
// torch's current stream at every call. Deliberately never destroyed: destruction at thread exit can run
// after the CUDA runtime has shut down.
cusolverDnHandle_t solver_handle(const at::Device& device) {
  thread_local std::unordered_map<int, cusolverDnHandle_t> handles;
  cusolverDnHandle_t& handle = handles[device.index()];
  if (handle == nullptr) check_status(cusolverDnCreate(&handle), "cusolverDnCreate");
  check_status(cusolverDnSetStream(handle, c10::cuda::getCurrentCUDAStream(device.index()).stream()),
               "cusolverDnSetStream");
  return handle;
}

class SolverParams {
 public:
  SolverParams() { check_status(cusolverDnCreateParams(&params_), "cusolverDnCreateParams"); }
  ~SolverParams() { cusolverDnDestroyParams(params_); }
  SolverParams(const SolverParams&) = delete;
  SolverParams& operator=(const SolverParams&) = delete;
  cusolverDnParams_t get() const { return params_; }

 private:
  cusolverDnParams_t params_ = nullptr;
};

// Workspaces: the device one from torch's stream-ordered caching allocator; the host one (usually empty) is
// kept until the stream has finished with it, since cuSOLVER does not promise to be done with it on return.
struct Workspace {
  at::Tensor device;
  std::vector<char> host;
  cudaStream_t stream;
  Workspace(size_t device_bytes, size_t host_bytes, const at::TensorOptions& options, cudaStream_t stream)
      : device(at::empty({static_cast<int64_t>(device_bytes)}, options.dtype(at::kByte))),
        host(host_bytes),
        stream(stream) {}
  ~Workspace() {
    if (!host.empty()) cudaStreamSynchronize(stream);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  void* device_ptr() { return device.numel() ? device.data_ptr() : nullptr; }
  void* host_ptr() { return host.empty() ? nullptr : host.data(); }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> eigh_cuda(const at::Tensor& matrix) {
  check_cuda(kOp, "matrix", matrix);
  check_floating(kOp, "matrix", matrix);
  TORCH_CHECK(matrix.dim() >= 2 && matrix.size(-1) == matrix.size(-2), kOp,
              ": matrix must be (..., n, n) with square trailing dimensions, got ", matrix.sizes());
  const int64_t n = matrix.size(-1);
  const auto batch_shape = matrix.sizes().slice(0, matrix.dim() - 2);
  std::vector<int64_t> value_shape(batch_shape.begin(), batch_shape.end());
  value_shape.push_back(n);
  const int64_t batch = n == 0 ? 0 : matrix.numel() / (n * n);

  const c10::cuda::CUDAGuard guard(matrix.device());
  // cuSOLVER works in place on column-major matrices: column-major strides per matrix are both its input
  // layout and the documented output layout, so the eigenvectors need no transpose.
  std::vector<int64_t> vector_strides(matrix.dim());
  int64_t stride = n * n;
  vector_strides[matrix.dim() - 2] = 1;
  vector_strides[matrix.dim() - 1] = n;
  for (int64_t d = matrix.dim() - 3; d >= 0; --d) {
    vector_strides[d] = stride;
    stride *= matrix.size(d);
  }
  at::Tensor vectors = at::empty_strided(matrix.sizes(), vector_strides, matrix.options());
  vectors.copy_(matrix);
  at::Tensor values = at::empty(value_shape, matrix.options());
  at::Tensor info = at::zeros(batch_shape, matrix.options().dtype(at::kInt));
  if (batch == 0 || n == 0) return {values, vectors, info};

  const cudaDataType type = matrix.scalar_type() == at::kDouble ? CUDA_R_64F : CUDA_R_32F;
  const cusolverDnHandle_t handle = solver_handle(matrix.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(matrix.device().index()).stream();
  const SolverParams params;
  const auto jobz = CUSOLVER_EIG_MODE_VECTOR;
  const auto uplo = CUBLAS_FILL_MODE_LOWER;
  const int64_t element = static_cast<int64_t>(matrix.element_size());
  char* const vector_data = static_cast<char*>(vectors.data_ptr());
  char* const value_data = static_cast<char*>(values.data_ptr());
  int* const info_data = info.data_ptr<int>();
  int64_t done = 0;
#if defined(CUSOLVER_VERSION) && CUSOLVER_VERSION >= 11701
  const int64_t capacity = syev_batched_capacity(n);
  while (capacity >= 2 && batch - done >= 2) {
    const int64_t count = std::min(capacity, batch - done);
    void* const a = vector_data + done * n * n * element;
    void* const w = value_data + done * n * element;
    size_t device_bytes = 0, host_bytes = 0;
    check_status(cusolverDnXsyevBatched_bufferSize(handle, params.get(), jobz, uplo, n, type, a, n, type, w, type,
                                                   &device_bytes, &host_bytes, count),
                 "cusolverDnXsyevBatched_bufferSize");
    Workspace workspace(device_bytes, host_bytes, matrix.options(), stream);
    check_status(cusolverDnXsyevBatched(handle, params.get(), jobz, uplo, n, type, a, n, type, w, type,
                                        workspace.device_ptr(), device_bytes, workspace.host_ptr(), host_bytes,
                                        info_data + done, count),
                 "cusolverDnXsyevBatched");
    done += count;
  }
#endif
  if (done == batch) return {values, vectors, info};
  size_t device_bytes = 0, host_bytes = 0;
  check_status(cusolverDnXsyevd_bufferSize(handle, params.get(), jobz, uplo, n, type, vector_data, n, type,
                                           value_data, type, &device_bytes, &host_bytes),
               "cusolverDnXsyevd_bufferSize");
  Workspace workspace(device_bytes, host_bytes, matrix.options(), stream);
  for (int64_t b = done; b < batch; ++b) {
    check_status(cusolverDnXsyevd(handle, params.get(), jobz, uplo, n, type, vector_data + b * n * n * element, n,
                                  type, value_data + b * n * element, type, workspace.device_ptr(), device_bytes,
                                  workspace.host_ptr(), host_bytes, info_data + b),
                 "cusolverDnXsyevd");
  }
  return {values, vectors, info};
}

}  // namespace kldwrm
