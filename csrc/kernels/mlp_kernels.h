// Internal interface between the MLP driver (mlp.cpp) and the per-ISA kernel files.
// Each level's file is compiled with its own ISA flags (kernels.cmake); nothing here may
// run before the dispatcher has checked that the CPU supports the level.
#pragma once

#include <cstdint>

namespace vivace::kernels {

// Weight layouts (produced by PackFp32 / PackInt8 in mlp.cpp from the level's geometry):
//   fp32: panels of `fp32_panel` outputs: packed[(p * k + i) * P + j] = W[p * P + j][i]
//   int8: panels of `i8_panel` outputs and steps of `i8_step` inputs:
//         packed[((p * k_pad / S + s) * P + j) * S + t] = Wq[p * P + j][s * S + t]
// Outputs are padded with zero weights to a whole panel, int8 inputs to a whole step.
//
// Activations for the int8 path are quantised per row, affinely, to 0..255:
//   x ≈ row_min + row_scale * q
// so that   sum_i W[o][i] x[i] = w_scale[o] * (row_scale * sum_i Wq[o][i] q[i]) + row_min * w_sum[o]
// with w_sum[o] = w_scale[o] * sum_i Wq[o][i]. The integer sum is exact at every level.
// Weights are quantised per output channel, symmetrically, and alike at every level (so a
// model checked on one CPU computes the same on another): |Wq| <= 127 and, for each pair of
// adjacent inputs, |Wq[o][2j]| + |Wq[o][2j+1]| <= kInt8PairLimit, so that AVX2's VPMADDUBSW
// (u8 x s8 pairs summed into int16, saturating) stays exact: 255 * 128 = 32640 <= 32767.
// The pair bound costs about half a bit of weight precision.
// A row holding NaN or ±Inf gets row_scale = NaN (all its outputs become NaN) and q = 0.

constexpr int kInt8PairLimit = 128;

// A fixed (calibrated) activation range, used instead of the per-row range when set.
struct StaticRange {
  float min;
  float scale;
  float inv_scale;
};

struct Int8Epilogue {
  const float* row_scale;  // [rows]
  const float* row_min;    // [rows]
  const float* w_scale;    // [n_pad]
  const float* w_sum;      // [n_pad]
  const float* bias;       // [n_pad]
  bool relu;
  // Static input range: row_scale and row_min are its scale and min for every row but the
  // poisoned ones (NaN scale), so a level may use it for all rows and leave those rows'
  // outputs to the caller, which makes them NaN. nullptr: per-row ranges.
  const StaticRange* uniform;
};

// Where gemm_int8_requantize puts its outputs: quantised with the next layer's static range
// (the same bits `quantize` would give them) into its zero-padded q; a row with a NaN or
// ±Inf output gets row_scale[r] = NaN, as `quantize` would give it.
struct Requantize {
  const StaticRange* range;
  int k_pad;  // the next layer's
  uint8_t* q;
  int64_t ldq;
  float* row_scale;
};

struct LevelOps {
  const char* name;
  int fp32_panel;
  int i8_panel;
  int i8_step;
  int act_bytes;  // bytes per quantised activation: 1 (u8) or 2 (u16 for pmaddwd)
  int i8_k_align; // int8 inputs are padded to a multiple of this (>= i8_step)

  // y[r][o] = bias[o] + sum_i x[r][i] W[o][i], then max(0, .) when relu; o < n only.
  void (*gemm_fp32)(const float* x, int64_t ldx, int64_t rows, int k, const float* packed, int n,
                    const float* bias, bool relu, float* y, int64_t ldy);
  // Quantises rows of x[.][0..k) into q[.][0..k_pad) (zero-padded), per row or `fixed`.
  void (*quantize)(const float* x, int64_t ldx, int64_t rows, int k, int k_pad, const StaticRange* fixed,
                   void* q, int64_t ldq, float* row_scale, float* row_min);
  void (*gemm_int8)(const void* q, int64_t ldq, int64_t rows, int k_pad, const int8_t* packed, int n,
                    const Int8Epilogue& epilogue, float* y, int64_t ldy);
  // Optional (nullptr when the level has none; act_bytes 1 only): gemm_int8 for a relu or
  // identity layer with a static input range (epilogue.uniform) whose outputs go straight
  // to the next layer's static quantisation, without being stored as floats and read back.
  // The caller sets row_scale to the range's scale beforehand.
  void (*gemm_int8_requantize)(const void* q, int64_t ldq, int64_t rows, int k_pad, const int8_t* packed, int n,
                               const Int8Epilogue& epilogue, const Requantize& out);
  // Same as gemm_fp32 with W unpacked ([n][k] row-major): row-by-row dot products, for
  // layers with a few outputs, which the panel kernels would pad to a whole panel.
  void (*dot_fp32)(const float* x, int64_t ldx, int64_t rows, int k, const float* w, int n, const float* bias,
                   bool relu, float* y, int64_t ldy);
  // Optional (nullptr: no probe): runs `iterations` rounds of this level's int8 inner-loop
  // instructions on registers only, independent chains, no loads, and returns the
  // multiply-adds done. Timed, it is the bound no int8 GEMM built on these instructions can
  // pass on this core (Int8PeakMacsPerSecond in mlp.h).
  int64_t (*int8_peak_loop)(int64_t iterations);
};

// Per-row quantisation parameters; the same float arithmetic at every level, so that every
// level produces the same q for the same row.
inline void QuantParams(float lo, float hi, const StaticRange* fixed, float* min, float* scale,
                        float* inv_scale) {
  if (fixed != nullptr) {
    *min = fixed->min;
    *scale = fixed->scale;
    *inv_scale = fixed->inv_scale;
    return;
  }
  *min = lo;
  *scale = (hi - lo) / 255.0f;
  *inv_scale = hi > lo ? 255.0f / (hi - lo) : 0.0f;
}

const LevelOps& PortableOps();
const LevelOps& Avx2Ops();
const LevelOps& Avx512Ops();
const LevelOps& AmxOps();

// Requests AMX tile permission from the OS and checks the AMX kernel against the AVX-512
// one on a small case; call only on a CPU whose CPUID reports AMX-TILE and AMX-INT8.
bool AmxSelfTest();

// Shared scalar pieces (mlp_portable.cpp), used by every level for remainders so that
// quantisation rounds identically everywhere.
bool RowRange(const float* x, int k, float* lo, float* hi);  // false when non-finite
void QuantizeRowScalar(const float* x, int begin, int end, float min, float inv_scale, void* q,
                       int act_bytes);

}  // namespace vivace::kernels
