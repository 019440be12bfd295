// Gradient alignment (docs/alignment.md): op schemas and the CPU kernels, on the LibTorch stable ABI.
//
// Three ops in the `muscle_kernels` namespace, all over lists of tensors (grads[i] and refs[i] pair up):
//   grad_align_reduce(grads, refs) -> stats [n, 3] fp32: <g, r>, ||g||^2, ||r||^2 per pair, one pass over g and r.
//   grad_align_apply(grads!, refs, coeffs [n, 2] fp32): g <- a * r + b * g with (a, b) = coeffs[i], in place.
//   grad_align_fused(grads!, refs, raw_ratio) -> stats: reduce, the coefficient rule of grad_align_common.h, apply.
// The two stages exist apart so that a sharded run can all-reduce the stats in between (FSDP2).
//
// ABI. Only torch/csrc/stable and torch/headeronly are used (STABLE_TORCH_LIBRARY, torch::stable::Tensor, the
// stable parallel_for), compiled with TORCH_TARGET_VERSION = 2.11: the library then loads into every torch release
// from 2.11 on, whichever release built it. It needs no Python either (the ops register through the dispatcher).
//
// CPU design. The lists are cut into work items of at most kChunk elements (one tensor each) and the items are shared
// out with torch::stable::parallel_for, so a list of many small LoRA tensors and a list of a few huge embeddings both
// keep every core busy. Each item does the three reductions in one pass with explicit SIMD vectors (GCC/Clang vector
// extensions; a scalar accumulator would be a serial dependency chain that the compiler may not reorder without
// -ffast-math), flushed into double every kFlush elements so no fp32 partial sum adds more than kFlush / 16 terms;
// the dot <g, r>, which can cancel, is accumulated in double (see reduce_range).
// Items are summed per tensor in a fixed order: results do not depend on the thread count. fp64 tensors accumulate
// in double throughout.
//
// Vectorisation choice: vector extensions + -O3, and -march=native for a JIT build (see extension.py: the build runs
// on the machine that uses it; MUSCLE_KERNELS_CPU_ARCH overrides it, and a wheel uses the compiler's default).
// at::vec::Vectorized is not part of the stable surface, and out of tree it would need CPU_CAPABILITY_* defines and
// matching -m flags anyway. Measurements behind these choices: benchmarks/RESULTS.md ("grad_align CPU kernel").
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "grad_align_checks.h"
#include "grad_align_common.h"

