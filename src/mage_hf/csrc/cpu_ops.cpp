// Copyright 2026 The mage-hf authors. MIT licence.
//
// CPU kernels for MAGE (training dropout; the VQGAN's group norm + swish in inference), compiled on first use by
// `mage_hf.cpu_kernels` (torch.utils.cpp_extension) and registered as `torch.ops.mage_hf.*`. See cpu_kernels.py for
// what they replace and why.
//
// dropout_mask_mul(x, seed, drop, scale): x * scale where the element's 16-bit draw is >= drop, 0 elsewhere.
//   The draws are counter-based: element i takes bits [16 (i % 4), 16 (i % 4) + 16) of splitmix64's output for the
//   counter seed + (i / 4 + 1) * golden gamma. So the mask is a pure function of (seed, i): the backward pass
//   recomputes it instead of storing it, and the result does not depend on how the work is split over threads.
//
// group_norm_silu_out(x, weight, bias, groups, eps, out): silu(group_norm(x)) for a float32 channels-last (NHWC in
//   memory) batch, written into `out` (which may be `x` itself): two passes over the data instead of the four of
//   torch's group norm and swish, and no new activation. Inference only (no backward). The statistics are
//   accumulated per channel in double precision (E[x^2] - E[x]^2 cancels when the mean is large against the
//   spread), then per group in a fixed order, so the result does not depend on the thread count.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Blocks [begin, end) of four elements each, all of them whole (the caller handles a partial last block). In place
// (`kInPlace`), `out` holds the input and `x` is never read: it is the same buffer, and the pointers are restrict so
// that the loop vectorises without run-time overlap checks.
template <bool kInPlace>
void mask_mul_blocks(const float* __restrict x, float* __restrict out, int64_t begin, int64_t end, uint64_t seed,
                     uint32_t drop, float scale) {
  for (int64_t j = begin; j < end; ++j) {
    const uint64_t r = splitmix64(seed + static_cast<uint64_t>(j + 1) * kGamma);
    for (int k = 0; k < 4; ++k) {
      const uint32_t draw = static_cast<uint32_t>(r >> (16 * k)) & 0xFFFFu;
      const float v = (kInPlace ? out[4 * j + k] : x[4 * j + k]) * scale;
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
    if (px == po) {
      mask_mul_blocks<true>(px, po, begin, end, useed, udrop, fscale);
    } else {
      mask_mul_blocks<false>(px, po, begin, end, useed, udrop, fscale);
    }
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

// exp(x) for the swish: Cephes' single-precision polynomial on [-ln2/2, ln2/2] after range reduction (about 1 ulp),
// written without libm calls or branches so that the compiler vectorises the loop that calls it.
inline float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;           // x - n ln2, in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

at::Tensor& group_norm_silu_out(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
                                double eps, at::Tensor& out) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "mage_hf::group_norm_silu_out takes a float32 channels-last (N, C, H, W) CPU tensor");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == at::kFloat &&
                  out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "out must be a float32 channels-last tensor of the input's shape");
  const int64_t batch = x.size(0), channels = x.size(1), pixels = x.size(2) * x.size(3);
  TORCH_CHECK(groups > 0 && channels % groups == 0, "channels (", channels, ") must be a multiple of groups (",
              groups, ")");
  TORCH_CHECK(weight.numel() == channels && bias.numel() == channels && weight.scalar_type() == at::kFloat &&
                  bias.scalar_type() == at::kFloat && weight.is_contiguous() && bias.is_contiguous(),
              "weight and bias must be contiguous float32 tensors of ", channels, " values");
  const int64_t per_group = channels / groups;
  const float* px = x.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const float* gamma = weight.data_ptr<float>();
  const float* beta = bias.data_ptr<float>();

  // Pass 1: per-channel sums over chunks of pixels, in parallel.
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(pixels, 262144 / std::max<int64_t>(1, channels)));
  const int64_t chunks_per_image = (pixels + chunk - 1) / chunk;
  std::vector<double> sums(batch * chunks_per_image * channels * 2, 0.0);
  at::parallel_for(0, batch * chunks_per_image, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> s(channels), q(channels);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / chunks_per_image, first = (t % chunks_per_image) * chunk;
      const int64_t last = std::min(pixels, first + chunk);
      std::fill(s.begin(), s.end(), 0.0);
      std::fill(q.begin(), q.end(), 0.0);
      for (int64_t i = first; i < last; ++i) {
        const float* row = px + (n * pixels + i) * channels;
        for (int64_t c = 0; c < channels; ++c) {
          const double v = row[c];
          s[c] += v;
          q[c] += v * v;
        }
      }
      double* dst = sums.data() + t * channels * 2;
      std::copy(s.begin(), s.end(), dst);
      std::copy(q.begin(), q.end(), dst + channels);
    }
  });
  // Per image and group, serially: per-channel mean and scale. The output is (x - mean) * scale + beta rather than
  // x * scale + shift: with a small variance the latter cancels (x * scale and shift are both large).
  std::vector<float> centre(batch * channels), scale(batch * channels);
  const double count = static_cast<double>(pixels * per_group);
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      double s = 0.0, q = 0.0;
      for (int64_t t = 0; t < chunks_per_image; ++t) {
        const double* src = sums.data() + (n * chunks_per_image + t) * channels * 2;
        for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
          s += src[c];
          q += src[channels + c];
        }
      }
      const double mean = s / count;
      const double rstd = 1.0 / std::sqrt(std::max(q / count - mean * mean, 0.0) + eps);
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        centre[n * channels + c] = static_cast<float>(mean);
        scale[n * channels + c] = static_cast<float>(gamma[c] * rstd);
      }
    }
  }
  // Pass 2: out = silu((x - mean) * scale + beta), rows of pixels in parallel (in place when out is x: each value is
  // read before it is written).
  at::parallel_for(0, batch * pixels, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* m = centre.data() + (r / pixels) * channels;
      const float* a = scale.data() + (r / pixels) * channels;
      const float* row = px + r * channels;
      float* dst = po + r * channels;
      for (int64_t c = 0; c < channels; ++c) {
        const float v = (row[c] - m[c]) * a[c] + beta[c];
        dst[c] = v / (1.0f + exp_poly(-v));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(mage_hf, m) {
  m.def("dropout_mask_mul(Tensor x, int seed, int drop, float scale) -> Tensor");
  m.def("dropout_mask_mul_(Tensor(a!) x, int seed, int drop, float scale) -> Tensor(a!)");
  m.def("group_norm_silu_out(Tensor x, Tensor weight, Tensor bias, int groups, float eps, Tensor(a!) out) -> "
        "Tensor(a!)");
}

TORCH_LIBRARY_IMPL(mage_hf, CPU, m) {
  m.impl("dropout_mask_mul", &dropout_mask_mul);
  m.impl("dropout_mask_mul_", &dropout_mask_mul_);
  m.impl("group_norm_silu_out", &group_norm_silu_out);
}
