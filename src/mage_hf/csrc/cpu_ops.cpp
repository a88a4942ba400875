// Copyright 2026 The mage-hf authors. MIT licence.
//
// CPU kernels for MAGE (training dropout, alone and fused with GELU; the VQGAN's group norm + swish and Winograd 3x3
// convolutions in inference; attention; the gradient norm),
// compiled on first use by `mage_hf.cpu_kernels` (torch.utils.cpp_extension) and registered as `torch.ops.mage_hf.*`.
// See cpu_kernels.py for what they replace and why.
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
//
// gelu_dropout(x, seed, drop, scale) and gelu_dropout_backward(grad, x, seed, drop, scale): dropout(gelu(x)) with
//   dropout_mask_mul's mask (none when drop = 0), and its input gradient, in one pass each.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <utility>
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

// The mask's definition, used by every kernel that drops out: element i is kept when lane i % 4 of block i / 4's
// 64 random bits, a 16-bit draw, is >= drop.
inline uint64_t block_bits(uint64_t seed, int64_t block) {
  return splitmix64(seed + static_cast<uint64_t>(block + 1) * kGamma);
}

// The 64 random bits of blocks [first, first + count) into `bits`. Read as uint16_t (little-endian x86/ARM), element
// 4 j + k of the span is lane k of block j: its draw is `reinterpret_cast<const uint16_t*>(bits)[4 j + k]`, which a
// vectorised loop reads directly, with no shuffling of lanes (splitting the words in registers took most of the time).
// Both the writes and the reads go through may_alias types, so that type-based alias analysis may not move the reads
// before the writes (plain uint16_t reads of uint64_t objects would break strict aliasing).
static_assert(std::endian::native == std::endian::little, "the draws are read as the 16-bit lanes of 64-bit words");
typedef uint64_t __attribute__((may_alias)) bits64_t;
typedef uint16_t __attribute__((may_alias)) draw16_t;

// kLanes floats in one register: 16 with AVX-512, else 8 (AVX2). GCC does not vectorise some hot loops' scalar form
// on AVX2 (see mask_mul_span and exp_vec), so there they run on these vectors first (kVectorLoops), doing the same
// float operations, and the scalar loop takes the rest. With AVX-512, GCC vectorises the scalar loops itself, with
// masked instructions, and those ran 5-10% faster than the vector forms: they take the whole range.
#if defined(__AVX512F__)
#define MAGE_HF_LANES 16
constexpr bool kVectorLoops = false;
#else
#define MAGE_HF_LANES 8
constexpr bool kVectorLoops = true;
#endif
constexpr int kLanes = MAGE_HF_LANES;
typedef float vecf __attribute__((vector_size(4 * MAGE_HF_LANES)));
typedef int32_t veci __attribute__((vector_size(4 * MAGE_HF_LANES)));
typedef uint16_t vecu16 __attribute__((vector_size(2 * MAGE_HF_LANES)));

inline vecf load_vec(const float* p) {
  vecf v;
  std::memcpy(&v, p, sizeof(v));  // an unaligned load
  return v;
}

inline void store_vec(float* p, vecf v) { std::memcpy(p, &v, sizeof(v)); }

inline float sum_vec(vecf v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

inline void chunk_bits(bits64_t* __restrict bits, int64_t first, int64_t count, uint64_t seed) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) bits[j] = block_bits(seed, first + j);
}

// Elements [0, count) of a span that starts at element 4 `first_block` (whose draws it takes), in chunks of 1024:
// `body(c, m, draws)` handles elements [c, c + m), `draws` (their 16-bit draws, made first when `with_draws`) indexed
// from 0 at element c.
template <class Body>
void draw_chunks(int64_t count, int64_t first_block, uint64_t seed, bool with_draws, Body&& body) {
  constexpr int64_t kChunk = 1024;
  alignas(64) bits64_t bits[kChunk / 4];
  for (int64_t c = 0; c < count; c += kChunk) {
    const int64_t m = std::min(kChunk, count - c);
    if (with_draws) chunk_bits(bits, first_block + c / 4, (m + 3) / 4, seed);
    body(c, m, reinterpret_cast<const draw16_t*>(bits));
  }
}

// Elements [0, n) as spans of whole blocks of four, over the threads, then the partial last block (with the draws it
// would have if it were whole): `span(first_block, count)` handles elements [4 first_block, 4 first_block + count).
template <class Span>
void for_spans(int64_t n, Span&& span) {
  const int64_t blocks = n / 4;
  at::parallel_for(0, blocks, 2048, [&](int64_t begin, int64_t end) { span(begin, 4 * (end - begin)); });
  if (n % 4) span(blocks, n % 4);
}

// A span of dropout_mask_mul. In place (`kInPlace`), `out` holds the input and `x` is never read: it is the same
// buffer, and the pointers are restrict so that the loop vectorises without run-time overlap checks.
template <bool kInPlace>
void mask_mul_span(const float* __restrict x, float* __restrict out, int64_t count, int64_t first_block,
                   uint64_t seed, uint32_t drop, float scale) {
  draw_chunks(count, first_block, seed, true, [&](int64_t c, int64_t m, const draw16_t* __restrict draws) {
    const float* __restrict in = kInPlace ? out + c : x + c;
    float* __restrict y = out + c;
    int64_t v0 = 0;
    for (; kVectorLoops && v0 + kLanes <= m; v0 += kLanes) {  // GCC leaves the scalar loop unvectorised on AVX2
      vecu16 bits;
      std::memcpy(&bits, draws + v0, sizeof(bits));
      const veci keep = __builtin_convertvector(bits, veci) >= static_cast<int32_t>(drop);
      store_vec(y + v0, keep ? load_vec(in + v0) * scale : vecf{});
    }
#pragma omp simd
    for (int64_t i = v0; i < m; ++i) {
      const float v = in[i] * scale;
      y[i] = draws[i] >= drop ? v : 0.0f;
    }
  });
}

