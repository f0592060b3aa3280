// AVX-512 level (F/BW/VL + VNNI): fp32 FMA micro-kernels on 16-wide output panels, int8
// u8 x s8 -> s32 with VPDPBUSD. Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <utility>

#include "kernels/mlp_kernels.h"

// GCC 12 reports its own _mm512_undefined_ps() inside _mm512_max_ps/_mm512_min_ps as
// "maybe uninitialized" (GCC bug 105593); the warning is about the header, not this code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace vivace::kernels {
namespace {

// Register blocks must be fully unrolled for the accumulators to stay in registers.
#define VIVACE_UNROLL _Pragma("GCC unroll 16")

// Accumulators are plain GCC vector types: the __m512/__m256 types are may_alias, which
// makes GCC keep an array of them in memory (a store per FMA) once the kernel also stores
// floats through y.
typedef float F32x16 __attribute__((vector_size(64)));
typedef int32_t I32x16 __attribute__((vector_size(64)));

constexpr int kLanes = 16;
constexpr int kMaxRows = 6;   // rows per register block when the batch is large
constexpr int kMaxPanels = 8; // panels per block; 8 only for <= 3 rows (24 accumulators)

__mmask16 TailMask(int remaining) {
  return remaining >= kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1u);
}

template <int R, int V>
void KernelFp32(const float* x, int64_t ldx, int k, const float* w, int64_t panel_stride, const float* bias,
                bool relu, float* y, int64_t ldy, int n_valid) {
  F32x16 acc[R * V];
  VIVACE_UNROLL
  for (int r = 0; r < R; ++r)
    VIVACE_UNROLL
    for (int v = 0; v < V; ++v) acc[r * V + v] = F32x16{};
  for (int i = 0; i < k; ++i) {
    __m512 wv[V];
    VIVACE_UNROLL
    for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_ps(w + v * panel_stride + i * kLanes);
    VIVACE_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * ldx + i]);
      VIVACE_UNROLL
      for (int v = 0; v < V; ++v) acc[r * V + v] = (F32x16)_mm512_fmadd_ps(xb, wv[v], (__m512)acc[r * V + v]);
    }
  }
  const __m512 zero = _mm512_setzero_ps();
  VIVACE_UNROLL
  for (int v = 0; v < V; ++v) {
    const int remaining = n_valid - v * kLanes;
    if (remaining <= 0) continue;
    const __m512 b = _mm512_loadu_ps(bias + v * kLanes);
    VIVACE_UNROLL
    for (int r = 0; r < R; ++r) {
      __m512 t = _mm512_add_ps((__m512)acc[r * V + v], b);
      if (relu) t = _mm512_max_ps(zero, t);  // second operand on NaN: NaN passes through
      _mm512_mask_storeu_ps(y + r * ldy + v * kLanes, TailMask(remaining), t);
    }
  }
}

// How the int8 epilogue reads its rows' ranges and where it puts the outputs.
enum class Epilogue {
  kPerRow,      // each row's own scale and min; floats to y
  kUniform,     // Int8Epilogue::uniform for every row; floats to y
  kRequantize,  // uniform; quantised for the next layer (Requantize) instead of stored in y
};

