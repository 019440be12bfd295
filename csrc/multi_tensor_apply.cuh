// Multi-tensor launches in the style of apex's multi_tensor_apply: the addresses and sizes of many tensors are packed
// into one kernel-argument struct, the tensors are cut into chunks of `chunk_size` elements (one size per call, see
// chunk_size_for), and each CUDA block handles one (tensor, chunk) pair. A list of hundreds of tensors then costs a handful of launches instead of one per tensor,
// and nothing is copied to the device beforehand (the struct travels in the kernel parameters).
//
// Limits: the struct must fit the classic 4 KiB kernel-parameter space, so one launch carries at most kMaxTensors
// tensors and kMaxBlocks blocks; the launcher starts a new launch when either runs out. All tensors of one call must
// share a dtype (the caller groups by dtype) and be contiguous. Plain pointers and sizes in, no ATen: the launcher
// is part of the stable-ABI build.
#pragma once

#include <cstdint>
#include <vector>

namespace muscle_kernels {
namespace mta {

constexpr int64_t kChunkSize = 65536;    // elements per block for big tensors
constexpr int64_t kMinChunkSize = 4096;  // 8 elements per thread of a 512-thread block
constexpr int kMaxTensors = 64;
constexpr int kMaxBlocks = 320;

// The chunk size for a list: kChunkSize, unless its tensors are small on average. A launch carries at most
// kMaxTensors tensors, so with one block per small tensor a launch would have at most 64 blocks and leave most of a
// big GPU idle; cutting small tensors into about four chunks (of at least kMinChunkSize) gives a launch up to ~256.
inline int64_t chunk_size_for(const int64_t total_elements, const int64_t n_tensors) {
  if (n_tensors == 0) return kChunkSize;
  const int64_t quarter = (total_elements / n_tensors + 3) / 4;
  const int64_t rounded = (quarter + kMinChunkSize - 1) / kMinChunkSize * kMinChunkSize;
  return rounded < kMinChunkSize ? kMinChunkSize : (rounded > kChunkSize ? kChunkSize : rounded);
}

inline int64_t chunks_of(const int64_t numel, const int64_t chunk_size) { return (numel + chunk_size - 1) / chunk_size; }

template <int DEPTH>
struct TensorListMeta {
  int64_t chunk_size;
  void* addresses[DEPTH][kMaxTensors];
  int64_t sizes[kMaxTensors];
  int32_t tensor_index[kMaxTensors];  // position of the tensor in the caller's full list (for stats/coeffs)
  uint8_t block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
};
static_assert(sizeof(TensorListMeta<2>) <= 4000, "kernel parameters must stay under 4 KiB");

// One tensor of a launch list: its DEPTH data pointers, its size and its position in the caller's full list.
template <int DEPTH>
struct Entry {
  void* ptr[DEPTH];
  int64_t numel;
  int64_t index;
};

// launch(meta, n_blocks, first_block) must enqueue one kernel with n_blocks blocks on the current stream;
// first_block counts the blocks of the earlier launches of this call, so block b of a launch is block
// first_block + b of the call, and the blocks of one tensor are consecutive (entry order, then chunk order).
template <int DEPTH, typename Launch>
void multi_tensor_apply(const std::vector<Entry<DEPTH>>& entries, const int64_t chunk_size, Launch&& launch) {
  TensorListMeta<DEPTH> meta;
  meta.chunk_size = chunk_size;
  int n_tensors = 0;
  int n_blocks = 0;
  int64_t launched = 0;
  for (const auto& e : entries) {
    const int64_t numel = e.numel;
    if (numel == 0) continue;
    const int64_t n_chunks = chunks_of(numel, chunk_size);
    bool in_meta = false;
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
      if (!in_meta) {
        for (int d = 0; d < DEPTH; ++d) meta.addresses[d][n_tensors] = e.ptr[d];
        meta.sizes[n_tensors] = numel;
        meta.tensor_index[n_tensors] = static_cast<int32_t>(e.index);
        ++n_tensors;
        in_meta = true;
      }
      meta.block_to_tensor[n_blocks] = static_cast<uint8_t>(n_tensors - 1);
      meta.block_to_chunk[n_blocks] = static_cast<int32_t>(chunk);
      ++n_blocks;
      const bool blocks_full = n_blocks == kMaxBlocks;
      const bool tensors_full = n_tensors == kMaxTensors && chunk == n_chunks - 1;
      if (blocks_full || tensors_full) {
        launch(meta, n_blocks, launched);
        launched += n_blocks;
        n_blocks = 0;
        n_tensors = 0;
        in_meta = false;  // a tensor cut in the middle is re-registered in the next launch
      }
    }
  }
  if (n_blocks > 0) launch(meta, n_blocks, launched);
}

}  // namespace mta
}  // namespace muscle_kernels