at::Tensor& mask_mul_into(const at::Tensor& x, at::Tensor& out, int64_t seed, int64_t drop, double scale) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "mage_hf::dropout_mask_mul takes a contiguous float32 CPU tensor");
  TORCH_CHECK(drop > 0 && drop < 65536, "drop must lie in (0, 65536), got ", drop);
  const float* px = x.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const uint64_t useed = static_cast<uint64_t>(seed);
  const uint32_t udrop = static_cast<uint32_t>(drop);
  const float fscale = static_cast<float>(scale);
  for_spans(x.numel(), [&](int64_t first_block, int64_t count) {
    if (px == po) {
      mask_mul_span<true>(nullptr, po + 4 * first_block, count, first_block, useed, udrop, fscale);
    } else {
      mask_mul_span<false>(px + 4 * first_block, po + 4 * first_block, count, first_block, useed, udrop, fscale);
    }
  });
  return out;
}

at::Tensor dropout_mask_mul(const at::Tensor& x, int64_t seed, int64_t drop, double scale) {
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  return mask_mul_into(x, out, seed, drop, scale);
}

at::Tensor& dropout_mask_mul_(at::Tensor& x, int64_t seed, int64_t drop, double scale) {
  return mask_mul_into(x, x, seed, drop, scale);
}

