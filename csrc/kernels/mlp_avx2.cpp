// AVX2 + FMA level: fp32 FMA micro-kernels on 8-wide output panels; int8 as u8
// activations x s8 weights by VPMADDUBSW (pairs into int16) and VPMADDWD (into int32). The
// weights are quantised so that no pair saturates int16 (kInt8PairLimit), which keeps the
// sum exact. Compiled with -mavx2 -mfma.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <utility>

#include "kernels/mlp_kernels.h"

namespace vivace::kernels {
namespace {

// Register blocks must be fully unrolled for the accumulators to stay in registers.
#define VIVACE_UNROLL _Pragma("GCC unroll 16")

// Accumulators are plain GCC vector types: the __m512/__m256 types are may_alias, which
// makes GCC keep an array of them in memory (a store per FMA) once the kernel also stores
// floats through y.
typedef float F32x8 __attribute__((vector_size(32)));
typedef int32_t I32x8 __attribute__((vector_size(32)));

constexpr int kLanes = 8;
constexpr int kStep = 4;  // int8 inputs per 32-bit lane
constexpr int kMaxRows = 4;
constexpr int kMaxPanels = 6;  // 6 only for <= 2 rows (12 accumulators)
constexpr int kChains = 4;     // independent reductions per row in Quantize

__m256i TailMask(int remaining) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(remaining), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// VMASKMOVPS stores are microcoded on AMD CPUs (Zen 2 to 4: several times a plain store's
// cost, ~15% of the int8 kernel's time): whole panels, the common case, store plainly.
void StorePanel(float* y, __m256 v, int remaining) {
  if (remaining >= kLanes)
    _mm256_storeu_ps(y, v);
  else
    _mm256_maskstore_ps(y, TailMask(remaining), v);
}

float ReduceMin(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

float ReduceMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

template <int R, int V>
void KernelFp32(const float* x, int64_t ldx, int k, const float* w, int64_t panel_stride, const float* bias,
                bool relu, float* y, int64_t ldy, int n_valid) {
  F32x8 acc[R * V];
  VIVACE_UNROLL
  for (int r = 0; r < R; ++r)
    VIVACE_UNROLL
    for (int v = 0; v < V; ++v) acc[r * V + v] = F32x8{};
  for (int i = 0; i < k; ++i) {
    __m256 wv[V];
    VIVACE_UNROLL
    for (int v = 0; v < V; ++v) wv[v] = _mm256_loadu_ps(w + v * panel_stride + i * kLanes);
    VIVACE_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * ldx + i);
      VIVACE_UNROLL
      for (int v = 0; v < V; ++v) acc[r * V + v] = (F32x8)_mm256_fmadd_ps(xb, wv[v], (__m256)acc[r * V + v]);
    }
  }
  const __m256 zero = _mm256_setzero_ps();
  VIVACE_UNROLL
  for (int v = 0; v < V; ++v) {
    const int remaining = n_valid - v * kLanes;
    if (remaining <= 0) continue;
    const __m256 b = _mm256_loadu_ps(bias + v * kLanes);
    VIVACE_UNROLL
    for (int r = 0; r < R; ++r) {
      __m256 t = _mm256_add_ps((__m256)acc[r * V + v], b);
      if (relu) t = _mm256_max_ps(zero, t);  // second operand on NaN: NaN passes through
      StorePanel(y + r * ldy + v * kLanes, t, remaining);
    }
  }
}

template <int R, int V>
void KernelInt8(const uint8_t* q, int64_t ldq, int steps, const int8_t* w, int64_t panel_stride,
                const Int8Epilogue& e, int64_t row0, int out0, float* y, int64_t ldy, int n_valid) {
  I32x8 acc[R * V];
  VIVACE_UNROLL
  for (int r = 0; r < R; ++r)
    VIVACE_UNROLL
    for (int v = 0; v < V; ++v) acc[r * V + v] = I32x8{};
  const __m256i ones = _mm256_set1_epi16(1);
  for (int s = 0; s < steps; ++s) {
    __m256i wv[V];
    VIVACE_UNROLL
    for (int v = 0; v < V; ++v)
      wv[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + v * panel_stride + s * kStep * kLanes));
    VIVACE_UNROLL
    for (int r = 0; r < R; ++r) {
      int32_t quad;
      std::memcpy(&quad, q + r * ldq + s * kStep, sizeof quad);
      const __m256i xb = _mm256_set1_epi32(quad);
      VIVACE_UNROLL
      for (int v = 0; v < V; ++v) {
        // Exact: kInt8PairLimit keeps each pair's sum within int16.
        const __m256i pairs = _mm256_maddubs_epi16(xb, wv[v]);
        acc[r * V + v] = (I32x8)_mm256_add_epi32((__m256i)acc[r * V + v], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  // Locals, not e's fields: the stores through y could alias them, forcing a reload each.
  const float* const row_scale = e.row_scale + row0;
  const float* const row_min = e.row_min + row0;
  const bool relu = e.relu;
  const __m256 zero = _mm256_setzero_ps();
  VIVACE_UNROLL
  for (int v = 0; v < V; ++v) {
    const int remaining = n_valid - v * kLanes;
    if (remaining <= 0) continue;
    const int o = out0 + v * kLanes;
    const __m256 ws = _mm256_loadu_ps(e.w_scale + o);
    const __m256 wsum = _mm256_loadu_ps(e.w_sum + o);
    const __m256 b = _mm256_loadu_ps(e.bias + o);
    VIVACE_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(row_scale[r]), ws);
      const __m256 offset = _mm256_fmadd_ps(_mm256_set1_ps(row_min[r]), wsum, b);
      __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps((__m256i)acc[r * V + v]), scale, offset);
      if (relu) t = _mm256_max_ps(zero, t);
      StorePanel(y + r * ldy + v * kLanes, t, remaining);
    }
  }
}

using Fp32Fn = decltype(&KernelFp32<1, 1>);
using Int8Fn = decltype(&KernelInt8<1, 1>);

template <int... I>
constexpr std::array<Fp32Fn, sizeof...(I)> Fp32Table(std::integer_sequence<int, I...>) {
  return {&KernelFp32<I / kMaxPanels + 1, I % kMaxPanels + 1>...};
}
template <int... I>
constexpr std::array<Int8Fn, sizeof...(I)> Int8Table(std::integer_sequence<int, I...>) {
  return {&KernelInt8<I / kMaxPanels + 1, I % kMaxPanels + 1>...};
}
constexpr auto kFp32 = Fp32Table(std::make_integer_sequence<int, kMaxRows * kMaxPanels>{});
constexpr auto kInt8 = Int8Table(std::make_integer_sequence<int, kMaxRows * kMaxPanels>{});

void GemmFp32(const float* x, int64_t ldx, int64_t rows, int k, const float* packed, int n, const float* bias,
              bool relu, float* y, int64_t ldy) {
  const int panels = (n + kLanes - 1) / kLanes;
  const int64_t stride = static_cast<int64_t>(k) * kLanes;
  const int block = rows <= 2 ? kMaxPanels : 3;
  for (int p0 = 0; p0 < panels; p0 += block) {
    const int v = std::min(block, panels - p0);
    const int n_valid = std::min(n - p0 * kLanes, v * kLanes);
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
      const auto r = static_cast<int>(std::min<int64_t>(kMaxRows, rows - r0));
      kFp32[(r - 1) * kMaxPanels + (v - 1)](x + r0 * ldx, ldx, k, packed + p0 * stride, stride,
                                            bias + p0 * kLanes, relu, y + r0 * ldy + p0 * kLanes, ldy, n_valid);
    }
  }
}

