// Argument checks shared by the CPU (grad_align.cpp) and CUDA (grad_align_cuda.cu) kernels, on the LibTorch stable
// ABI (torch/csrc/stable). Header-only and inline: the CPU and the CUDA kernels are separate shared libraries, so they
// cannot share a symbol, and both give the same messages.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace muscle_kernels {

using torch::stable::Tensor;
using TensorList = std::vector<Tensor>;
using torch::headeronly::ScalarType;

// "[3, 4]", as c10 prints sizes.
inline std::string shape_str(const Tensor& t) {
  std::ostringstream out;
  out << "[";
  for (int64_t d = 0; d < t.dim(); ++d) out << (d ? ", " : "") << t.size(d);
  out << "]";
  return out.str();
}

// "cpu", "cuda:0", "meta": the names torch prints, for the device types these ops can meet.
inline std::string device_str(const Tensor& t) {
  const auto device = t.device();
  std::string name;
  switch (device.type()) {
    case torch::headeronly::DeviceType::CPU:
      return "cpu";
    case torch::headeronly::DeviceType::CUDA:
      name = "cuda";
      break;
    case torch::headeronly::DeviceType::Meta:
      return "meta";
    default:
      name = "device type " + std::to_string(static_cast<int>(device.type()));
  }
  return device.has_index() ? name + ":" + std::to_string(static_cast<int>(device.index())) : name;
}

inline bool same_device(const Tensor& a, const Tensor& b) {
  const auto da = a.device(), db = b.device();
  return da.type() == db.type() && da.index() == db.index();
}

inline bool same_shape(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) != b.size(d)) return false;
  return true;
}

inline void check_lists(const TensorList& grads, const TensorList& refs, const char* op) {
  STD_TORCH_CHECK(grads.size() == refs.size(), op, ": grads and refs must have the same length, got ", grads.size(),
                  " and ", refs.size());
  if (grads.empty()) return;
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& g = grads[i];
    const auto& r = refs[i];
    STD_TORCH_CHECK(same_device(g, grads[0]), op, ": grads[", i, "] is on ", device_str(g), " but grads[0] is on ",
                    device_str(grads[0]), " (one device per call)");
    STD_TORCH_CHECK(same_device(r, g), op, ": refs[", i, "] is on ", device_str(r), " but grads[", i, "] is on ",
                    device_str(g));
    STD_TORCH_CHECK(same_shape(r, g), op, ": refs[", i, "] has shape ", shape_str(r), " but grads[", i,
                    "] has shape ", shape_str(g));
    const auto st = g.scalar_type();
    STD_TORCH_CHECK(r.scalar_type() == st, op, ": refs[", i, "] is ", torch::headeronly::toString(r.scalar_type()),
                    " but grads[", i, "] is ", torch::headeronly::toString(st));
    STD_TORCH_CHECK(st == ScalarType::Float || st == ScalarType::Half || st == ScalarType::BFloat16 ||
                        st == ScalarType::Double,
                    op, ": grads[", i, "] has dtype ", torch::headeronly::toString(st),
                    "; expected float32, float16, bfloat16 or float64");
    STD_TORCH_CHECK(g.is_contiguous() && r.is_contiguous(), op, ": grads[", i, "] and refs[", i,
                    "] must be contiguous (the Python wrappers make contiguous copies)");
  }
}

inline void check_coeffs(const Tensor& coeffs, const TensorList& grads) {
  const int64_t n = static_cast<int64_t>(grads.size());
  STD_TORCH_CHECK(coeffs.scalar_type() == ScalarType::Float, "grad_align_apply: coeffs must be float32, got ",
                  torch::headeronly::toString(coeffs.scalar_type()));
  STD_TORCH_CHECK(coeffs.dim() == 2 && coeffs.size(0) == n && coeffs.size(1) == 2,
                  "grad_align_apply: coeffs must have shape [n_tensors, 2] = [", n, ", 2], got ", shape_str(coeffs));
  STD_TORCH_CHECK(coeffs.is_contiguous(), "grad_align_apply: coeffs must be contiguous");
  if (n > 0) {
    STD_TORCH_CHECK(same_device(coeffs, grads[0]), "grad_align_apply: coeffs is on ", device_str(coeffs),
                    " but the gradients are on ", device_str(grads[0]));
  }
}

inline void check_raw_ratio(double raw_ratio) {
  STD_TORCH_CHECK(raw_ratio >= 0.0 && raw_ratio <= 1.0, "grad_align: raw_ratio must be in [0, 1], got ", raw_ratio);
}

}  // namespace muscle_kernels