// exp(x) for the swish, GELU and softmax: Cephes' single-precision polynomial on [-ln2/2, ln2/2] after range
// reduction (about 1 ulp), written without libm calls or branches so that loops over it can be vectorised. exp(x) =
// p(r) 2^n with n = round(x / ln2) and r = x - n ln2, for x clamped to [-87, 88]; exp_round and exp_mantissa take n and
// p(r) on a float (exp_poly) or a vecf (exp_vec), so that both forms do the same float operations.
template <class T>
inline T exp_round(T x) {
  return (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
}

template <class T>
inline T exp_mantissa(T x, T n) {
  const T r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, in two parts
  T p = T{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

inline float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = exp_round(x);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return exp_mantissa(x, n) * two_n;
}

// The same on kLanes floats at once, for the hot loops. GCC vectorises a loop over the scalar form only with
// AVX-512: elsewhere (AVX2) partial redundancy elimination copies the arithmetic after the clamp into the clamp's
// branches (it is constant there), and under -ftrapping-math those branches are not if-converted, so the loop stayed
// scalar: 4.8x slower softmax exponentials and 3.0x slower swish on AVX2. Vector code has no branches to split: the
// clamp is a select.
inline vecf exp_vec(vecf x) {
  const vecf lo = vecf{} + -87.0f, hi = vecf{} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vecf n = exp_round(x);
  const veci bits = (__builtin_convertvector(n, veci) + 127) << 23;
  vecf two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return exp_mantissa(x, n) * two_n;
}

// GELU in its exact (erf) form, x Phi(x), for the MLP's hidden activations, with dropout_mask_mul's mask fused in
// (drop > 0, training) or without (drop = 0). One pass over the data instead of GELU's and dropout's two, in both
// directions. erf is Abramowitz & Stegun's 7.1.26 (|error| <= 1.5e-7), the approximation torch's vectorised CPU GELU
// uses too, so the two agree to about an ulp: with z = |x| / sqrt 2, t = 1 / (1 + p z) and the quartic r(t),
// erfc(z) = t r(t) exp(-z^2), so Phi(x) = q for x < 0 and 1 - q for x >= 0, where q = erfc(z) / 2 (the 1/2 is
// folded into r's coefficients).
struct GeluParts {
  float cdf;  // Phi(x)
  float exp;  // exp(-x^2 / 2)
};

// The quartic r(t), on a float (gelu_parts) or a vecf (gelu_parts_vec).
template <class T>
inline T erfc_quartic(T t) {
  T r = 0.5307027145f * t + -0.7265760135f;  // 7.1.26's coefficients, halved
  r = r * t + 0.7107068705f;
  r = r * t + -0.142248368f;
  return r * t + 0.127414796f;
}

inline GeluParts gelu_parts(float x) {
  const float z = std::fabs(x) * 0.70710678118654752f;
  const float t = 1.0f / (0.3275911f * z + 1.0f);
  const float e = exp_poly(-(z * z));
  const float q = (t * erfc_quartic(t)) * e;
  return {x < 0.0f ? q : 1.0f - q, e};
}

// gelu_parts on kLanes values (see exp_vec). |x| clears the sign bit, as fabs does.
struct GeluPartsVec {
  vecf cdf, exp;
};

inline GeluPartsVec gelu_parts_vec(vecf x) {
  veci magnitude;
  std::memcpy(&magnitude, &x, sizeof(x));
  magnitude &= 0x7fffffff;
  vecf z;
  std::memcpy(&z, &magnitude, sizeof(z));
  z *= 0.70710678118654752f;
  const vecf t = 1.0f / (0.3275911f * z + 1.0f);
  const vecf e = exp_vec(-(z * z));
  const vecf q = (t * erfc_quartic(t)) * e;
  return {x < vecf{} ? q : 1.0f - q, e};
}

// A span of gelu_dropout (kBackward false: out = gelu(in) (* keep)) or of its backward pass (true:
// out = grad (* keep) * gelu'(in)), as mask_mul_span.
template <bool kBackward, bool kDrop>
void gelu_span(const float* __restrict in, const float* __restrict grad, float* __restrict out, int64_t count,
               int64_t first_block, uint64_t seed, uint32_t drop, float scale) {
  draw_chunks(count, first_block, seed, kDrop, [&](int64_t c, int64_t m, const draw16_t* __restrict draws) {
    const float* __restrict x_in = in + c;
    float* __restrict y = out + c;
    int64_t v0 = 0;
    for (; kVectorLoops && v0 + kLanes <= m; v0 += kLanes) {  // see exp_vec
      const vecf x = load_vec(x_in + v0);
      const GeluPartsVec p = gelu_parts_vec(x);
      vecf v;
      if (kBackward) {
        const vecf g = load_vec(grad + c + v0);
        v = (kDrop ? g * scale : g) * (p.cdf + x * (0.3989422804014327f * p.exp));
      } else {
        v = x * p.cdf;
        if (kDrop) v *= scale;
      }
      if (kDrop) {
        vecu16 bits;
        std::memcpy(&bits, draws + v0, sizeof(bits));
        v = __builtin_convertvector(bits, veci) >= static_cast<int32_t>(drop) ? v : vecf{};
      }
      store_vec(y + v0, v);
    }
#pragma omp simd
    for (int64_t i = v0; i < m; ++i) {
      const float x = x_in[i];
      const GeluParts p = gelu_parts(x);
      float v;
      if (kBackward) {  // Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
        v = (kDrop ? grad[c + i] * scale : grad[c + i]) * (p.cdf + x * (0.3989422804014327f * p.exp));
      } else {
        v = x * p.cdf;
        if (kDrop) v *= scale;
      }
      y[i] = !kDrop || draws[i] >= drop ? v : 0.0f;
    }
  });
}

template <bool kBackward, bool kDrop>
void gelu_all(const float* in, const float* grad, float* out, int64_t n, uint64_t seed, uint32_t drop, float scale) {
  for_spans(n, [&](int64_t first_block, int64_t count) {
    const int64_t i = 4 * first_block;
    gelu_span<kBackward, kDrop>(in + i, kBackward ? grad + i : nullptr, out + i, count, first_block, seed, drop, scale);
  });
}

template <bool kBackward>
void gelu_run(const float* in, const float* grad, float* out, int64_t n, int64_t seed, int64_t drop, double scale) {
  const uint64_t useed = static_cast<uint64_t>(seed);
  const uint32_t udrop = static_cast<uint32_t>(drop);
  const float fscale = static_cast<float>(scale);
  if (drop > 0) {
    gelu_all<kBackward, true>(in, grad, out, n, useed, udrop, fscale);
  } else {
    gelu_all<kBackward, false>(in, grad, out, n, useed, udrop, fscale);
  }
}

void gelu_check(const at::Tensor& x, int64_t drop, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(), "mage_hf::", what,
              " takes a contiguous float32 CPU tensor");
  TORCH_CHECK(drop >= 0 && drop < 65536, "drop must lie in [0, 65536), got ", drop);
}

at::Tensor gelu_dropout(const at::Tensor& x, int64_t seed, int64_t drop, double scale) {
  gelu_check(x, drop, "gelu_dropout");
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  gelu_run<false>(x.data_ptr<float>(), nullptr, out.data_ptr<float>(), x.numel(), seed, drop, scale);
  return out;
}

at::Tensor gelu_dropout_backward(const at::Tensor& grad, const at::Tensor& x, int64_t seed, int64_t drop,
                                 double scale) {
  gelu_check(x, drop, "gelu_dropout_backward");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == at::kFloat && grad.is_contiguous(),
              "grad must be a contiguous float32 tensor of the input's shape");
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  gelu_run<true>(x.data_ptr<float>(), grad.data_ptr<float>(), out.data_ptr<float>(), x.numel(), seed, drop, scale);
  return out;
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
      int64_t c = 0;
      for (; kVectorLoops && c + kLanes <= channels; c += kLanes) {
        const vecf v = (load_vec(row + c) - load_vec(m + c)) * load_vec(a + c) + load_vec(beta + c);
        store_vec(dst + c, v / (1.0f + exp_vec(-v)));
      }
      for (; c < channels; ++c) {
        const float v = (row[c] - m[c]) * a[c] + beta[c];
        dst[c] = v / (1.0f + exp_poly(-v));
      }
    }
  });
  return out;
}


// ---------------------------------------------------------------------------------------------------------------
// Attention (with dropout in training; without, p = 0, in inference): softmax(scale q k^T) -> dropout -> @ v, per
// (image, head), from the qkv projection's output straight into the output projection's input layout, and the
// backward pass back into the qkv gradient. Each (image, head) pair is one task: its N x N scores live in a per-thread
// buffer that stays in L2, so none of the (B, H, N, N) tensors of the unfused path (scores, probabilities, the
// dropped-out probabilities and their gradients, 17 MB each at MAGE's decoder shape) is ever written to memory. The
// forward pass keeps only each row's maximum score and 1 / sum of exponentials; the backward pass recomputes the
// probabilities from them (one more small matmul per head, as in FlashAttention), bit for bit those of the forward
// pass (a log-sum-exp would round). The dropout mask is dropout_mask_mul's for the contiguous (B, H, N, N)
// probabilities and the same seed, so this computes what the unfused path computes with `cpu_kernels.dropout`.
//
// The matmuls are MKL's sgemm, which torch's CPU build exports; called inside at::parallel_for (an OpenMP parallel
// region) each one runs on its calling thread.

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