void GemmInt8(const void* q, int64_t ldq, int64_t rows, int k_pad, const int8_t* packed, int n,
              const Int8Epilogue& e, float* y, int64_t ldy) {
  const auto* qa = static_cast<const uint8_t*>(q);
  const int panels = (n + kLanes - 1) / kLanes;
  const int64_t stride = static_cast<int64_t>(k_pad) * kLanes;
  const int block = rows <= 2 ? 4 : 2;
  for (int p0 = 0; p0 < panels; p0 += block) {
    const int v = std::min(block, panels - p0);
    const int n_valid = std::min(n - p0 * kLanes, v * kLanes);
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
      const auto r = static_cast<int>(std::min<int64_t>(kMaxRows, rows - r0));
      kInt8[(r - 1) * kMaxPanels + (v - 1)](qa + r0 * ldq, ldq, k_pad / kStep, packed + p0 * stride, stride, e, r0,
                                            p0 * kLanes, y + r0 * ldy + p0 * kLanes, ldy, n_valid);
    }
  }
}

void Quantize(const float* x, int64_t ldx, int64_t rows, int k, int k_pad, const StaticRange* fixed, void* q,
              int64_t ldq, float* row_scale, float* row_min) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 top = _mm256_set1_ps(255.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    uint8_t* qr = static_cast<uint8_t*>(q) + r * ldq;
    // Four independent chains: a single one waits out the FMA's latency at every vector.
    __m256 lo[kChains], hi[kChains], poison[kChains];
    for (int c = 0; c < kChains; ++c) {
      lo[c] = _mm256_set1_ps(std::numeric_limits<float>::infinity());
      hi[c] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      poison[c] = zero;
    }
    int i = 0;
    for (; i + kChains * kLanes <= k; i += kChains * kLanes) {
      VIVACE_UNROLL
      for (int c = 0; c < kChains; ++c) {
        const __m256 v = _mm256_loadu_ps(xr + i + c * kLanes);
        lo[c] = _mm256_min_ps(lo[c], v);
        hi[c] = _mm256_max_ps(hi[c], v);
        poison[c] = _mm256_fmadd_ps(v, zero, poison[c]);  // NaN for a NaN or ±Inf
      }
    }
    for (; i + kLanes <= k; i += kLanes) {
      const __m256 v = _mm256_loadu_ps(xr + i);
      lo[0] = _mm256_min_ps(lo[0], v);
      hi[0] = _mm256_max_ps(hi[0], v);
      poison[0] = _mm256_fmadd_ps(v, zero, poison[0]);
    }
    for (int c = 1; c < kChains; ++c) {
      lo[0] = _mm256_min_ps(lo[0], lo[c]);
      hi[0] = _mm256_max_ps(hi[0], hi[c]);
      poison[0] = _mm256_add_ps(poison[0], poison[c]);
    }
    float tail_lo = 0.0f, tail_hi = 0.0f;
    const bool tail_finite = i == k || RowRange(xr + i, k - i, &tail_lo, &tail_hi);
    alignas(32) float p[kLanes];
    _mm256_store_ps(p, poison[0]);
    float poison_sum = 0.0f;
    for (float v : p) poison_sum += v;
    if (!tail_finite || poison_sum != 0.0f) {
      std::memset(qr, 0, static_cast<size_t>(k_pad));
      row_scale[r] = std::numeric_limits<float>::quiet_NaN();
      row_min[r] = 0.0f;
      continue;
    }
    float lo_all = ReduceMin(lo[0]), hi_all = ReduceMax(hi[0]);
    if (i < k) {
      lo_all = std::min(lo_all, tail_lo);
      hi_all = std::max(hi_all, tail_hi);
    }
    float min = 0.0f, scale = 0.0f, inv = 0.0f;
    QuantParams(lo_all, hi_all, fixed, &min, &scale, &inv);
    const __m256 vmin = _mm256_set1_ps(min);
    const __m256 vinv = _mm256_set1_ps(inv);
    const auto levels = [&](const float* from) {
      const __m256 t = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(from), vmin), vinv);
      return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(t, zero), top));
    };
    // 32 at a time: two 256-bit packs and one permute, instead of four 128-bit pack pairs.
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    i = 0;
    for (; i + 4 * kLanes <= k; i += 4 * kLanes) {
      const __m256i words01 = _mm256_packus_epi32(levels(xr + i), levels(xr + i + kLanes));
      const __m256i words23 = _mm256_packus_epi32(levels(xr + i + 2 * kLanes), levels(xr + i + 3 * kLanes));
      const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(words01, words23), order);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + i), bytes);
    }
    for (; i + kLanes <= k; i += kLanes) {
      const __m256i v = levels(xr + i);
      const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(qr + i), _mm_packus_epi16(words, words));
    }
    QuantizeRowScalar(xr, i, k, min, inv, qr, 1);
    std::memset(qr + k, 0, static_cast<size_t>(k_pad - k));
    row_scale[r] = scale;
    row_min[r] = min;
  }
}