namespace muscle_kernels {

constexpr int64_t kChunk = 1 << 16;  // elements per work item: 256 KiB of fp32, a few hundred items for BERT-base
constexpr int64_t kFlush = 1024;  // fp32 partial sums are flushed into double every kFlush elements
// Below this many elements in a whole call the work runs on the calling thread: waking the thread pool costs more
// than it saves for a LoRA-size list (see benchmarks/RESULTS.md).
constexpr int64_t kParallelMinElements = 1 << 20;

namespace {

// What the kernels need of each tensor, read once through the stable ABI (every accessor is a C call).
struct View {
  ScalarType dtype;
  int64_t numel;
  void* g;        // grads[i] (written by apply)
  const void* r;  // refs[i]
};

std::vector<View> views_of(const TensorList& grads, const TensorList& refs) {
  std::vector<View> views(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    views[i].dtype = grads[i].scalar_type();
    views[i].numel = grads[i].numel();
    views[i].g = views[i].numel ? grads[i].mutable_data_ptr() : nullptr;
    views[i].r = views[i].numel ? refs[i].const_data_ptr() : nullptr;
  }
  return views;
}

struct Item {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// torch::stable::parallel_for over the items, or a plain loop on this thread when the call is small.
template <typename F>
void for_items(const std::vector<Item>& items, const F& body) {
  int64_t total = 0;
  for (const auto& it : items) total += it.end - it.begin;
  const int64_t n = static_cast<int64_t>(items.size());
  if (total < kParallelMinElements) {
    body(0, n);
  } else {
    torch::stable::parallel_for(0, n, 1, body);
  }
}

std::vector<Item> make_items(const std::vector<View>& views) {
  std::vector<Item> items;
  for (size_t t = 0; t < views.size(); ++t) {
    const int64_t n = views[t].numel;
    for (int64_t b = 0; b < n; b += kChunk) items.push_back({static_cast<int64_t>(t), b, std::min(n, b + kChunk)});
  }
  return items;
}

// The four dtypes of check_lists, as a plain switch (the stable surface has no AT_DISPATCH).
template <typename F>
void dispatch_float(ScalarType dtype, const F& f) {
  switch (dtype) {
    case ScalarType::Float:
      f(float{});
      break;
    case ScalarType::Double:
      f(double{});
      break;
    case ScalarType::Half:
      f(c10::Half{});
      break;
    case ScalarType::BFloat16:
      f(c10::BFloat16{});
      break;
    default:
      STD_TORCH_CHECK(false, "grad_align: unsupported dtype ", torch::headeronly::toString(dtype));
  }
}

// GCC/Clang vector extensions: 32 bytes per vector, lowered to one AVX register, two SSE/NEON registers, or scalar
// code, whatever -march allows. (A plain 16-lane array loop can be vectorised across the wrong loop: see
// benchmarks/RESULTS.md.)
typedef float vf8 __attribute__((vector_size(32)));
typedef double vd4 __attribute__((vector_size(32)));
template <typename acc_t>
struct VecOf;
template <>
struct VecOf<float> {
  using type = vf8;
  static constexpr int N = 8;
};
template <>
struct VecOf<double> {
  using type = vd4;
  static constexpr int N = 4;
};

template <typename acc_t, typename scalar_t>
inline typename VecOf<acc_t>::type load_vec(const scalar_t* p) {
  using V = typename VecOf<acc_t>::type;
  V v;
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    std::memcpy(&v, p, sizeof(V));  // an unaligned vector load
  } else {
    acc_t tmp[VecOf<acc_t>::N];
    for (int k = 0; k < VecOf<acc_t>::N; ++k) tmp[k] = static_cast<acc_t>(p[k]);
    std::memcpy(&v, tmp, sizeof(V));
  }
  return v;
}

// acc_t: float for 16/32-bit inputs (partial vectors flushed to double every kFlush elements), double for fp64.
// Two independent vectors per sum hide the FMA latency.
//
// <g, r> is the sum that can cancel (g nearly orthogonal to r): an fp32 partial sum then loses digits that no later
// double flush recovers, and the result was less accurate than the fallback's (fp32 products summed in fp64; issue
// 20). So for 16/32-bit inputs the dot is accumulated in double vectors from products formed in double, which are
// exact (24 + 24 significant bits fit in 53): at least as accurate as the fallback. The norms add positive terms
// only (no cancellation) and stay in fp32 vectors; fp64 inputs accumulate everything in double as before.
template <typename scalar_t, typename acc_t>
void reduce_range(const scalar_t* __restrict__ g, const scalar_t* __restrict__ r, int64_t n, double out[3]) {
  using V = typename VecOf<acc_t>::type;
  constexpr int N = VecOf<acc_t>::N;
  constexpr int STEP = 2 * N;
  constexpr bool kDoubleDot = std::is_same<acc_t, float>::value;
  constexpr int ND = VecOf<double>::N;
  static_assert(!kDoubleDot || STEP == 4 * ND, "the double dot covers one STEP with four vectors");
  double s0 = 0.0, s1 = 0.0, s2 = 0.0;
  int64_t i = 0;
  const int64_t n_vec = n - n % STEP;
  while (i < n_vec) {
    V gr0 = {}, gr1 = {}, gg0 = {}, gg1 = {}, rr0 = {}, rr1 = {};
    vd4 d0 = {}, d1 = {}, d2 = {}, d3 = {};
    const int64_t stop = std::min(n_vec, i + kFlush);
    for (; i < stop; i += STEP) {
      const V a0 = load_vec<acc_t>(g + i), a1 = load_vec<acc_t>(g + i + N);
      const V b0 = load_vec<acc_t>(r + i), b1 = load_vec<acc_t>(r + i + N);
      if constexpr (kDoubleDot) {
        d0 += load_vec<double>(g + i) * load_vec<double>(r + i);
        d1 += load_vec<double>(g + i + ND) * load_vec<double>(r + i + ND);
        d2 += load_vec<double>(g + i + 2 * ND) * load_vec<double>(r + i + 2 * ND);
        d3 += load_vec<double>(g + i + 3 * ND) * load_vec<double>(r + i + 3 * ND);
      } else {
        gr0 += a0 * b0;
        gr1 += a1 * b1;
      }
      gg0 += a0 * a0;
      gg1 += a1 * a1;
      rr0 += b0 * b0;
      rr1 += b1 * b1;
    }
    if constexpr (kDoubleDot) {
      const vd4 d = (d0 + d1) + (d2 + d3);
      for (int k = 0; k < ND; ++k) s0 += d[k];
    } else {
      const V gr = gr0 + gr1;
      for (int k = 0; k < N; ++k) s0 += gr[k];
    }
    const V gg = gg0 + gg1, rr = rr0 + rr1;
    for (int k = 0; k < N; ++k) {
      s1 += gg[k];
      s2 += rr[k];
    }
  }
  for (; i < n; ++i) {
    const double a = static_cast<double>(g[i]);
    const double b = static_cast<double>(r[i]);
    s0 += a * b;
    s1 += a * a;
    s2 += b * b;
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
}

template <typename scalar_t, typename acc_t>
void apply_range(scalar_t* __restrict__ g, const scalar_t* __restrict__ r, int64_t n, float a_f, float b_f, int mode) {
  const acc_t a = static_cast<acc_t>(a_f);
  const acc_t b = static_cast<acc_t>(b_f);
  switch (mode) {
    case kReplace:
      for (int64_t i = 0; i < n; ++i) g[i] = static_cast<scalar_t>(a * static_cast<acc_t>(r[i]));
      break;
    case kScale:
      for (int64_t i = 0; i < n; ++i) g[i] = static_cast<scalar_t>(b * static_cast<acc_t>(g[i]));
      break;
    case kBlend:
      for (int64_t i = 0; i < n; ++i)
        g[i] = static_cast<scalar_t>(a * static_cast<acc_t>(r[i]) + b * static_cast<acc_t>(g[i]));
      break;
    default:
      break;
  }
}

template <typename scalar_t>
using acc_type_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

Tensor reduce_cpu(TensorList grads, TensorList refs) {
  check_lists(grads, refs, "grad_align_reduce");
  const int64_t n = static_cast<int64_t>(grads.size());
  const auto views = views_of(grads, refs);
  const auto items = make_items(views);
  std::vector<double> partial(items.size() * 3, 0.0);
  for_items(items, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Item& it = items[k];
      const View& v = views[it.tensor];
      dispatch_float(v.dtype, [&](auto tag) {
        using scalar_t = decltype(tag);
        reduce_range<scalar_t, acc_type_t<scalar_t>>(static_cast<const scalar_t*>(v.g) + it.begin,
                                                     static_cast<const scalar_t*>(v.r) + it.begin,
                                                     it.end - it.begin, &partial[3 * k]);
      });
    }
  });
  std::vector<double> sums(static_cast<size_t>(n) * 3, 0.0);
  for (size_t k = 0; k < items.size(); ++k)
    for (int c = 0; c < 3; ++c) sums[3 * items[k].tensor + c] += partial[3 * k + c];
  auto stats = torch::stable::empty({n, 3}, ScalarType::Float);
  float* s = stats.mutable_data_ptr<float>();
  for (int64_t i = 0; i < 3 * n; ++i) s[i] = static_cast<float>(sums[i]);
  return stats;
}

void apply_with(TensorList grads, TensorList refs, const float* c) {
  const auto views = views_of(grads, refs);
  std::vector<Item> items;
  for (const auto& it : make_items(views))
    if (apply_mode(c[2 * it.tensor], c[2 * it.tensor + 1]) != kKeep) items.push_back(it);
  for_items(items, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Item& it = items[k];
      const View& v = views[it.tensor];
      const float a = c[2 * it.tensor], b = c[2 * it.tensor + 1];
      dispatch_float(v.dtype, [&](auto tag) {
        using scalar_t = decltype(tag);
        apply_range<scalar_t, acc_type_t<scalar_t>>(static_cast<scalar_t*>(v.g) + it.begin,
                                                    static_cast<const scalar_t*>(v.r) + it.begin,
                                                    it.end - it.begin, a, b, apply_mode(a, b));
      });
    }
  });
}