// Row-major C (m x n) = alpha op(A) op(B) + beta C. A row-major matrix is its transpose in column-major order, so
// this is the column-major product C^T = op(B)^T op(A)^T.
inline void gemm_rm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                    const float* b, int ldb, float beta, float* c, int ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  sgemm_(&tb, &ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// The keep multipliers of elements [first, first + n) of the flat (B, H, N, N) probabilities: scale where
// dropout_mask_mul keeps the element, 0 where it drops it. The random bits of the blocks of four draws that cover them
// go into `bits` (room for n / 4 + 2 blocks), the multipliers into `buffer` (room for n values).
inline const float* keep_row(float* __restrict buffer, bits64_t* __restrict bits, int64_t first, int64_t n,
                             uint64_t seed, uint32_t drop, float scale) {
  const int64_t block0 = first / 4;
  chunk_bits(bits, block0, (first + n + 3) / 4 - block0, seed);
  const draw16_t* __restrict draws = reinterpret_cast<const draw16_t*>(bits) + (first - 4 * block0);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) buffer[j] = draws[j] >= drop ? scale : 0.0f;
  return buffer;
}

// row[j] = exp(row[j] - m) for j < n (a softmax's numerators), and their sum; both attention passes call it, so that
// the backward pass recomputes the forward pass's values exactly.
inline float exp_shifted(float* row, int n, float m) {
  vecf acc = {};
  int v0 = 0;
  for (; kVectorLoops && v0 + kLanes <= n; v0 += kLanes) {
    const vecf e = exp_vec(load_vec(row + v0) - m);
    store_vec(row + v0, e);
    acc += e;
  }
  float sum = sum_vec(acc);
#pragma omp simd reduction(+ : sum)
  for (int j = v0; j < n; ++j) {
    row[j] = exp_poly(row[j] - m);
    sum += row[j];
  }
  return sum;
}

// The sizes and scalars both attention passes use, checked once.
struct Attention {
  int64_t batch, seq, width, heads, head_dim;
  int n, d, ld_qkv, ld_out;  // sgemm's int sizes: tokens, head size, row strides of qkv and of the output
  uint64_t seed;
  uint32_t drop;
  float scale, keep_scale;
};

Attention attention_args(const at::Tensor& qkv, int64_t heads, double scale, int64_t seed, int64_t drop,
                         double keep_scale) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.dim() == 3 && qkv.is_contiguous(),
              "mage_hf attention takes the contiguous float32 (B, N, 3 D) CPU output of the qkv projection");
  TORCH_CHECK(heads > 0 && qkv.size(2) % (3 * heads) == 0, "qkv width ", qkv.size(2), " is not 3 x heads (",
              heads, ") x head size");
  TORCH_CHECK(qkv.size(1) < (1 << 15) && qkv.size(2) < (1 << 20), "sequence or width too large for this kernel");
  TORCH_CHECK(drop >= 0 && drop < 65536, "drop must lie in [0, 65536), got ", drop);
  const int64_t width = qkv.size(2) / 3;
  return {qkv.size(0), qkv.size(1), width, heads, width / heads,
          static_cast<int>(qkv.size(1)), static_cast<int>(width / heads), static_cast<int>(3 * width),
          static_cast<int>(width), static_cast<uint64_t>(seed), static_cast<uint32_t>(drop),
          static_cast<float>(scale), static_cast<float>(keep_scale)};
}

// The random bits' room in a thread's scratch: after the n keep multipliers at `keep`, 8-byte aligned, n / 4 + 2
// blocks (the scratch holds n + n / 2 + 8 floats from `keep` on).
inline bits64_t* keep_bits(float* keep, int n) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(keep + n);
  return reinterpret_cast<bits64_t*>((end + 7) & ~uintptr_t{7});
}

// Per-thread scratch, kept between calls: fresh memory costs page faults on every call otherwise.
float* scratch(size_t floats) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < floats) buffer.resize(floats);
  return buffer.data();
}

std::vector<at::Tensor> attention_dropout_fwd(const at::Tensor& qkv, int64_t heads, double scale, int64_t seed,
                                              int64_t drop, double keep_scale) {
  const Attention s = attention_args(qkv, heads, scale, seed, drop, keep_scale);
  at::Tensor out = at::empty({s.batch, s.seq, s.width}, qkv.options());
  at::Tensor stats = at::empty({s.batch, s.heads, s.seq, 2}, qkv.options());  // per row: max score, 1 / sum
  const float* base = qkv.data_ptr<float>();
  float* pout = out.data_ptr<float>();
  float* pstats = stats.data_ptr<float>();
  const int n = s.n, d = s.d;
  at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t begin, int64_t end) {
    const size_t nn = static_cast<size_t>(n) * n;
    float* probs = scratch(nn + n + n / 2 + 8);
    float* keep = probs + nn;
    bits64_t* bits = keep_bits(keep, n);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.heads, h = task % s.heads;
      const float* q = base + b * s.seq * 3 * s.width + h * s.head_dim;
      const float* k = q + s.width;
      const float* v = q + 2 * s.width;
      gemm_rm(false, true, n, n, d, s.scale, q, s.ld_qkv, k, s.ld_qkv, 0.0f, probs, n);  // (N, N) scores
      for (int i = 0; i < n; ++i) {
        float* row = probs + static_cast<size_t>(i) * n;
        float m = row[0];
#pragma omp simd reduction(max : m)
        for (int j = 1; j < n; ++j) m = row[j] > m ? row[j] : m;
        const float inv = 1.0f / exp_shifted(row, n, m);
        pstats[2 * (task * n + i)] = m;
        pstats[2 * (task * n + i) + 1] = inv;
        if (s.drop > 0) {
          const float* kr = keep_row(keep, bits, (task * n + i) * static_cast<int64_t>(n), n, s.seed, s.drop,
                                    s.keep_scale);
          for (int j = 0; j < n; ++j) row[j] = row[j] * inv * kr[j];
        } else {
          for (int j = 0; j < n; ++j) row[j] *= inv;
        }
      }
      float* o = pout + b * s.seq * s.width + h * s.head_dim;
      gemm_rm(false, false, n, d, n, 1.0f, probs, n, v, s.ld_qkv, 0.0f, o, s.ld_out);  // (N, d) into (B, N, D)
    }
  });
  return {out, stats};
}