template <int R, int V, Epilogue kMode>
void KernelInt8(const uint8_t* q, int64_t ldq, int steps, const int8_t* w, int64_t panel_stride,
                const Int8Epilogue& e, int64_t row0, int out0, float* y, int64_t ldy, int n_valid,
                const Requantize* rq) {
  constexpr bool kUniform = kMode != Epilogue::kPerRow;
  constexpr bool kRequantize = kMode == Epilogue::kRequantize;
  I32x16 acc[R * V];
  VIVACE_UNROLL
  for (int r = 0; r < R; ++r)
    VIVACE_UNROLL
    for (int v = 0; v < V; ++v) acc[r * V + v] = I32x16{};
  for (int s = 0; s < steps; ++s) {
    __m512i wv[V];
    VIVACE_UNROLL
    for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_si512(w + v * panel_stride + s * 4 * kLanes);
    VIVACE_UNROLL
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, q + r * ldq + s * 4, sizeof four);
      const __m512i xb = _mm512_set1_epi32(four);
      VIVACE_UNROLL
      for (int v = 0; v < V; ++v) acc[r * V + v] = (I32x16)_mm512_dpbusd_epi32((__m512i)acc[r * V + v], xb, wv[v]);
    }
  }
  const __m512 zero = _mm512_setzero_ps();
  const bool relu = e.relu;
  // Uniform: every row's scale and min are the static range's, so scale and offset are
  // computed once per panel instead of once per row and panel.
  const float uniform_scale = kUniform ? e.uniform->scale : 0.0f;
  const float uniform_min = kUniform ? e.uniform->min : 0.0f;
  if constexpr (kRequantize) {
    const __m512 top = _mm512_set1_ps(255.0f);
    const __m512 largest = _mm512_set1_ps(std::numeric_limits<float>::max());
    const __m512 next_min = _mm512_set1_ps(rq->range->min);
    const __m512 next_inv = _mm512_set1_ps(rq->range->inv_scale);
    uint8_t* q_out = rq->q + row0 * rq->ldq;
    __mmask16 poisoned[R] = {};  // lanes of row r whose output is NaN or ±Inf
    // After a relu only NaN and +Inf are possible: one compare finds both.
    const auto non_finite = [&](__mmask16 lanes, __m512 t) {
      return relu ? _mm512_mask_cmp_ps_mask(lanes, t, largest, _CMP_NLE_UQ)
                  : _mm512_mask_cmp_ps_mask(lanes, _mm512_mul_ps(t, zero), zero, _CMP_NEQ_UQ);
    };
    __m512 scale[V], offset[V];
    VIVACE_UNROLL
    for (int v = 0; v < V; ++v) {
      const int o = out0 + v * kLanes;
      scale[v] = _mm512_mul_ps(_mm512_set1_ps(uniform_scale), _mm512_loadu_ps(e.w_scale + o));
      offset[v] = _mm512_fmadd_ps(_mm512_set1_ps(uniform_min), _mm512_loadu_ps(e.w_sum + o), _mm512_loadu_ps(e.bias + o));
    }
    // The bytes are computed as Quantize computes them (its 64-wide loop for a whole block
    // of 4 panels, else its 16-wide one), so that they are the same bits. The two differ only
    // for a NaN step, (t - min) * inv with inv = 0 and t - min = ±Inf, which needs a
    // zero-width range (the layer's scale is then 0: the byte does not count); wider ranges
    // whose inv or width overflow are refused by NativeMlp.
    if (V == 4 && n_valid == 4 * kLanes) {
      const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
      VIVACE_UNROLL
      for (int r = 0; r < R; ++r) {
        __m512i c[4];
        VIVACE_UNROLL
        for (int v = 0; v < 4; ++v) {
          __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps((__m512i)acc[r * V + v]), scale[v], offset[v]);
          if (relu) t = _mm512_max_ps(zero, t);
          poisoned[r] |= non_finite(0xFFFF, t);
          c[v] = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_mul_ps(_mm512_sub_ps(t, next_min), next_inv), top));
        }
        const __m512i bytes = _mm512_packus_epi16(_mm512_packus_epi32(c[0], c[1]), _mm512_packus_epi32(c[2], c[3]));
        _mm512_storeu_si512(q_out + r * rq->ldq + out0, _mm512_permutexvar_epi32(order, bytes));
      }
    } else {
      VIVACE_UNROLL
      for (int v = 0; v < V; ++v) {
        const int o = out0 + v * kLanes;
        if (n_valid - v * kLanes <= 0) continue;
        const __mmask16 valid = TailMask(n_valid - v * kLanes);
        const __mmask16 stored = TailMask(rq->k_pad - o);  // lanes past the outputs: zeros up to k_pad
        VIVACE_UNROLL
        for (int r = 0; r < R; ++r) {
          __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps((__m512i)acc[r * V + v]), scale[v], offset[v]);
          if (relu) t = _mm512_max_ps(zero, t);
          poisoned[r] |= non_finite(valid, t);
          const __m512 u = _mm512_mul_ps(_mm512_sub_ps(t, next_min), next_inv);
          const __m512i c = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(u, zero), top));
          _mm_mask_storeu_epi8(q_out + r * rq->ldq + o, stored, _mm512_maskz_cvtepi32_epi8(valid, c));
        }
      }
    }
    for (int r = 0; r < R; ++r)
      if (poisoned[r] != 0) rq->row_scale[row0 + r] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  VIVACE_UNROLL
  for (int v = 0; v < V; ++v) {
    const int remaining = n_valid - v * kLanes;
    if (remaining <= 0) continue;
    const int o = out0 + v * kLanes;
    const __m512 ws = _mm512_loadu_ps(e.w_scale + o);
    const __m512 wsum = _mm512_loadu_ps(e.w_sum + o);
    const __m512 b = _mm512_loadu_ps(e.bias + o);
    VIVACE_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(kUniform ? uniform_scale : e.row_scale[row0 + r]), ws);
      const __m512 offset = _mm512_fmadd_ps(_mm512_set1_ps(kUniform ? uniform_min : e.row_min[row0 + r]), wsum, b);
      __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps((__m512i)acc[r * V + v]), scale, offset);
      if (relu) t = _mm512_max_ps(zero, t);
      _mm512_mask_storeu_ps(y + r * ldy + v * kLanes, TailMask(remaining), t);
    }
  }
}