void DotFp32(const float* x, int64_t ldx, int64_t rows, int k, const float* w, int n, const float* bias, bool relu,
             float* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    for (int o = 0; o < n; ++o) {
      const float* wo = w + static_cast<int64_t>(o) * k;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;  // independent chains
      int i = 0;
      for (; i + 4 * kLanes <= k; i += 4 * kLanes) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i), _mm256_loadu_ps(wo + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i + 8), _mm256_loadu_ps(wo + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i + 16), _mm256_loadu_ps(wo + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i + 24), _mm256_loadu_ps(wo + i + 24), a3);
      }
      for (; i + kLanes <= k; i += kLanes) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i), _mm256_loadu_ps(wo + i), a0);
      const __m256 sum = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
      alignas(32) float lanes[kLanes];
      _mm256_store_ps(lanes, sum);
      float v = 0.0f;
      for (float l : lanes) v += l;
      for (; i < k; ++i) v += xr[i] * wo[i];
      v += bias[o];
      if (relu) v = v < 0.0f ? 0.0f : v;
      y[r * ldy + o] = v;
    }
  }
}

// In assembly: from intrinsics, GCC folds the repeated products of constant operands.
int64_t Int8PeakLoop(int64_t iterations) {
#define VIVACE_TRIPLE(acc, tmp, w)                                  \
  "vpmaddubsw %%ymm14, %%" #w ", %%" #tmp "\n\t"                  \
  "vpmaddwd %%ymm15, %%" #tmp ", %%" #tmp "\n\t"                  \
  "vpaddd %%" #tmp ", %%" #acc ", %%" #acc "\n\t"
  int64_t left = iterations;
  __asm__ volatile(
      "vpcmpeqb %%ymm14, %%ymm14, %%ymm14\n\t"
      "vpabsb %%ymm14, %%ymm14\n\t"  // bytes of 1
      "vpcmpeqw %%ymm15, %%ymm15, %%ymm15\n\t"
      "vpabsw %%ymm15, %%ymm15\n\t"  // words of 1
      "vmovdqa %%ymm14, %%ymm12\n\t"
      "vmovdqa %%ymm14, %%ymm13\n\t"
      "1:\n\t"
      VIVACE_TRIPLE(ymm0, ymm8, ymm12) VIVACE_TRIPLE(ymm1, ymm9, ymm13) VIVACE_TRIPLE(ymm2, ymm10, ymm12)
      VIVACE_TRIPLE(ymm3, ymm11, ymm13) VIVACE_TRIPLE(ymm4, ymm8, ymm12) VIVACE_TRIPLE(ymm5, ymm9, ymm13)
      VIVACE_TRIPLE(ymm6, ymm10, ymm12) VIVACE_TRIPLE(ymm7, ymm11, ymm13)
      "dec %0\n\t"
      "jnz 1b\n\t"
      "vzeroupper"
      : "+r"(left)
      :
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
        "xmm13", "xmm14", "xmm15", "cc");
#undef VIVACE_TRIPLE
  return iterations * 8 * 32;  // 8 triples of 32 multiply-adds
}

}  // namespace

const LevelOps& Avx2Ops() {
  static const LevelOps ops{"avx2",   kLanes,    kLanes,  kStep,   1,           kStep,
                            GemmFp32, Quantize, GemmInt8, nullptr, DotFp32, Int8PeakLoop};
  return ops;
}

}  // namespace vivace::kernels

#else  // not x86: never selected (CpuSupports is false), defined so that the library links

#include "kernels/mlp_kernels.h"

namespace vivace::kernels {
const LevelOps& Avx2Ops() { return PortableOps(); }
}  // namespace vivace::kernels

#endif