at::Tensor attention_dropout_bwd(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& stats,
                                 int64_t heads, double scale, int64_t seed, int64_t drop, double keep_scale) {
  const Attention s = attention_args(qkv, heads, scale, seed, drop, keep_scale);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({s.batch, s.seq, s.width}) && grad_out.is_contiguous() &&
                  grad_out.scalar_type() == at::kFloat,
              "grad_out must be a contiguous float32 (B, N, D) tensor");
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({s.batch, s.heads, s.seq, 2}) && stats.is_contiguous(),
              "stats must be the forward pass's (B, H, N, 2) row statistics");
  at::Tensor grad_qkv = at::empty_like(qkv);
  const float* base = qkv.data_ptr<float>();
  const float* pgo = grad_out.data_ptr<float>();
  const float* pstats = stats.data_ptr<float>();
  float* pgrad = grad_qkv.data_ptr<float>();
  const int n = s.n, d = s.d;
  at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t begin, int64_t end) {
    const size_t nn = static_cast<size_t>(n) * n;
    float* probs = scratch(3 * nn + n + n / 2 + 8);  // P, then dS
    float* grad_probs = probs + nn;                  // dL/d(dropped P), then dL/dP
    float* dropped = probs + 2 * nn;                 // dropout(P)
    float* keep = probs + 3 * nn;
    bits64_t* bits = keep_bits(keep, n);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.heads, h = task % s.heads;
      const int64_t offset = b * s.seq * 3 * s.width + h * s.head_dim;
      const float* q = base + offset;
      const float* k = q + s.width;
      const float* v = q + 2 * s.width;
      const float* go = pgo + b * s.seq * s.width + h * s.head_dim;
      gemm_rm(false, true, n, n, d, s.scale, q, s.ld_qkv, k, s.ld_qkv, 0.0f, probs, n);       // scores again
      gemm_rm(false, true, n, n, d, 1.0f, go, s.ld_out, v, s.ld_qkv, 0.0f, grad_probs, n);  // dO v^T
      for (int i = 0; i < n; ++i) {
        float* p = probs + static_cast<size_t>(i) * n;
        float* g = grad_probs + static_cast<size_t>(i) * n;
        float* dp = dropped + static_cast<size_t>(i) * n;
        const float m = pstats[2 * (task * n + i)], inv = pstats[2 * (task * n + i) + 1];
        exp_shifted(p, n, m);  // the forward pass's probabilities, bit for bit
        for (int j = 0; j < n; ++j) p[j] *= inv;
        if (s.drop > 0) {
          const float* kr = keep_row(keep, bits, (task * n + i) * static_cast<int64_t>(n), n, s.seed, s.drop,
                                    s.keep_scale);
          for (int j = 0; j < n; ++j) {
            dp[j] = p[j] * kr[j];
            g[j] *= kr[j];
          }
        } else {
          std::memcpy(dp, p, sizeof(float) * n);
        }
        float dot = 0.0f;  // sum_j P_ij dL/dP_ij
#pragma omp simd reduction(+ : dot)
        for (int j = 0; j < n; ++j) dot += p[j] * g[j];
        for (int j = 0; j < n; ++j) p[j] = p[j] * (g[j] - dot);  // dL/dscores
      }
      float* gq = pgrad + offset;
      const int ld = s.ld_qkv;
      gemm_rm(true, false, n, d, n, 1.0f, dropped, n, go, s.ld_out, 0.0f, gq + 2 * s.width, ld);  // dv = P'^T dO
      gemm_rm(false, false, n, d, n, s.scale, probs, n, k, ld, 0.0f, gq, ld);                    // dq = scale dS k
      gemm_rm(true, false, n, d, n, s.scale, probs, n, q, ld, 0.0f, gq + s.width, ld);           // dk = scale dS^T q
    }
  });
  return grad_qkv;
}


// ---------------------------------------------------------------------------------------------------------------
// 3x3 convolution (stride 1, padding 1) by Winograd's minimal filtering F(m x m, 3x3), m = 2 or 4, for the VQGAN's
// channels-last CPU inference (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016). The output is
// cut into m x m tiles; tile t reads an n x n patch d (n = m + 2) of the input (zero outside the image), and its
// output is A^T [ sum over input channels of (B^T d B) * u ] A, * elementwise over the n x n positions, with
// u = G g G^T prepared once per weight by the caller (cpu_kernels.py holds G). For each of the n^2 positions xi that
// sum over channels is a matmul: M_xi (tiles x K) = V_xi (tiles x C) U_xi (C x K). Tiles are taken in blocks whose V
// and M (n^2 x block x (C + K) floats) stay in a per-thread buffer; each block's matmuls run on its thread (MKL's
// sgemm, as in the attention kernel).
//
// F(2x2, 3x3) (u of 16 positions): 16 C K multiply-adds per 4 outputs instead of 36 C K (2.25x fewer). Its
//   transforms only add and subtract, and G's entries (0, +-1/2, 1) are exact: its result is closer to a float64
//   convolution than a direct float32 one. The decode uses it.
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],   A^T = [1 1 1 0; 0 1 -1 -1].
// F(4x4, 3x3) (u of 36 positions): 36 C K multiply-adds per 16 outputs (4x fewer than direct), with the points
//   0, +-1, +-2 and infinity. The transforms scale by up to 8, so its rounding error is ~10x a direct convolution's
//   (relative RMS 1.5-2.3e-6 against ~2.5e-7 at 128-512 channels): only the channels-last encode of training takes
//   it (cpu_kernels.py).
//   B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1],
//   A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1].
//
// winograd_conv3x3_(x, u, bias, out, accumulate): out = conv(x) + bias (+ out's previous values if `accumulate`),
//   x (N, C, H, W) and out (N, K, H, W) float32 channels-last, u (n^2, C, K) contiguous (its first size selects m),
//   bias (K) or None.