using Fp32Fn = decltype(&KernelFp32<1, 1>);
using Int8Fn = decltype(&KernelInt8<1, 1, Epilogue::kPerRow>);

template <int... I>
constexpr std::array<Fp32Fn, sizeof...(I)> Fp32Table(std::integer_sequence<int, I...>) {
  return {&KernelFp32<I / kMaxPanels + 1, I % kMaxPanels + 1>...};
}
template <Epilogue kMode, int... I>
constexpr std::array<Int8Fn, sizeof...(I)> Int8Table(std::integer_sequence<int, I...>) {
  return {&KernelInt8<I / kMaxPanels + 1, I % kMaxPanels + 1, kMode>...};
}
constexpr auto kFp32 = Fp32Table(std::make_integer_sequence<int, kMaxRows * kMaxPanels>{});
constexpr auto kInt8 = Int8Table<Epilogue::kPerRow>(std::make_integer_sequence<int, kMaxRows * kMaxPanels>{});
constexpr auto kInt8Uniform = Int8Table<Epilogue::kUniform>(std::make_integer_sequence<int, kMaxRows * kMaxPanels>{});
constexpr auto kInt8Requantize =
    Int8Table<Epilogue::kRequantize>(std::make_integer_sequence<int, kMaxRows * kMaxPanels>{});

// Few rows: wide blocks keep enough independent accumulators to hide the FMA latency.
int PanelsPerBlock(int64_t rows) { return rows <= 3 ? kMaxPanels : 4; }

void GemmFp32(const float* x, int64_t ldx, int64_t rows, int k, const float* packed, int n, const float* bias,
              bool relu, float* y, int64_t ldy) {
  const int panels = (n + kLanes - 1) / kLanes;
  const int64_t stride = static_cast<int64_t>(k) * kLanes;
  const int block = PanelsPerBlock(rows);
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

void RunInt8(const std::array<Int8Fn, kMaxRows * kMaxPanels>& kernels, const void* q, int64_t ldq, int64_t rows,
             int k_pad, const int8_t* packed, int n, const Int8Epilogue& e, float* y, int64_t ldy,
             const Requantize* rq) {
  const auto* qa = static_cast<const uint8_t*>(q);
  const int panels = (n + kLanes - 1) / kLanes;
  const int64_t stride = static_cast<int64_t>(k_pad) * kLanes;
  const int block = PanelsPerBlock(rows);
  for (int p0 = 0; p0 < panels; p0 += block) {
    const int v = std::min(block, panels - p0);
    const int n_valid = std::min(n - p0 * kLanes, v * kLanes);
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
      const auto r = static_cast<int>(std::min<int64_t>(kMaxRows, rows - r0));
      kernels[(r - 1) * kMaxPanels + (v - 1)](qa + r0 * ldq, ldq, k_pad / 4, packed + p0 * stride, stride, e, r0,
                                              p0 * kLanes, y == nullptr ? nullptr : y + r0 * ldy + p0 * kLanes, ldy,
                                              n_valid, rq);
    }
  }
}

void GemmInt8(const void* q, int64_t ldq, int64_t rows, int k_pad, const int8_t* packed, int n,
              const Int8Epilogue& e, float* y, int64_t ldy) {
  RunInt8(e.uniform != nullptr ? kInt8Uniform : kInt8, q, ldq, rows, k_pad, packed, n, e, y, ldy, nullptr);
}

void GemmInt8Requantize(const void* q, int64_t ldq, int64_t rows, int k_pad, const int8_t* packed, int n,
                        const Int8Epilogue& e, const Requantize& out) {
  RunInt8(kInt8Requantize, q, ldq, rows, k_pad, packed, n, e, nullptr, 0, &out);
}

