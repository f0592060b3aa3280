// Portable level: plain C++ on the unpacked row-major layout (panel 1, step 4). It is the
// reference the vector levels are tested against, and the fallback on any CPU.
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/mlp_kernels.h"

namespace vivace::kernels {

bool RowRange(const float* x, int k, float* lo, float* hi) {
  float mn = std::numeric_limits<float>::infinity();
  float mx = -mn;
  float poison = 0.0f;  // becomes NaN when any element is NaN or ±Inf
  for (int i = 0; i < k; ++i) {
    mn = x[i] < mn ? x[i] : mn;
    mx = x[i] > mx ? x[i] : mx;
    poison += x[i] * 0.0f;
  }
  if (k == 0) mn = mx = 0.0f;
  *lo = mn;
  *hi = mx;
  return poison == 0.0f;
}

void QuantizeRowScalar(const float* x, int begin, int end, float min, float inv_scale, void* q,
                       int act_bytes) {
  for (int i = begin; i < end; ++i) {
    float t = (x[i] - min) * inv_scale;
    t = t < 0.0f ? 0.0f : (t > 255.0f ? 255.0f : t);
    const auto v = static_cast<uint16_t>(std::nearbyint(t));
    if (act_bytes == 1)
      static_cast<uint8_t*>(q)[i] = static_cast<uint8_t>(v);
    else
      static_cast<uint16_t*>(q)[i] = v;
  }
}

namespace {

void GemmFp32(const float* x, int64_t ldx, int64_t rows, int k, const float* w, int n, const float* bias,
              bool relu, float* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    for (int o = 0; o < n; ++o) {
      const float* wo = w + static_cast<int64_t>(o) * k;
      float acc = 0.0f;
      for (int i = 0; i < k; ++i) acc += xr[i] * wo[i];
      float v = acc + bias[o];
      if (relu) v = v < 0.0f ? 0.0f : v;  // NaN passes through, as in torch
      y[r * ldy + o] = v;
    }
  }
}

void Quantize(const float* x, int64_t ldx, int64_t rows, int k, int k_pad, const StaticRange* fixed, void* q,
              int64_t ldq, float* row_scale, float* row_min) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    uint8_t* qr = static_cast<uint8_t*>(q) + r * ldq;
    float lo = 0.0f, hi = 0.0f, min = 0.0f, scale = 0.0f, inv = 0.0f;
    if (!RowRange(xr, k, &lo, &hi)) {
      std::memset(qr, 0, static_cast<size_t>(k_pad));
      row_scale[r] = std::numeric_limits<float>::quiet_NaN();
      row_min[r] = 0.0f;
      continue;
    }
    QuantParams(lo, hi, fixed, &min, &scale, &inv);
    QuantizeRowScalar(xr, 0, k, min, inv, qr, 1);
    std::memset(qr + k, 0, static_cast<size_t>(k_pad - k));
    row_scale[r] = scale;
    row_min[r] = min;
  }
}

void GemmInt8(const void* q, int64_t ldq, int64_t rows, int k_pad, const int8_t* w, int n, const Int8Epilogue& e,
              float* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* qr = static_cast<const uint8_t*>(q) + r * ldq;
    for (int o = 0; o < n; ++o) {
      const int8_t* wo = w + static_cast<int64_t>(o) * k_pad;
      int32_t acc = 0;
      for (int i = 0; i < k_pad; ++i) acc += static_cast<int32_t>(qr[i]) * wo[i];
      float v = static_cast<float>(acc) * (e.row_scale[r] * e.w_scale[o]) + (e.row_min[r] * e.w_sum[o] + e.bias[o]);
      if (e.relu) v = v < 0.0f ? 0.0f : v;
      y[r * ldy + o] = v;
    }
  }
}

}  // namespace

const LevelOps& PortableOps() {
  static const LevelOps ops{"portable", 1, 1, 4, 1, 4, GemmFp32, Quantize, GemmInt8, nullptr, GemmFp32, nullptr};
  return ops;
}

}  // namespace vivace::kernels