// The transforms are written out per tile size, with their small loops unrolled before the loop over channels is
// vectorised: written generically (B^T and A^T as functions on small arrays), or with 6-step loops GCC does not
// unroll by itself, they were vectorised within a channel instead of across channels and ran 2-3x slower.

// Input transform of one F(2x2, 3x3) tile: the 16 values of B^T d B per channel, d given by 16 row pointers (a zero
// row outside the image), written to v[xi * stride + c].
inline void winograd2_input_tile(const float* const* d, int64_t channels, float* __restrict v, int64_t stride) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    float t[4][4];
    for (int b = 0; b < 4; ++b) {  // B^T d: combine rows
      const float d0 = d[b][c], d1 = d[4 + b][c], d2 = d[8 + b][c], d3 = d[12 + b][c];
      t[0][b] = d0 - d2;
      t[1][b] = d1 + d2;
      t[2][b] = d2 - d1;
      t[3][b] = d1 - d3;
    }
    for (int a = 0; a < 4; ++a) {  // (B^T d) B: combine columns
      v[(4 * a + 0) * stride + c] = t[a][0] - t[a][2];
      v[(4 * a + 1) * stride + c] = t[a][1] + t[a][2];
      v[(4 * a + 2) * stride + c] = t[a][2] - t[a][1];
      v[(4 * a + 3) * stride + c] = t[a][1] - t[a][3];
    }
  }
}

// The same for an F(4x4, 3x3) tile: 36 values from 36 row pointers.
inline void winograd4_input_tile(const float* const* d, int64_t channels, float* __restrict v, int64_t stride) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    float t[6][6];
#pragma GCC unroll 6
    for (int b = 0; b < 6; ++b) {  // B^T d: combine rows
      const float d0 = d[b][c], d1 = d[6 + b][c], d2 = d[12 + b][c], d3 = d[18 + b][c], d4 = d[24 + b][c],
                  d5 = d[30 + b][c];
      t[0][b] = 4.0f * d0 - 5.0f * d2 + d4;
      t[1][b] = (d3 + d4) - 4.0f * (d1 + d2);
      t[2][b] = (d4 - d3) + 4.0f * (d1 - d2);
      t[3][b] = (d4 - d2) + 2.0f * (d3 - d1);
      t[4][b] = (d4 - d2) - 2.0f * (d3 - d1);
      t[5][b] = 4.0f * d1 - 5.0f * d3 + d5;
    }
#pragma GCC unroll 6
    for (int a = 0; a < 6; ++a) {  // (B^T d) B: combine columns
      const float t0 = t[a][0], t1 = t[a][1], t2 = t[a][2], t3 = t[a][3], t4 = t[a][4], t5 = t[a][5];
      v[(6 * a + 0) * stride + c] = 4.0f * t0 - 5.0f * t2 + t4;
      v[(6 * a + 1) * stride + c] = (t3 + t4) - 4.0f * (t1 + t2);
      v[(6 * a + 2) * stride + c] = (t4 - t3) + 4.0f * (t1 - t2);
      v[(6 * a + 3) * stride + c] = (t4 - t2) + 2.0f * (t3 - t1);
      v[(6 * a + 4) * stride + c] = (t4 - t2) - 2.0f * (t3 - t1);
      v[(6 * a + 5) * stride + c] = 4.0f * t1 - 5.0f * t3 + t5;
    }
  }
}

// Output transform of one F(2x2, 3x3) tile: A^T m A per output channel (m[xi * stride + k]), plus the bias and, with
// `accumulate`, the values already in the outputs; o[q] points at output pixel q = 2 row + column of the tile, or is
// null where the tile hangs over the image's edge (odd heights and widths).
template <bool kAccumulate>
inline void winograd2_output_tile(const float* __restrict m, int64_t stride, int64_t channels, const float* bias,
                                  float* const* o) {
  const bool whole = o[0] && o[1] && o[2] && o[3];
  float* __restrict o0 = o[0];
  float* __restrict o1 = o[1];
  float* __restrict o2 = o[2];
  float* __restrict o3 = o[3];
#pragma omp simd
  for (int64_t k = 0; k < channels; ++k) {
    float s[2][4];
    for (int b = 0; b < 4; ++b) {  // A^T m: combine rows
      const float m0 = m[b * stride + k], m1 = m[(4 + b) * stride + k];
      const float m2 = m[(8 + b) * stride + k], m3 = m[(12 + b) * stride + k];
      s[0][b] = m0 + m1 + m2;
      s[1][b] = m1 - m2 - m3;
    }
    const float bk = bias ? bias[k] : 0.0f;
    float y[4] = {s[0][0] + s[0][1] + s[0][2] + bk, s[0][1] - s[0][2] - s[0][3] + bk,
                  s[1][0] + s[1][1] + s[1][2] + bk, s[1][1] - s[1][2] - s[1][3] + bk};
    if (whole) {
      if (kAccumulate) {
        y[0] += o0[k];
        y[1] += o1[k];
        y[2] += o2[k];
        y[3] += o3[k];
      }
      o0[k] = y[0];
      o1[k] = y[1];
      o2[k] = y[2];
      o3[k] = y[3];
    } else {
      for (int q = 0; q < 4; ++q) {
        if (o[q]) o[q][k] = kAccumulate ? y[q] + o[q][k] : y[q];
      }
    }
  }
}