void Quantize(const float* x, int64_t ldx, int64_t rows, int k, int k_pad, const StaticRange* fixed, void* q,
              int64_t ldq, float* row_scale, float* row_min) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512 top = _mm512_set1_ps(255.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    uint8_t* qr = static_cast<uint8_t*>(q) + r * ldq;
    __m512 lo = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    __m512 hi = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __m512 poison = zero;  // NaN when any element is NaN or ±Inf
    int tail = 0;
    for (; tail + kLanes <= k; tail += kLanes) {
      const __m512 v = _mm512_loadu_ps(xr + tail);
      lo = _mm512_min_ps(lo, v);
      hi = _mm512_max_ps(hi, v);
      poison = _mm512_fmadd_ps(v, zero, poison);
    }
    if (tail < k) {
      const __mmask16 m = TailMask(k - tail);
      const __m512 v = _mm512_maskz_loadu_ps(m, xr + tail);
      lo = _mm512_mask_min_ps(lo, m, lo, v);
      hi = _mm512_mask_max_ps(hi, m, hi, v);
      poison = _mm512_fmadd_ps(v, zero, poison);
    }
    if (_mm512_cmp_ps_mask(poison, zero, _CMP_NEQ_UQ) != 0) {
      std::memset(qr, 0, static_cast<size_t>(k_pad));
      row_scale[r] = std::numeric_limits<float>::quiet_NaN();
      row_min[r] = 0.0f;
      continue;
    }
    float min = 0.0f, scale = 0.0f, inv = 0.0f;
    QuantParams(_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi), fixed, &min, &scale, &inv);
    const __m512 vmin = _mm512_set1_ps(min);
    const __m512 vinv = _mm512_set1_ps(inv);
    int i = 0;
    // 64 at a time: the unsigned saturating packs clamp below 0 (and NaN-free values above
    // 255 were clamped in float, so that huge ones do not wrap to INT_MIN).
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (; i + 4 * kLanes <= k; i += 4 * kLanes) {
      __m512i v[4];
      for (int j = 0; j < 4; ++j) {
        const __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xr + i + j * kLanes), vmin), vinv);
        v[j] = _mm512_cvtps_epi32(_mm512_min_ps(t, top));
      }
      const __m512i bytes = _mm512_packus_epi16(_mm512_packus_epi32(v[0], v[1]), _mm512_packus_epi32(v[2], v[3]));
      _mm512_storeu_si512(qr + i, _mm512_permutexvar_epi32(order, bytes));
    }
    for (; i + kLanes <= k; i += kLanes) {
      __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xr + i), vmin), vinv);
      t = _mm512_min_ps(_mm512_max_ps(t, zero), top);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(t)));
    }
    if (i < k) QuantizeRowScalar(xr, i, k, min, inv, qr, 1);
    if (k < k_pad) std::memset(qr + k, 0, static_cast<size_t>(k_pad - k));
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
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;  // independent chains
      int i = 0;
      for (; i + 4 * kLanes <= k; i += 4 * kLanes) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + i), _mm512_loadu_ps(wo + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + i + 16), _mm512_loadu_ps(wo + i + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + i + 32), _mm512_loadu_ps(wo + i + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + i + 48), _mm512_loadu_ps(wo + i + 48), a3);
      }
      for (; i < k; i += kLanes) {
        const __mmask16 m = TailMask(k - i);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xr + i), _mm512_maskz_loadu_ps(m, wo + i), a0);
      }
      float v = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) + bias[o];
      if (relu) v = v < 0.0f ? 0.0f : v;
      y[r * ldy + o] = v;
    }
  }
}

// In assembly: from intrinsics, GCC folds the repeated products of constant operands.
// Twelve accumulators: VPDPBUSD's latency (4-5 cycles) times up to two per cycle.
int64_t Int8PeakLoop(int64_t iterations) {
#define VIVACE_DOT(acc, w) "vpdpbusd %%zmm14, %%" #w ", %%" #acc "\n\t"
  int64_t left = iterations;
  __asm__ volatile(
      "vpternlogd $0xff, %%zmm14, %%zmm14, %%zmm14\n\t"
      "vpabsb %%zmm14, %%zmm14\n\t"  // bytes of 1
      "vmovdqa64 %%zmm14, %%zmm12\n\t"
      "vmovdqa64 %%zmm14, %%zmm13\n\t"
      "1:\n\t"
      VIVACE_DOT(zmm0, zmm12) VIVACE_DOT(zmm1, zmm13) VIVACE_DOT(zmm2, zmm12) VIVACE_DOT(zmm3, zmm13)
      VIVACE_DOT(zmm4, zmm12) VIVACE_DOT(zmm5, zmm13) VIVACE_DOT(zmm6, zmm12) VIVACE_DOT(zmm7, zmm13)
      VIVACE_DOT(zmm8, zmm12) VIVACE_DOT(zmm9, zmm13) VIVACE_DOT(zmm10, zmm12) VIVACE_DOT(zmm11, zmm13)
      "dec %0\n\t"
      "jnz 1b\n\t"
      "vzeroupper"
      : "+r"(left)
      :
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
        "xmm13", "xmm14", "xmm15", "cc");  // xmm15: vzeroupper clears its upper half
#undef VIVACE_DOT
  return iterations * 12 * 64;  // 12 VPDPBUSD of 64 multiply-adds
}

}  // namespace

const LevelOps& Avx512Ops() {
  static const LevelOps ops{"avx512", kLanes, kLanes, 4, 1, 4, GemmFp32, Quantize, GemmInt8, GemmInt8Requantize,
                            DotFp32,  Int8PeakLoop};
  return ops;
}

}  // namespace vivace::kernels

#else  // not x86: never selected (CpuSupports is false), defined so that the library links

#include "kernels/mlp_kernels.h"

namespace vivace::kernels {
const LevelOps& Avx512Ops() { return PortableOps(); }
}  // namespace vivace::kernels

#endif
