// CUDA kernels and host launchers of the fused operations (docs/algorithms.md §6.1–6.3): factor update, eigen-
// preconditioning with the damping division fused into the middle GEMM, and the multi-tensor Ĝ recursion.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <array>
#include <vector>

#include "checks.h"
#include "ghat_recursion.h"
#include "operations.h"
#include "tiled_gemm.h"

namespace kldwrm {
namespace {

template <typename T, typename Epilogue>
__global__ void __launch_bounds__(kThreads) gemm_kernel(Operand<T> a, Operand<T> b, GemmShape shape,
                                                        Epilogue epilogue, int64_t tiles_n, bool upper,
                                                        int64_t batch_offset) {
  __shared__ SharedTiles<T> tiles;
  int64_t tile_m, tile_n;
  if (upper) {
    upper_tile(blockIdx.x, tiles_n, &tile_m, &tile_n);
  } else {
    tile_m = blockIdx.x / tiles_n;
    tile_n = blockIdx.x % tiles_n;
  }
  const int64_t batch = batch_offset + blockIdx.y;
  const int tid = threadIdx.x;
  T acc[kMicro][kMicro] = {};
  for (int64_t k0 = 0; k0 < shape.k; k0 += kDepth) {
    load_tiles(a, b, shape, batch, tile_m, tile_n, k0, tid, tiles);
    __syncthreads();
    accumulate(tid, tiles, acc);
    __syncthreads();
  }
  store(epilogue, shape, batch, tile_m, tile_n, tid, acc, upper);
}

template <typename T, typename Epilogue>
void launch_gemm(const Operand<T>& a, const Operand<T>& b, const GemmShape& shape, int64_t batch,
                 const Epilogue& epilogue, bool upper) {
  const int64_t tiles_m = (shape.m + kTile - 1) / kTile, tiles_n = (shape.n + kTile - 1) / kTile;
  const int64_t blocks = upper ? tiles_n * (tiles_n + 1) / 2 : tiles_m * tiles_n;
  if (blocks == 0 || batch == 0) return;
  TORCH_CHECK(blocks <= kMaxGridX, "kldwrm_fast CUDA GEMM: ", blocks, " tiles exceed one launch's grid");
  // Grid axis y is the batch and holds at most kMaxGridY blocks: larger batches take several launches.
  for (int64_t offset = 0; offset < batch; offset += kMaxGridY) {
    const int64_t count = batch - offset < kMaxGridY ? batch - offset : kMaxGridY;
    gemm_kernel<T, Epilogue><<<dim3(blocks, count), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        a, b, shape, epilogue, tiles_n, upper, offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, typename Epilogue>
__global__ void reduce_chunks_kernel(const T* partials, int64_t chunks, int64_t n, Epilogue epilogue) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < n * n) reduce_chunks(partials, chunks, n, e, epilogue);
}

// The factor update's GEMM, split over row chunks when row_chunks asks for it (csrc/tiled_gemm.h).
template <typename T>
void factor_gemm(const T* data, int64_t rows, int64_t n, int64_t row_stride, int64_t col_stride,
                 const FactorUpdateEpilogue<T>& epilogue, const at::TensorOptions& options) {
  const RowChunks split = row_chunks(rows, n);
  if (split.count == 1) {
    launch_gemm(Operand<T>{data, 0, col_stride, row_stride}, Operand<T>{data, 0, row_stride, col_stride},
                GemmShape{n, n, rows}, 1, epilogue, true);
    return;
  }
  at::Tensor partials = at::empty({split.count, n, n}, options);
  T* out = partials.data_ptr<T>();
  const int64_t full = rows / split.rows, rest = rows - full * split.rows;
  const int64_t chunk_stride = split.rows * row_stride;
  const Operand<T> transposed{data, chunk_stride, col_stride, row_stride};
  const Operand<T> plain{data, chunk_stride, row_stride, col_stride};
  launch_gemm(transposed, plain, GemmShape{n, n, split.rows}, full, PartialEpilogue<T>{out, n, 0}, true);
  if (rest > 0) {
    const T* tail = data + full * chunk_stride;
    launch_gemm(Operand<T>{tail, 0, col_stride, row_stride}, Operand<T>{tail, 0, row_stride, col_stride},
                GemmShape{n, n, rest}, 1, PartialEpilogue<T>{out, n, full}, true);
  }
  constexpr int threads = 256;
  const int64_t blocks = (n * n + threads - 1) / threads;
  reduce_chunks_kernel<T, FactorUpdateEpilogue<T>><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out, split.count, n, epilogue);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Operand view of a (batch, rows, cols) tensor, or of its transpose.
template <typename T>
Operand<T> operand(const at::Tensor& t, bool transpose) {
  const T* data = t.data_ptr<T>();
  return transpose ? Operand<T>{data, t.stride(0), t.stride(2), t.stride(1)}
                   : Operand<T>{data, t.stride(0), t.stride(1), t.stride(2)};
}

// alpha * op(a) @ op(b) for (batch, ., .) tensors, optionally ⊘ (d_row d_colᵀ + damping); new contiguous result.
template <typename T>
at::Tensor product(const at::Tensor& a, bool transpose_a, const at::Tensor& b, bool transpose_b, T alpha,
                   const at::Tensor* d_row = nullptr, const at::Tensor* d_col = nullptr, T damping = T(0)) {
  const int64_t batch = a.size(0);
  const int64_t m = a.size(transpose_a ? 2 : 1), k = a.size(transpose_a ? 1 : 2), n = b.size(transpose_b ? 1 : 2);
  at::Tensor out = at::empty({batch, m, n}, a.options());
  const GemmShape shape{m, n, k};
  if (d_row == nullptr) {
    launch_gemm(operand<T>(a, transpose_a), operand<T>(b, transpose_b), shape, batch,
                ScaleEpilogue<T>{out.data_ptr<T>(), m, n, alpha}, false);
  } else {
    launch_gemm(operand<T>(a, transpose_a), operand<T>(b, transpose_b), shape, batch,
                DampedDivideEpilogue<T>{out.data_ptr<T>(), m, n, alpha, d_row->data_ptr<T>(), d_row->stride(0),
                                        d_col->data_ptr<T>(), d_col->stride(0), damping},
                false);
  }
  return out;
}

// Q_G [(Q_Gᵀ V Q_A) ⊘ (d_G d_Aᵀ + δ)] Q_Aᵀ · alpha, all (batch, ., .).
template <typename T>
at::Tensor precondition_batched(const at::Tensor& q_g, const at::Tensor& d_g, const at::Tensor& q_a,
                                const at::Tensor& d_a, const at::Tensor& v, T damping, T alpha) {
  // The epilogue indexes eigenvalues with unit stride within a block.
  const at::Tensor d_row = d_g.contiguous(), d_col = d_a.contiguous();
  const at::Tensor rotated = product<T>(q_g, true, v, false, T(1));
  const at::Tensor scaled = product<T>(rotated, false, q_a, false, T(1), &d_row, &d_col, damping);
  const at::Tensor back = product<T>(q_g, false, scaled, false, T(1));
  return product<T>(back, false, q_a, true, alpha);
}

// Checks shared by precondition and q_precondition; returns whether the inputs carry a batch dimension.
bool check_precondition_inputs(const char* op, const at::Tensor& q_g, const at::Tensor& d_g,
                               const at::Tensor& q_a, const at::Tensor& d_a, const at::Tensor& v,
                               const char* v_name) {
  check_cuda(op, v_name, v);
  check_floating(op, v_name, v);
  TORCH_CHECK(v.dim() == 2 || v.dim() == 3, op, ": ", v_name, " must be (n_out, n_in) or (batch, n_out, n_in), got ",
              v.sizes());
  const bool batched = v.dim() == 3;
  const int64_t n_out = v.size(-2), n_in = v.size(-1);
  std::vector<int64_t> lead;
  if (batched) lead.push_back(v.size(0));
  auto with = [&](std::initializer_list<int64_t> tail) {
    std::vector<int64_t> shape = lead;
    shape.insert(shape.end(), tail);
    return shape;
  };
  const std::pair<const char*, const at::Tensor*> named[] = {{"q_g", &q_g}, {"d_g", &d_g}, {"q_a", &q_a},
                                                              {"d_a", &d_a}};
  for (const auto& [name, tensor] : named) {
    check_on(op, name, *tensor, v.device());
    check_dtype(op, name, *tensor, v.scalar_type());
  }
  check_shape(op, "q_g", q_g, with({n_out, n_out}));
  check_shape(op, "d_g", d_g, with({n_out}));
  check_shape(op, "q_a", q_a, with({n_in, n_in}));
  check_shape(op, "d_a", d_a, with({n_in}));
  return batched;
}

at::Tensor batch_of(const at::Tensor& t, bool batched) { return batched ? t : t.unsqueeze(0); }

template <typename T>
struct Vector;
template <>
struct Vector<float> {
  using type = float4;
  static constexpr int width = 4;
};
template <>
struct Vector<double> {
  using type = double2;
  static constexpr int width = 2;
};

template <typename T>
__global__ void __launch_bounds__(kGhatThreads) ghat_kernel(const GhatTable<T> table) {
  const int64_t chunk = blockIdx.x;
  if (!table.tensors[ghat_tensor_of(table, chunk)].vectorised) {
    ghat_chunk<1>(table, chunk, threadIdx.x, blockDim.x,
                  [&](const GhatTensor<T>& t, int64_t e) { ghat_element(table, t, e); });
    return;
  }
  using V = typename Vector<T>::type;
  constexpr int width = Vector<T>::width;
  ghat_chunk<width>(table, chunk, threadIdx.x, blockDim.x, [&](const GhatTensor<T>& t, int64_t e) {
    const V fresh_v = *reinterpret_cast<const V*>(t.v_new + e);
    const V g_hat_v = *reinterpret_cast<const V*>(t.g_hat + e);
    const V prev_v = *reinterpret_cast<const V*>(t.v_prev + e);
    const V m_v = *reinterpret_cast<const V*>(t.m + e);
    const T* fresh = reinterpret_cast<const T*>(&fresh_v);
    const T* g_hat = reinterpret_cast<const T*>(&g_hat_v);
    const T* prev = reinterpret_cast<const T*>(&prev_v);
    const T* m = reinterpret_cast<const T*>(&m_v);
    V result_v;
    T* result = reinterpret_cast<T*>(&result_v);
#pragma unroll
    for (int i = 0; i < width; ++i) result[i] = fresh[i] + table.coef * ((g_hat[i] - prev[i]) - m[i]);
    *reinterpret_cast<V*>(t.g_hat + e) = result_v;
    *reinterpret_cast<V*>(t.v_prev + e) = fresh_v;
  });
}

template <typename T>
void launch_ghat(GhatTable<T>& table, int64_t chunks) {
  if (table.count == 0) return;
  ghat_kernel<T><<<chunks, kGhatThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(table);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  table.count = 0;
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// One launch per dtype and per kGhatTableSize tensors (usually a single launch).
template <typename T>
void ghat_for_dtype(const std::vector<std::array<at::Tensor, 4>>& quads, double coef) {
  GhatTable<T> table{};
  table.coef = static_cast<T>(coef);
  int64_t chunks = 0;
  for (const auto& quad : quads) {
    const at::Tensor &fresh = quad[0], &g_hat = quad[1], &prev = quad[2], &m = quad[3];
    const int64_t numel = g_hat.numel();
    if (numel == 0) continue;
    GhatTensor<T>& t = table.tensors[table.count++];
    t = GhatTensor<T>{g_hat.data_ptr<T>(), prev.data_ptr<T>(), fresh.data_ptr<T>(), m.data_ptr<T>(), numel, chunks,
                      false};
    t.vectorised = numel % Vector<T>::width == 0 && aligned(t.g_hat) && aligned(t.v_prev) && aligned(t.v_new) &&
                   aligned(t.m);
    chunks += ghat_chunks(numel);
    if (table.count == kGhatTableSize) {
      launch_ghat(table, chunks);
      chunks = 0;
    }
  }
  launch_ghat(table, chunks);
}

}  // namespace

at::Tensor factor_update_cuda(const at::Tensor& x, at::Tensor& ea, at::Tensor& reweighted, double scale, double rho,
                              double reweight, bool first, bool with_reweighted) {
  constexpr const char* op = "factor_update_cuda";
  check_cuda(op, "x", x);
  TORCH_CHECK(x.dim() == 2, op, ": x must be (rows, n), got ", x.sizes());
  TORCH_CHECK(x.is_floating_point(), op, ": x must be a floating-point tensor, got ", x.scalar_type());
  const int64_t n = x.size(1);
  check_on(op, "ea", ea, x.device());
  check_floating(op, "ea", ea);
  check_shape(op, "ea", ea, {n, n});
  check_contiguous(op, "ea", ea);
  if (with_reweighted) {
    check_on(op, "reweighted", reweighted, x.device());
    check_dtype(op, "reweighted", reweighted, ea.scalar_type());
    check_shape(op, "reweighted", reweighted, {n, n});
    check_contiguous(op, "reweighted", reweighted);
  }
  TORCH_CHECK(rho >= 0.0 && rho < 1.0, op, ": rho must be in [0, 1), got ", rho);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rows = x.to(ea.scalar_type());
  at::Tensor local = at::empty_like(ea);
  AT_DISPATCH_FLOATING_TYPES(ea.scalar_type(), op, [&] {
    const FactorUpdateEpilogue<scalar_t> epilogue{local.data_ptr<scalar_t>(),
                                                  ea.data_ptr<scalar_t>(),
                                                  with_reweighted ? reweighted.data_ptr<scalar_t>() : nullptr,
                                                  n,
                                                  static_cast<scalar_t>(scale),
                                                  static_cast<scalar_t>(rho),
                                                  static_cast<scalar_t>(reweight),
                                                  first};
    factor_gemm(rows.data_ptr<scalar_t>(), rows.size(0), n, rows.stride(0), rows.stride(1), epilogue, ea.options());
  });
  return local;
}

at::Tensor precondition_cuda(const at::Tensor& q_g, const at::Tensor& d_g, const at::Tensor& q_a,
                             const at::Tensor& d_a, const at::Tensor& v, double damping) {
  constexpr const char* op = "precondition_cuda";
  const bool batched = check_precondition_inputs(op, q_g, d_g, q_a, d_a, v, "v");
  TORCH_CHECK(damping >= 0.0, op, ": damping must be >= 0, got ", damping);
  const c10::cuda::CUDAGuard guard(v.device());
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), op, [&] {
    result = precondition_batched<scalar_t>(batch_of(q_g, batched), batch_of(d_g, batched),
                                            batch_of(q_a, batched), batch_of(d_a, batched), batch_of(v, batched),
                                            static_cast<scalar_t>(damping), scalar_t(1));
  });
  return batched ? result : result.squeeze(0);
}