// The same for an F(4x4, 3x3) tile: 16 outputs from 36 values; o[q] for q = 4 row + column. A whole tile's four
// pixels in a row are consecutive in memory, `channels` apart, so it is written through four row pointers; tiles
// over the edge (sides that are not multiples of 4) take the loop with a test per pixel.
template <bool kAccumulate, bool kWhole>
inline void winograd4_output_loop(const float* __restrict m, int64_t stride, int64_t channels, const float* bias,
                                  float* const* o) {
  float* __restrict rows[4] = {o[0], o[4], o[8], o[12]};  // used for whole tiles only
#pragma omp simd
  for (int64_t k = 0; k < channels; ++k) {
    float s[4][6];
#pragma GCC unroll 6
    for (int b = 0; b < 6; ++b) {  // A^T m: combine rows
      const float m0 = m[b * stride + k], m1 = m[(6 + b) * stride + k], m2 = m[(12 + b) * stride + k],
                  m3 = m[(18 + b) * stride + k], m4 = m[(24 + b) * stride + k], m5 = m[(30 + b) * stride + k];
      const float s12 = m1 + m2, d12 = m1 - m2, s34 = m3 + m4, d34 = m3 - m4;
      s[0][b] = m0 + s12 + s34;
      s[1][b] = d12 + 2.0f * d34;
      s[2][b] = s12 + 4.0f * s34;
      s[3][b] = d12 + 8.0f * d34 + m5;
    }
    const float bk = bias ? bias[k] : 0.0f;
#pragma GCC unroll 4
    for (int a = 0; a < 4; ++a) {  // (A^T m) A: combine columns
      const float s12 = s[a][1] + s[a][2], d12 = s[a][1] - s[a][2], s34 = s[a][3] + s[a][4], d34 = s[a][3] - s[a][4];
      const float y[4] = {s[a][0] + s12 + s34 + bk, d12 + 2.0f * d34 + bk, s12 + 4.0f * s34 + bk,
                          d12 + 8.0f * d34 + s[a][5] + bk};
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        if (kWhole) {
          float* target = rows[a] + j * channels + k;
          *target = kAccumulate ? y[j] + *target : y[j];
        } else if (o[4 * a + j]) {
          float* target = o[4 * a + j] + k;
          *target = kAccumulate ? y[j] + *target : y[j];
        }
      }
    }
  }
}

template <bool kAccumulate>
inline void winograd4_output_tile(const float* __restrict m, int64_t stride, int64_t channels, const float* bias,
                                  float* const* o) {
  bool whole = true;
  for (int q = 0; q < 16; ++q) whole = whole && o[q];
  if (whole) {
    winograd4_output_loop<kAccumulate, true>(m, stride, channels, bias, o);
  } else {
    winograd4_output_loop<kAccumulate, false>(m, stride, channels, bias, o);
  }
}

template <int M>
void winograd_conv3x3_impl(const float* px, const float* pu, const float* pbias, float* po, int64_t batch,
                           int64_t channels, int64_t height, int64_t width, int64_t out_channels, bool accumulate) {
  constexpr int n = M + 2, positions = n * n;
  const int64_t tile_cols = (width + M - 1) / M, per_image = (height + M - 1) / M * tile_cols;
  const int64_t tiles = batch * per_image;
  if (tiles == 0) return;
  // Tiles per block: up to 256 (the matmuls' efficiency grows with it), at most 16 MB of buffers per thread, and a
  // multiple of the thread count in blocks of equal size (a 32x32 image has only 64 tiles of 4x4; three blocks on two
  // threads would leave one idle half the time).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t widest = std::min<int64_t>(
      256, std::max<int64_t>(16, (int64_t{1} << 22) / (positions * (channels + out_channels))));
  int64_t blocks = (tiles + widest - 1) / widest;
  blocks = (blocks + threads - 1) / threads * threads;
  const int64_t block = (tiles + blocks - 1) / blocks;
  blocks = (tiles + block - 1) / block;
  const int64_t ld = block * out_channels;  // the stride between positions in a block's products M
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    float* v = scratch(static_cast<size_t>(positions * block * (channels + out_channels) + channels));
    float* m = v + positions * block * channels;
    float* zeros = m + positions * block * out_channels;
    std::fill(zeros, zeros + channels, 0.0f);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t first = blk * block, count = std::min(block, tiles - first);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t t = first + i, image = t / per_image, row = (t % per_image) / tile_cols, col = t % tile_cols;
        const float* d[positions];
        for (int a = 0; a < n; ++a) {
          for (int b = 0; b < n; ++b) {
            const int64_t h = M * row - 1 + a, w = M * col - 1 + b;
            const bool inside = h >= 0 && h < height && w >= 0 && w < width;
            d[n * a + b] = inside ? px + ((image * height + h) * width + w) * channels : zeros;
          }
        }
        if constexpr (M == 2) {
          winograd2_input_tile(d, channels, v + i * channels, block * channels);
        } else {
          winograd4_input_tile(d, channels, v + i * channels, block * channels);
        }
      }
      for (int xi = 0; xi < positions; ++xi) {  // M_xi = V_xi U_xi
        gemm_rm(false, false, static_cast<int>(count), static_cast<int>(out_channels), static_cast<int>(channels),
                1.0f, v + xi * block * channels, static_cast<int>(channels), pu + xi * channels * out_channels,
                static_cast<int>(out_channels), 0.0f, m + xi * ld, static_cast<int>(out_channels));
      }
      for (int64_t i = 0; i < count; ++i) {
        const int64_t t = first + i, image = t / per_image, row = (t % per_image) / tile_cols, col = t % tile_cols;
        float* o[M * M];
        for (int a = 0; a < M; ++a) {
          for (int b = 0; b < M; ++b) {
            const int64_t h = M * row + a, w = M * col + b;
            o[M * a + b] = h < height && w < width ? po + ((image * height + h) * width + w) * out_channels : nullptr;
          }
        }
        const float* tile_m = m + i * out_channels;
        if constexpr (M == 2) {
          accumulate ? winograd2_output_tile<true>(tile_m, ld, out_channels, pbias, o)
                     : winograd2_output_tile<false>(tile_m, ld, out_channels, pbias, o);
        } else {
          accumulate ? winograd4_output_tile<true>(tile_m, ld, out_channels, pbias, o)
                     : winograd4_output_tile<false>(tile_m, ld, out_channels, pbias, o);
        }
      }
    }
  });
}

