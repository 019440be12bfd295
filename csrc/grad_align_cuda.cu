// Gradient alignment on CUDA: the same three ops as grad_align.cpp, registered for the CUDA dispatch key.
//
//   reduce: multi-tensor launches (multi_tensor_apply.cuh); each block reads one chunk (4K-64K elements) of g and r
//           once with 16-byte loads, reduces <g,r>, ||g||^2, ||r||^2 in double registers whatever the dtype (the
//           products of 16/32-bit values are exact in double, so a dot that nearly cancels keeps its digits: issue 20,
//           row 19) and writes one double partial triple to partials[block] -- one slot per block of the call, so the
//           blocks of a tensor are a contiguous range and the buffer is as big as the number of chunks, not
//           n * max_chunks. No atomics: the result is deterministic.
//   finish: one block per tensor sums its range of double partials in a fixed order (in double), rounds the totals
//           once into the fp32 stats row and, for the fused op, computes the (a, b) coefficients of
//           grad_align_common.h from that row (as the CPU kernel and the Python helper do). The ranges travel in the
//           kernel parameters, kFinishTensors tensors per launch.
//   apply:  multi-tensor launches again; each block reads its tensor's (a, b) from device memory and writes
//           g <- a r + b g (g is not read when b == 0; a kept tensor is not touched at all).
// Everything is enqueued on the current stream; there is no host synchronisation and no copy to the host, so the
// fused op is safe to capture in a CUDA graph and to overlap with other work. Tensors are grouped by dtype on the
// host (a few lines of C++ over the list, no Python loop).
//
// ABI: the LibTorch stable ABI, as grad_align.cpp (torch::stable::Tensor, STABLE_TORCH_LIBRARY_IMPL, the stable
// device guard), plus the CUDA runtime. The current stream comes from aoti_torch_get_current_cuda_stream (the AOTI C
// shim, part of the stable surface since torch 2.9; stable::Stream::nativeHandle needs 2.13). This file is its own
// shared library, loaded after the CPU one (which defines the schemas), so a CPU-only torch never has to load it.
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "grad_align_checks.h"
#include "grad_align_common.h"
#include "multi_tensor_apply.cuh"

#define MK_CUDA_LAUNCH_CHECK()                                                                    \
  do {                                                                                            \
    const cudaError_t err_ = cudaGetLastError();                                                  \
    STD_TORCH_CHECK(err_ == cudaSuccess, "grad_align: CUDA kernel launch failed: ", cudaGetErrorString(err_)); \
  } while (0)

