// The CUDA implementations of the fused operations (docs/algorithms.md §6), with the schemas of the PyTorch
// reference in kldwrm_fast/ops/reference.py; registered as kldwrm_fast::<op>_cuda in registration.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace kldwrm {

at::Tensor factor_update_cuda(const at::Tensor& x, at::Tensor& ea, at::Tensor& reweighted, double scale, double rho,
                              double reweight, bool first, bool with_reweighted);

at::Tensor precondition_cuda(const at::Tensor& q_g, const at::Tensor& d_g, const at::Tensor& q_a,
                             const at::Tensor& d_a, const at::Tensor& v, double damping);

std::tuple<at::Tensor, at::Tensor> q_precondition_cuda(const at::Tensor& q_g, const at::Tensor& d_g,
                                                       const at::Tensor& q_a, const at::Tensor& d_a,
                                                       const at::Tensor& g_hat, double damping, double lr,
                                                       const at::Tensor& ea_g, const at::Tensor& ea_a);

void ghat_recursion_cuda(at::TensorList v_new, at::TensorList g_hat, at::TensorList v_prev, at::TensorList m,
                         double coef);

// Eigendecomposition of a (..., n, n) symmetric float32/float64 CUDA tensor with cuSOLVER: returns the
// eigenvalues (..., n) in ascending order, the eigenvectors (..., n, n) as columns, and cuSOLVER's info
// (batch,) int32 per matrix, left on the device (0: converged).
std::tuple<at::Tensor, at::Tensor, at::Tensor> eigh_cuda(const at::Tensor& matrix);

}  // namespace kldwrm
