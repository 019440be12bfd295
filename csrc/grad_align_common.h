// Shared by the CPU (grad_align.cpp) and CUDA (grad_align_cuda.cu) kernels: the per-tensor coefficient rule.
//
// docs/alignment.md: g <- (1 - rho) * c * r + rho * g with c = |<g, r>| / ||r||^2. We write it as g <- a * r + b * g with
// a = (1 - rho) * c and b = rho, so that the apply stage takes two numbers per tensor and knows nothing about the gate.
// (a, b) = (0, 1) means "keep g": used for a zero g or r (docs/alignment.md), and for a tensor whose fp32 stats row is not finite
// (a NaN/inf in g or r, or sums that overflow fp32) or whose coefficient overflows fp32 -- such a tensor is left
// bit-for-bit unchanged and never read again, so it cannot spread a NaN to any other tensor.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define MK_HOST_DEVICE __host__ __device__
#else
#define MK_HOST_DEVICE
#endif

#if defined(__CUDACC__)
#define MK_ISFINITE(x) isfinite(x)
#define MK_FABS(x) fabs(x)
#else
#define MK_ISFINITE(x) std::isfinite(x)
#define MK_FABS(x) std::fabs(x)
#endif

namespace muscle_kernels {

MK_HOST_DEVICE inline void align_coefficients(float dot, float gg, float rr, double rho, float* a, float* b) {
  *a = 0.0f;
  *b = 1.0f;
  if (!(MK_ISFINITE(dot) && MK_ISFINITE(gg) && MK_ISFINITE(rr)) || gg == 0.0f || rr == 0.0f) return;
  // double for the one division per tensor: the Python helper (grad_align_coeffs) does the same, bit for bit.
  const float scaled = static_cast<float>((1.0 - rho) * (MK_FABS(static_cast<double>(dot)) / static_cast<double>(rr)));
  if (!MK_ISFINITE(scaled)) return;
  *a = scaled;
  *b = static_cast<float>(rho);
}

// The apply stage's modes, decided per tensor from (a, b); uniform within a tensor, so a branch costs nothing.
enum ApplyMode : int { kKeep = 0, kReplace = 1 /* g = a r, g not read */, kScale = 2 /* g = b g, r not read */,
                       kBlend = 3 /* g = a r + b g */ };

MK_HOST_DEVICE inline int apply_mode(float a, float b) {
  if (a == 0.0f && b == 1.0f) return kKeep;
  if (b == 0.0f) return kReplace;
  if (a == 0.0f) return kScale;
  return kBlend;
}

}  // namespace muscle_kernels