std::tuple<at::Tensor, at::Tensor> q_precondition_cuda(const at::Tensor& q_g, const at::Tensor& d_g,
                                                       const at::Tensor& q_a, const at::Tensor& d_a,
                                                       const at::Tensor& g_hat, double damping, double lr,
                                                       const at::Tensor& ea_g, const at::Tensor& ea_a) {
  constexpr const char* op = "q_precondition_cuda";
  const bool batched = check_precondition_inputs(op, q_g, d_g, q_a, d_a, g_hat, "g_hat");
  TORCH_CHECK(damping >= 0.0, op, ": damping must be >= 0, got ", damping);
  TORCH_CHECK(lr > 0.0, op, ": lr must be > 0, got ", lr);
  check_on(op, "ea_g", ea_g, g_hat.device());
  check_on(op, "ea_a", ea_a, g_hat.device());
  check_dtype(op, "ea_g", ea_g, g_hat.scalar_type());
  check_dtype(op, "ea_a", ea_a, g_hat.scalar_type());
  check_shape(op, "ea_g", ea_g, q_g.sizes());
  check_shape(op, "ea_a", ea_a, q_a.sizes());
  const c10::cuda::CUDAGuard guard(g_hat.device());
  at::Tensor step, curvature;
  AT_DISPATCH_FLOATING_TYPES(g_hat.scalar_type(), op, [&] {
    step = precondition_batched<scalar_t>(batch_of(q_g, batched), batch_of(d_g, batched),
                                          batch_of(q_a, batched), batch_of(d_a, batched), batch_of(g_hat, batched),
                                          static_cast<scalar_t>(damping), static_cast<scalar_t>(-lr));
    const at::Tensor left = product<scalar_t>(batch_of(ea_g, batched), false, step, false, scalar_t(1));
    curvature = product<scalar_t>(left, false, batch_of(ea_a, batched), false, static_cast<scalar_t>(-1.0 / lr));
  });
  if (!batched) return {step.squeeze(0), curvature.squeeze(0)};
  return {step, curvature};
}

