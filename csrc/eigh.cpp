// Symmetric eigendecomposition of many equal-size factors with cuSOLVER on torch's current stream:
// cusolverDnXsyevBatched for a batch, cusolverDnXsyevd for a single matrix. Convergence flags stay on the
// device (the caller decides when to look at them); only argument and launch errors raise here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cusolverDn.h>

#include <unordered_map>
#include <vector>

#include "checks.h"
#include "operations.h"

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
  // cuSOLVER overwrites its input with the eigenvectors, column-major: row r of the buffer is eigenvector r.
  at::Tensor work = matrix.reshape({batch, n, n}).clone(at::MemoryFormat::Contiguous);
  at::Tensor values = at::empty({batch, n}, matrix.options());
  at::Tensor info = at::zeros({batch}, matrix.options().dtype(at::kInt));
  if (batch > 0 && n > 0) {
    const cudaDataType type = matrix.scalar_type() == at::kDouble ? CUDA_R_64F : CUDA_R_32F;
    const cusolverDnHandle_t handle = solver_handle(matrix.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(matrix.device().index()).stream();
    const SolverParams params;
    size_t device_bytes = 0, host_bytes = 0;
    const auto jobz = CUSOLVER_EIG_MODE_VECTOR;
    const auto uplo = CUBLAS_FILL_MODE_LOWER;
#if defined(CUSOLVER_VERSION) && CUSOLVER_VERSION >= 11701
    if (batch > 1) {
      check_status(cusolverDnXsyevBatched_bufferSize(handle, params.get(), jobz, uplo, n, type, work.data_ptr(), n,
                                                     type, values.data_ptr(), type, &device_bytes, &host_bytes, batch),
                   "cusolverDnXsyevBatched_bufferSize");
      Workspace workspace(device_bytes, host_bytes, matrix.options(), stream);
      check_status(cusolverDnXsyevBatched(handle, params.get(), jobz, uplo, n, type, work.data_ptr(), n, type,
                                          values.data_ptr(), type, workspace.device_ptr(), device_bytes,
                                          workspace.host_ptr(), host_bytes, info.data_ptr<int>(), batch),
                   "cusolverDnXsyevBatched");
      return {values.view(value_shape), work.view(matrix.sizes()).transpose(-2, -1), info.view(batch_shape)};
    }
#endif
    check_status(cusolverDnXsyevd_bufferSize(handle, params.get(), jobz, uplo, n, type, work.data_ptr(), n, type,
                                             values.data_ptr(), type, &device_bytes, &host_bytes),
                 "cusolverDnXsyevd_bufferSize");
    Workspace workspace(device_bytes, host_bytes, matrix.options(), stream);
    const int64_t element = static_cast<int64_t>(matrix.element_size());
    for (int64_t b = 0; b < batch; ++b) {
      check_status(cusolverDnXsyevd(handle, params.get(), jobz, uplo, n, type,
                                    static_cast<char*>(work.data_ptr()) + b * n * n * element, n, type,
                                    static_cast<char*>(values.data_ptr()) + b * n * element, type,
                                    workspace.device_ptr(), device_bytes, workspace.host_ptr(), host_bytes,
                                    info.data_ptr<int>() + b),
                   "cusolverDnXsyevd");
    }
  }
  return {values.view(value_shape), work.view(matrix.sizes()).transpose(-2, -1), info.view(batch_shape)};
}

}  // namespace kldwrm
