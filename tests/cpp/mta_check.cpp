// Host-side check of csrc/multi_tensor_apply.cuh (plain C++, no GPU needed): for lists of many shapes, every
// (tensor, chunk) pair gets exactly one block, each launch stays within the kernel-parameter limits, and block
// first_block + b of the call is partial slot offset[tensor] + chunk -- the layout grad_align_cuda.cu's reduce and
// finish kernels rely on. Prints "OK <cases>" or the first failure (exit 1).
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "multi_tensor_apply.cuh"

using namespace muscle_kernels;

static int fail(const char* what, long a, long b) {
  std::printf("FAIL %s (%ld, %ld)\n", what, a, b);
  return 1;
}

static int check(const std::vector<int64_t>& sizes) {
  std::vector<mta::Entry<2>> entries;
  int64_t total = 0, nonempty = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] == 0) continue;  // the caller leaves empty tensors out
    entries.push_back({{nullptr, nullptr}, sizes[i], static_cast<int64_t>(i)});
    total += sizes[i];
    ++nonempty;
  }
  const int64_t chunk = mta::chunk_size_for(total, nonempty);
  if (chunk < mta::kMinChunkSize || chunk > mta::kChunkSize || chunk % mta::kMinChunkSize) return fail("chunk", chunk, 0);
  std::vector<int64_t> offset(sizes.size(), 0), count(sizes.size(), 0);
  int64_t slots = 0;
  for (const auto& e : entries) {
    offset[e.index] = slots;
    count[e.index] = mta::chunks_of(e.numel, chunk);
    slots += count[e.index];
  }
  std::vector<int> seen(slots, 0);
  int64_t expected_first = 0;
  int bad = 0;
  mta::multi_tensor_apply<2>(entries, chunk, [&](const mta::TensorListMeta<2>& meta, int n_blocks, int64_t first) {
    if (bad) return;
    if (first != expected_first) bad = fail("first_block", first, expected_first);
    if (n_blocks <= 0 || n_blocks > mta::kMaxBlocks) bad = fail("n_blocks", n_blocks, 0);
    if (meta.chunk_size != chunk) bad = fail("meta.chunk_size", meta.chunk_size, chunk);
    for (int b = 0; b < n_blocks && !bad; ++b) {
      const int slot = meta.block_to_tensor[b];
      if (slot >= mta::kMaxTensors) bad = fail("slot", slot, 0);
      const int64_t t = meta.tensor_index[slot];
      const int64_t c = meta.block_to_chunk[b];
      if (meta.sizes[slot] != sizes[t]) bad = fail("size", meta.sizes[slot], sizes[t]);
      if (c < 0 || c >= count[t]) bad = fail("chunk index", c, count[t]);
      if (first + b != offset[t] + c) bad = fail("slot layout", first + b, offset[t] + c);
      if (!bad) seen[first + b] += 1;
    }
    expected_first += n_blocks;
  });
  if (bad) return 1;
  if (expected_first != slots) return fail("blocks in all", expected_first, slots);
  for (int64_t s = 0; s < slots; ++s)
    if (seen[s] != 1) return fail("block seen", s, seen[s]);
  return 0;
}

int main() {
  std::mt19937_64 rng(7);
  std::vector<std::vector<int64_t>> cases = {
      {},                                       // nothing
      {0, 0},                                   // only empty tensors
      {1},                                      // one element
      std::vector<int64_t>(65, 6144),           // more than 64 small tensors
      std::vector<int64_t>(200, 1000),          // hundreds of tiny tensors
      {30000000},                               // one 30M-element tensor: split across launches
      {65536 * 320 + 1, 5, 0, 65536 * 3},       // a tensor exactly filling a launch, plus one more element
      {23440896, 393216, 768, 768, 589824, 768, 2359296, 3072},  // BERT-base-like
  };
  for (int k = 0; k < 40; ++k) {  // random mixes of small and large, with empties
    std::vector<int64_t> sizes(1 + rng() % 300);
    for (auto& s : sizes) s = (rng() % 5 == 0) ? 0 : (rng() % 3 == 0 ? rng() % 3000000 : rng() % 20000);
    cases.push_back(sizes);
  }
  for (const auto& c : cases)
    if (check(c)) return 1;
  std::printf("OK %zu\n", cases.size());
  return 0;
}