void ghat_recursion_cuda(at::TensorList v_new, at::TensorList g_hat, at::TensorList v_prev, at::TensorList m,
                         double coef) {
  constexpr const char* op = "ghat_recursion_cuda";
  TORCH_CHECK(v_new.size() == g_hat.size() && v_prev.size() == g_hat.size() && m.size() == g_hat.size(), op,
              ": v_new, g_hat, v_prev and m must be lists of equal length, got ", v_new.size(), ", ", g_hat.size(),
              ", ", v_prev.size(), ", ", m.size());
  if (g_hat.empty()) return;
  std::vector<std::array<at::Tensor, 4>> floats, doubles;
  const at::Device device = g_hat[0].device();
  for (size_t i = 0; i < g_hat.size(); ++i) {
    check_cuda(op, "g_hat", g_hat[i]);
    check_on(op, "g_hat", g_hat[i], device);
    check_floating(op, "g_hat", g_hat[i]);
    check_contiguous(op, "g_hat", g_hat[i]);
    check_contiguous(op, "v_prev", v_prev[i]);
    const std::pair<const char*, const at::Tensor*> others[] = {{"v_new", &v_new[i]}, {"v_prev", &v_prev[i]},
                                                                {"m", &m[i]}};
    for (const auto& [name, tensor] : others) {
      check_on(op, name, *tensor, device);
      check_dtype(op, name, *tensor, g_hat[i].scalar_type());
      check_shape(op, name, *tensor, g_hat[i].sizes());
    }
    std::array<at::Tensor, 4> quad{v_new[i].contiguous(), g_hat[i], v_prev[i], m[i].contiguous()};
    (g_hat[i].scalar_type() == at::kFloat ? floats : doubles).push_back(std::move(quad));
  }
  const c10::cuda::CUDAGuard guard(device);
  ghat_for_dtype<float>(floats, coef);
  ghat_for_dtype<double>(doubles, coef);
}

}  // namespace kldwrm