void apply_cpu(TensorList grads, TensorList refs, Tensor coeffs) {
  check_lists(grads, refs, "grad_align_apply");
  check_coeffs(coeffs, grads);
  apply_with(grads, refs, coeffs.const_data_ptr<float>());
}

Tensor fused_cpu(TensorList grads, TensorList refs, double raw_ratio) {
  check_raw_ratio(raw_ratio);
  auto stats = reduce_cpu(grads, refs);
  const int64_t n = static_cast<int64_t>(grads.size());
  std::vector<float> coeffs(static_cast<size_t>(2 * n));
  const float* s = stats.const_data_ptr<float>();
  for (int64_t t = 0; t < n; ++t)
    align_coefficients(s[3 * t], s[3 * t + 1], s[3 * t + 2], raw_ratio, &coeffs[2 * t], &coeffs[2 * t + 1]);
  apply_with(grads, refs, coeffs.data());
  return stats;
}

}  // namespace

STABLE_TORCH_LIBRARY(muscle_kernels, m) {
  m.def("grad_align_reduce(Tensor[] grads, Tensor[] refs) -> Tensor");
  m.def("grad_align_apply(Tensor(a!)[] grads, Tensor[] refs, Tensor coeffs) -> ()");
  m.def("grad_align_fused(Tensor(a!)[] grads, Tensor[] refs, float raw_ratio) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(muscle_kernels, CPU, m) {
  m.impl("grad_align_reduce", TORCH_BOX(&reduce_cpu));
  m.impl("grad_align_apply", TORCH_BOX(&apply_cpu));
  m.impl("grad_align_fused", TORCH_BOX(&fused_cpu));
}

}  // namespace muscle_kernels