at::Tensor& winograd_conv3x3_(const at::Tensor& x, const at::Tensor& u, const c10::optional<at::Tensor>& bias,
                              at::Tensor& out, bool accumulate) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "mage_hf::winograd_conv3x3_ takes a float32 channels-last (N, C, H, W) CPU tensor");
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  TORCH_CHECK(u.scalar_type() == at::kFloat && u.is_contiguous() && u.dim() == 3 &&
                  (u.size(0) == 16 || u.size(0) == 36) && u.size(1) == channels,
              "u must be the contiguous (16 or 36, C, K) float32 transform of a 3x3 weight with C = ", channels);
  const int64_t out_channels = u.size(2);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  out.sizes() == at::IntArrayRef({batch, out_channels, height, width}) &&
                  out.data_ptr() != x.data_ptr(),
              "out must be a float32 channels-last (N, K, H, W) tensor other than x");
  const float* pbias = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out_channels,
                "bias must be a contiguous float32 tensor of ", out_channels, " values");
    pbias = bias->data_ptr<float>();
  }
  TORCH_CHECK(channels < (1 << 20) && out_channels < (1 << 20), "too many channels for this kernel");
  if (u.size(0) == 16) {
    winograd_conv3x3_impl<2>(x.data_ptr<float>(), u.data_ptr<float>(), pbias, out.data_ptr<float>(), batch, channels,
                             height, width, out_channels, accumulate);
  } else {
    winograd_conv3x3_impl<4>(x.data_ptr<float>(), u.data_ptr<float>(), pbias, out.data_ptr<float>(), batch, channels,
                             height, width, out_channels, accumulate);
  }
  return out;
}


// Sum of the squares of every element of `tensors` (float32, contiguous, CPU), accumulated in double precision: the
// squared gradient norm for clipping. Fixed chunks of the concatenated elements are summed in parallel and the
// partial sums added in order, so the result does not depend on the thread count.
double sum_of_squares(at::TensorList tensors) {
  constexpr int64_t kChunk = 1 << 16;
  std::vector<std::pair<const float*, int64_t>> chunks;
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                "mage_hf::sum_of_squares takes contiguous float32 CPU tensors");
    const float* p = t.data_ptr<float>();
    for (int64_t offset = 0; offset < t.numel(); offset += kChunk) {
      chunks.emplace_back(p + offset, std::min(kChunk, t.numel() - offset));
    }
  }
  std::vector<double> partial(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const float* __restrict x = chunks[c].first;
      const int64_t n = chunks[c].second;
      double acc = 0.0;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(x[i]) * static_cast<double>(x[i]);
      partial[c] = acc;
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

}  // namespace

TORCH_LIBRARY(mage_hf, m) {
  m.def("dropout_mask_mul(Tensor x, int seed, int drop, float scale) -> Tensor");
  m.def("dropout_mask_mul_(Tensor(a!) x, int seed, int drop, float scale) -> Tensor(a!)");
  m.def("group_norm_silu_out(Tensor x, Tensor weight, Tensor bias, int groups, float eps, Tensor(a!) out) -> "
        "Tensor(a!)");
  m.def("attention_dropout_fwd(Tensor qkv, int heads, float scale, int seed, int drop, float keep_scale) -> Tensor[]");
  m.def("attention_dropout_bwd(Tensor grad_out, Tensor qkv, Tensor stats, int heads, float scale, int seed, int drop, "
        "float keep_scale) -> Tensor");
  m.def("sum_of_squares(Tensor[] tensors) -> float");
  m.def("winograd_conv3x3_(Tensor x, Tensor u, Tensor? bias, Tensor(a!) out, bool accumulate) -> Tensor(a!)");
  m.def("gelu_dropout(Tensor x, int seed, int drop, float scale) -> Tensor");
  m.def("gelu_dropout_backward(Tensor grad, Tensor x, int seed, int drop, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(mage_hf, CPU, m) {
  m.impl("dropout_mask_mul", &dropout_mask_mul);
  m.impl("dropout_mask_mul_", &dropout_mask_mul_);
  m.impl("group_norm_silu_out", &group_norm_silu_out);
  m.impl("attention_dropout_fwd", &attention_dropout_fwd);
  m.impl("attention_dropout_bwd", &attention_dropout_bwd);
  m.impl("sum_of_squares", &sum_of_squares);
  m.impl("winograd_conv3x3_", &winograd_conv3x3_);
  m.impl("gelu_dropout", &gelu_dropout);
  m.impl("gelu_dropout_backward", &gelu_dropout_backward);
}