namespace muscle_kernels {

namespace {

constexpr int kThreads = 512;

// The apply stage's arithmetic type: fp32 for 16/32-bit tensors, double for fp64 ones (the update is one rounding).
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// The reduce stage accumulates in double for every dtype: an fp32 running sum of <g, r> loses the digits that
// survive cancellation (g nearly orthogonal to r), and no later double stage recovers them. A product of two
// 16/32-bit values is exact in double (at most 24 + 24 significant bits), so each thread's sum rounds only at its
// additions, like the CPU kernel's dot (grad_align.cpp). The norms ride along in double: they reuse the same
// converted values, so they cost three DFMAs per element and no extra conversion.
// Cost, estimated from instruction counts and not yet measured: two float->double conversions (16 per clock per SM
// on sm_90) and three DFMAs per element. For bf16 at H200 bandwidth that is about 60% of the conversion rate, so
// H100/H200 should stay memory-bound; a GPU with 1/64-rate fp64 (consumer parts) may become compute-bound here.
using sum_t = double;

// 16 bytes of T: one vectorised load/store.
template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  return x;
}

// Sums three values over the block; thread 0 gets the totals.
template <typename acc_t>
__device__ __forceinline__ void block_sum3(acc_t& a, acc_t& b, acc_t& c) {
  __shared__ acc_t shared[3][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  c = warp_sum(c);
  if (lane == 0) {
    shared[0][warp] = a;
    shared[1][warp] = b;
    shared[2][warp] = c;
  }
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  if (warp == 0) {
    a = lane < n_warps ? shared[0][lane] : acc_t(0);
    b = lane < n_warps ? shared[1][lane] : acc_t(0);
    c = lane < n_warps ? shared[2][lane] : acc_t(0);
    a = warp_sum(a);
    b = warp_sum(b);
    c = warp_sum(c);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) reduce_kernel(mta::TensorListMeta<2> meta, sum_t* __restrict__ partials,
                                                          int64_t first_block) {
  using acc_t = sum_t;
  const int slot = meta.block_to_tensor[blockIdx.x];
  const int64_t chunk = meta.block_to_chunk[blockIdx.x];
  const int64_t start = chunk * meta.chunk_size;
  const int64_t len = min(meta.chunk_size, meta.sizes[slot] - start);
  const scalar_t* g = static_cast<const scalar_t*>(meta.addresses[0][slot]) + start;
  const scalar_t* r = static_cast<const scalar_t*>(meta.addresses[1][slot]) + start;

  acc_t gr = 0, gg = 0, rr = 0;
  int64_t done = 0;
  if (aligned16(g) && aligned16(r)) {
    using P = Pack<scalar_t>;
    const int64_t n_packs = len / P::N;
    const P* gp = reinterpret_cast<const P*>(g);
    const P* rp = reinterpret_cast<const P*>(r);
    for (int64_t p = threadIdx.x; p < n_packs; p += blockDim.x) {
      const P gv = gp[p];
      const P rv = rp[p];
#pragma unroll
      for (int j = 0; j < P::N; ++j) {
        const acc_t a = static_cast<acc_t>(gv.v[j]);
        const acc_t b = static_cast<acc_t>(rv.v[j]);
        gr += a * b;
        gg += a * a;
        rr += b * b;
      }
    }
    done = n_packs * P::N;
  }
  for (int64_t i = done + threadIdx.x; i < len; i += blockDim.x) {
    const acc_t a = static_cast<acc_t>(g[i]);
    const acc_t b = static_cast<acc_t>(r[i]);
    gr += a * b;
    gg += a * a;
    rr += b * b;
  }
  block_sum3(gr, gg, rr);
  if (threadIdx.x == 0) {
    sum_t* out = partials + (first_block + blockIdx.x) * 3;
    out[0] = gr;
    out[1] = gg;
    out[2] = rr;
  }
}

constexpr int kFinishThreads = 128;
constexpr int kFinishTensors = 256;

// Where each tensor's partials are: tensors first .. first + kFinishTensors - 1 of the list.
struct FinishMeta {
  int64_t first;
  int64_t offset[kFinishTensors];  // index of the tensor's first partial triple
  int32_t count[kFinishTensors];   // its number of partials (0 for an empty tensor)
};
static_assert(sizeof(FinishMeta) <= 4000, "kernel parameters must stay under 4 KiB");

// One block per tensor: its double partials summed in double, then one rounding to the fp32 stats row. coeffs may
// be null (reduce only).
__global__ void __launch_bounds__(kFinishThreads) finish_kernel(const sum_t* __restrict__ partials, FinishMeta meta,
                                                                float* __restrict__ stats, float* __restrict__ coeffs,
                                                                double rho) {
  const int64_t t = meta.first + blockIdx.x;
  const sum_t* p = partials + meta.offset[blockIdx.x] * 3;
  const int64_t count = meta.count[blockIdx.x];
  sum_t gr = 0, gg = 0, rr = 0;
  for (int64_t c = threadIdx.x; c < count; c += blockDim.x) {
    gr += p[3 * c];
    gg += p[3 * c + 1];
    rr += p[3 * c + 2];
  }
  block_sum3(gr, gg, rr);
  if (threadIdx.x == 0) {
    const float s0 = static_cast<float>(gr), s1 = static_cast<float>(gg), s2 = static_cast<float>(rr);
    stats[3 * t] = s0;
    stats[3 * t + 1] = s1;
    stats[3 * t + 2] = s2;
    if (coeffs != nullptr) align_coefficients(s0, s1, s2, rho, &coeffs[2 * t], &coeffs[2 * t + 1]);
  }
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t combine(int mode, float a, float b, scalar_t gv, scalar_t rv) {
  using acc_t = typename AccType<scalar_t>::type;
  const acc_t r = static_cast<acc_t>(rv);
  if (mode == kReplace) return static_cast<scalar_t>(static_cast<acc_t>(a) * r);
  const acc_t g = static_cast<acc_t>(gv);
  if (mode == kScale) return static_cast<scalar_t>(static_cast<acc_t>(b) * g);
  return static_cast<scalar_t>(static_cast<acc_t>(a) * r + static_cast<acc_t>(b) * g);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) apply_kernel(mta::TensorListMeta<2> meta, const float* __restrict__ coeffs) {
  const int slot = meta.block_to_tensor[blockIdx.x];
  const int64_t t = meta.tensor_index[slot];
  const float a = coeffs[2 * t];
  const float b = coeffs[2 * t + 1];
  const int mode = apply_mode(a, b);
  if (mode == kKeep) return;  // whole block leaves together: no divergence
  const int64_t chunk = meta.block_to_chunk[blockIdx.x];
  const int64_t start = chunk * meta.chunk_size;
  const int64_t len = min(meta.chunk_size, meta.sizes[slot] - start);
  scalar_t* g = static_cast<scalar_t*>(meta.addresses[0][slot]) + start;
  const scalar_t* r = static_cast<const scalar_t*>(meta.addresses[1][slot]) + start;

  int64_t done = 0;
  if (aligned16(g) && aligned16(r)) {
    using P = Pack<scalar_t>;
    const int64_t n_packs = len / P::N;
    P* gp = reinterpret_cast<P*>(g);
    const P* rp = reinterpret_cast<const P*>(r);
    for (int64_t p = threadIdx.x; p < n_packs; p += blockDim.x) {
      P gv;
      if (mode != kReplace) gv = gp[p];  // replace never reads g (a NaN there must not matter)
      P rv;
      if (mode != kScale) rv = rp[p];
      P out;
#pragma unroll
      for (int j = 0; j < P::N; ++j) out.v[j] = combine<scalar_t>(mode, a, b, gv.v[j], rv.v[j]);
      gp[p] = out;
    }
    done = n_packs * P::N;
  }
  for (int64_t i = done + threadIdx.x; i < len; i += blockDim.x) {
    const scalar_t gv = mode != kReplace ? g[i] : scalar_t(0);
    const scalar_t rv = mode != kScale ? r[i] : scalar_t(0);
    g[i] = combine<scalar_t>(mode, a, b, gv, rv);
  }
}

cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(static_cast<int32_t>(t.get_device_index()), &stream));
  return static_cast<cudaStream_t>(stream);
}

// The list grouped by dtype (empty tensors left out), in the order the kernels process it.
struct Group {
  ScalarType dtype;
  std::vector<mta::Entry<2>> entries;
  int64_t chunk_size;
};

std::vector<Group> dtype_groups(const TensorList& grads, const TensorList& refs) {
  std::vector<ScalarType> dtypes(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) dtypes[i] = grads[i].scalar_type();
  std::vector<Group> groups;
  for (const auto dtype : {ScalarType::Float, ScalarType::BFloat16, ScalarType::Half, ScalarType::Double}) {
    Group group{dtype, {}, mta::kChunkSize};
    int64_t total = 0;
    for (size_t i = 0; i < grads.size(); ++i) {
      if (dtypes[i] != dtype) continue;
      const int64_t numel = grads[i].numel();
      if (numel == 0) continue;
      group.entries.push_back({{grads[i].mutable_data_ptr(), const_cast<void*>(refs[i].const_data_ptr())}, numel,
                               static_cast<int64_t>(i)});
      total += numel;
    }
    if (group.entries.empty()) continue;
    group.chunk_size = mta::chunk_size_for(total, static_cast<int64_t>(group.entries.size()));
    groups.push_back(std::move(group));
  }
  return groups;
}

// Runs body(scalar_t tag) with the C++ type of `dtype`.
template <typename Body>
void with_type(ScalarType dtype, Body&& body) {
  switch (dtype) {
    case ScalarType::Float:
      body(float{});
      break;
    case ScalarType::BFloat16:
      body(c10::BFloat16{});
      break;
    case ScalarType::Half:
      body(c10::Half{});
      break;
    default:
      body(double{});
  }
}

// Reduce into stats [n, 3]; with coeffs non-null also fill the fused op's coefficients.
void reduce_into(const TensorList& grads, const TensorList& refs, Tensor& stats, float* coeffs, double rho) {
  const int64_t n = static_cast<int64_t>(grads.size());
  const auto groups = dtype_groups(grads, refs);
  // One partial slot per block: the blocks of each tensor are consecutive (see multi_tensor_apply).
  std::vector<int64_t> offset(n, 0), count(n, 0);
  int64_t total_blocks = 0;
  for (const auto& group : groups) {
    for (const auto& e : group.entries) {
      offset[e.index] = total_blocks;
      count[e.index] = mta::chunks_of(e.numel, group.chunk_size);
      total_blocks += count[e.index];
    }
  }
  // Double partials (24 bytes per chunk of >= 4K elements: noise next to the data read).
  auto partials = torch::stable::new_empty(stats, {std::max<int64_t>(total_blocks, 1), 3}, ScalarType::Double);
  const auto stream = current_stream(grads[0]);
  sum_t* partials_ptr = partials.mutable_data_ptr<sum_t>();
  int64_t group_base = 0;
  for (const auto& group : groups) {
    with_type(group.dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      sum_t* base = partials_ptr + 3 * group_base;
      mta::multi_tensor_apply<2>(group.entries, group.chunk_size,
                                 [&](const mta::TensorListMeta<2>& meta, int n_blocks, int64_t first_block) {
        reduce_kernel<scalar_t><<<n_blocks, kThreads, 0, stream>>>(meta, base, first_block);
        MK_CUDA_LAUNCH_CHECK();
      });
    });
    for (const auto& e : group.entries) group_base += count[e.index];
  }
  float* stats_ptr = stats.mutable_data_ptr<float>();
  for (int64_t first = 0; first < n; first += kFinishTensors) {
    FinishMeta meta;
    meta.first = first;
    const int64_t in_launch = std::min<int64_t>(kFinishTensors, n - first);
    for (int64_t j = 0; j < in_launch; ++j) {
      meta.offset[j] = offset[first + j];
      meta.count[j] = static_cast<int32_t>(count[first + j]);
    }
    finish_kernel<<<static_cast<unsigned int>(in_launch), kFinishThreads, 0, stream>>>(partials_ptr, meta, stats_ptr,
                                                                                      coeffs, rho);
    MK_CUDA_LAUNCH_CHECK();
  }
}

void apply_with(const TensorList& grads, const TensorList& refs, const float* coeffs) {
  const auto stream = current_stream(grads[0]);
  for (const auto& group : dtype_groups(grads, refs)) {
    with_type(group.dtype, [&](auto tag) {
      using scalar_t = decltype(tag);
      mta::multi_tensor_apply<2>(group.entries, group.chunk_size,
                                 [&](const mta::TensorListMeta<2>& meta, int n_blocks, int64_t) {
        apply_kernel<scalar_t><<<n_blocks, kThreads, 0, stream>>>(meta, coeffs);
        MK_CUDA_LAUNCH_CHECK();
      });
    });
  }
}

Tensor new_float(const Tensor& like, int64_t n, int64_t k) {
  return torch::stable::new_empty(like, {n, k}, ScalarType::Float);
}

Tensor reduce_cuda(TensorList grads, TensorList refs) {
  check_lists(grads, refs, "grad_align_reduce");
  const int64_t n = static_cast<int64_t>(grads.size());
  STD_TORCH_CHECK(n > 0, "grad_align_reduce: empty lists have no device (the Python wrapper handles them)");
  const torch::stable::accelerator::DeviceGuard guard(grads[0].get_device_index());
  auto stats = new_float(grads[0], n, 3);
  reduce_into(grads, refs, stats, nullptr, 0.0);
  return stats;
}

void apply_cuda(TensorList grads, TensorList refs, Tensor coeffs) {
  check_lists(grads, refs, "grad_align_apply");
  check_coeffs(coeffs, grads);
  if (grads.empty()) return;
  const torch::stable::accelerator::DeviceGuard guard(grads[0].get_device_index());
  apply_with(grads, refs, coeffs.const_data_ptr<float>());
}

Tensor fused_cuda(TensorList grads, TensorList refs, double raw_ratio) {
  check_raw_ratio(raw_ratio);
  check_lists(grads, refs, "grad_align_fused");
  const int64_t n = static_cast<int64_t>(grads.size());
  STD_TORCH_CHECK(n > 0, "grad_align_fused: empty lists have no device (the Python wrapper handles them)");
  const torch::stable::accelerator::DeviceGuard guard(grads[0].get_device_index());
  auto stats = new_float(grads[0], n, 3);
  auto coeffs = new_float(grads[0], n, 2);
  reduce_into(grads, refs, stats, coeffs.mutable_data_ptr<float>(), raw_ratio);
  apply_with(grads, refs, coeffs.const_data_ptr<float>());
  return stats;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(muscle_kernels, CUDA, m) {
  m.impl("grad_align_reduce", TORCH_BOX(&reduce_cuda));
  m.impl("grad_align_apply", TORCH_BOX(&apply_cuda));
  m.impl("grad_align_fused", TORCH_BOX(&fused_cuda));
}

}  // namespace muscle_kernels
