// Copyright 2026 The mage-hf authors. MIT licence.
//
// CPU kernels for MAGE training, compiled on first use by `mage_hf.cpu_kernels` (torch.utils.cpp_extension) and
// registered as `torch.ops.mage_hf.*`. See cpu_kernels.py for what they replace and why.
//
// dropout_mask_mul(x, seed, drop, scale): x * scale where the element's 16-bit draw is >= drop, 0 elsewhere.
//   The draws are counter-based: element i takes bits [16 (i % 4), 16 (i % 4) + 16) of splitmix64's output for the
//   counter seed + (i / 4 + 1) * golden gamma. So the mask is a pure function of (seed, i): the backward pass
//   recomputes it instead of storing it, and the result does not depend on how the work is split over threads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>

namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Blocks [begin, end) of four elements each, all of them whole (the caller handles a partial last block).
void mask_mul_blocks(const float* __restrict x, float* __restrict out, int64_t begin, int64_t end, uint64_t seed,
                     uint32_t drop, float scale) {
  for (int64_t j = begin; j < end; ++j) {
    const uint64_t r = splitmix64(seed + static_cast<uint64_t>(j + 1) * kGamma);
    for (int k = 0; k < 4; ++k) {
      const uint32_t draw = static_cast<uint32_t>(r >> (16 * k)) & 0xFFFFu;
      const float v = x[4 * j + k] * scale;
      out[4 * j + k] = draw >= drop ? v : 0.0f;
    }
  }
}

at::Tensor& mask_mul_into(const at::Tensor& x, at::Tensor& out, int64_t seed, int64_t drop, double scale) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "mage_hf::dropout_mask_mul takes a contiguous float32 CPU tensor");
  TORCH_CHECK(drop > 0 && drop < 65536, "drop must lie in (0, 65536), got ", drop);
  const float* px = x.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t n = x.numel();
  const int64_t blocks = n / 4;
  const uint64_t useed = static_cast<uint64_t>(seed);
  const uint32_t udrop = static_cast<uint32_t>(drop);
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, blocks, 2048, [&](int64_t begin, int64_t end) {
    mask_mul_blocks(px, po, begin, end, useed, udrop, fscale);
  });
  if (n % 4) {  // the partial last block, with the same draws as if it were whole
    const uint64_t r = splitmix64(useed + static_cast<uint64_t>(blocks + 1) * kGamma);
    for (int64_t i = 4 * blocks; i < n; ++i) {
      const uint32_t draw = static_cast<uint32_t>(r >> (16 * (i - 4 * blocks))) & 0xFFFFu;
      po[i] = draw >= udrop ? px[i] * fscale : 0.0f;
    }
  }
  return out;
}

at::Tensor dropout_mask_mul(const at::Tensor& x, int64_t seed, int64_t drop, double scale) {
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  return mask_mul_into(x, out, seed, drop, scale);
}

at::Tensor& dropout_mask_mul_(at::Tensor& x, int64_t seed, int64_t drop, double scale) {
  return mask_mul_into(x, x, seed, drop, scale);
}

}  // namespace

TORCH_LIBRARY(mage_hf, m) {
  m.def("dropout_mask_mul(Tensor x, int seed, int drop, float scale) -> Tensor");
  m.def("dropout_mask_mul_(Tensor(a!) x, int seed, int drop, float scale) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(mage_hf, CPU, m) {
  m.impl("dropout_mask_mul", &dropout_mask_mul);
  m.impl("dropout_mask_mul_", &dropout_mask_mul_);
}
