// AMX level: int8 layers on AMX tiles (TDPBUSD, u8 x s8 -> s32, 16x64 by 64x16 per
// instruction); fp32 layers, quantisation and dot products reuse the AVX-512 level.
// The weight layout is the AVX-512 one (16-output panels, 4-input steps) with inputs
// padded to 64, so that 16 consecutive steps of a panel are one 16x64-byte B tile.
// Compiled with -mamx-tile -mamx-int8 plus the AVX-512 flags.
//
// This machine family was not available when the kernel was written: AmxSelfTest()
// runs it against the AVX-512 kernel once per process, and the level is offered only
// when both agree exactly (see cpu_features.cpp).
#if defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/mlp_kernels.h"

// GCC 12 reports its own _mm512_undefined_ps() inside _mm512_max_ps/_mm512_cvtepi32_ps as
// "maybe uninitialized" (GCC bug 105593); the warning is about the header, not this code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace vivace::kernels {
namespace {

constexpr int kLanes = 16;      // outputs per panel = int32 columns of a C tile
constexpr int kTileRows = 16;   // rows of A and C tiles
constexpr int kTileBytes = 64;  // bytes per tile row: 64 inputs of A, 16 outputs x 4 inputs of B
constexpr int kPanelsPerBlock = 4;

// Tiles: 0..3 accumulators (one per panel), 4 = activations (A), 5 = weights (B).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

TileConfig ConfigFor(int rows) {
  TileConfig c;
  for (int t = 0; t < 4; ++t) {
    c.colsb[t] = kLanes * 4;
    c.rows[t] = static_cast<uint8_t>(rows);
  }
  c.colsb[4] = kTileBytes;
  c.rows[4] = static_cast<uint8_t>(rows);
  c.colsb[5] = kTileBytes;
  c.rows[5] = kTileBytes / 4;
  return c;
}

__mmask16 TailMask(int remaining) {
  return remaining >= kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1u);
}

// One block: `rows` (<= 16) rows x `panels` (<= 4) panels, all 64-input blocks of K.
void Block(const uint8_t* q, int64_t ldq, int rows, int k_blocks, const int8_t* w, int64_t panel_stride, int panels,
           const Int8Epilogue& e, int64_t row0, int out0, float* y, int64_t ldy, int n_valid) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int kb = 0; kb < k_blocks; ++kb) {
    _tile_loadd(4, q + kb * kTileBytes, ldq);
    const int8_t* b = w + kb * kTileRows * kTileBytes;
    _tile_loadd(5, b, kTileBytes);
    _tile_dpbusd(0, 4, 5);
    if (panels > 1) {
      _tile_loadd(5, b + panel_stride, kTileBytes);
      _tile_dpbusd(1, 4, 5);
    }
    if (panels > 2) {
      _tile_loadd(5, b + 2 * panel_stride, kTileBytes);
      _tile_dpbusd(2, 4, 5);
    }
    if (panels > 3) {
      _tile_loadd(5, b + 3 * panel_stride, kTileBytes);
      _tile_dpbusd(3, 4, 5);
    }
  }
  alignas(64) int32_t sums[kPanelsPerBlock][kTileRows][kLanes];
  _tile_stored(0, sums[0], kLanes * 4);
  _tile_stored(1, sums[1], kLanes * 4);
  _tile_stored(2, sums[2], kLanes * 4);
  _tile_stored(3, sums[3], kLanes * 4);
  const __m512 zero = _mm512_setzero_ps();
  for (int p = 0; p < panels; ++p) {
    const int remaining = n_valid - p * kLanes;
    if (remaining <= 0) break;
    const int o = out0 + p * kLanes;
    const __m512 ws = _mm512_loadu_ps(e.w_scale + o);
    const __m512 wsum = _mm512_loadu_ps(e.w_sum + o);
    const __m512 bias = _mm512_loadu_ps(e.bias + o);
    for (int r = 0; r < rows; ++r) {
      const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(e.row_scale[row0 + r]), ws);
      const __m512 offset = _mm512_fmadd_ps(_mm512_set1_ps(e.row_min[row0 + r]), wsum, bias);
      __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums[p][r])), scale, offset);
      if (e.relu) t = _mm512_max_ps(zero, t);
      _mm512_mask_storeu_ps(y + r * ldy + p * kLanes, TailMask(remaining), t);
    }
  }
}

void GemmInt8(const void* q, int64_t ldq, int64_t rows, int k_pad, const int8_t* packed, int n, const Int8Epilogue& e,
              float* y, int64_t ldy) {
  const auto* qa = static_cast<const uint8_t*>(q);
  const int panels = (n + kLanes - 1) / kLanes;
  const int64_t stride = static_cast<int64_t>(k_pad) * kLanes;
  const int k_blocks = k_pad / kTileBytes;
  const int64_t full = rows / kTileRows * kTileRows;
  for (int pass = 0; pass < 2; ++pass) {  // full 16-row blocks, then the remaining rows
    const int64_t begin = pass == 0 ? 0 : full;
    const int64_t end = pass == 0 ? full : rows;
    if (begin == end) continue;
    const TileConfig config = ConfigFor(static_cast<int>(std::min<int64_t>(kTileRows, end - begin)));
    _tile_loadconfig(&config);
    for (int p0 = 0; p0 < panels; p0 += kPanelsPerBlock) {
      const int v = std::min(kPanelsPerBlock, panels - p0);
      const int n_valid = std::min(n - p0 * kLanes, v * kLanes);
      for (int64_t r0 = begin; r0 < end; r0 += kTileRows) {
        Block(qa + r0 * ldq, ldq, static_cast<int>(std::min<int64_t>(kTileRows, end - r0)), k_blocks,
              packed + p0 * stride, stride, v, e, r0, p0 * kLanes, y + r0 * ldy + p0 * kLanes, ldy, n_valid);
      }
    }
  }
  _tile_release();
}

}  // namespace

const LevelOps& AmxOps() {
  static const LevelOps ops = [] {
    LevelOps o = Avx512Ops();
    o.name = "amx";
    o.i8_k_align = kTileBytes;
    o.gemm_int8 = GemmInt8;
    o.gemm_int8_requantize = nullptr;  // the AVX-512 one runs VNNI, not tiles
    o.int8_peak_loop = nullptr;        // likewise (no tile probe)
    return o;
  }();
  return ops;
}

bool AmxSelfTest() {
  // Linux keeps AMX tile data disabled until the process asks for it (XFEATURE_XTILEDATA).
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  // 37 rows (two full tiles and a tail), 200 inputs (padded to 256), 70 outputs (5 panels).
  constexpr int kRows = 37, kIn = 200, kPad = 256, kOut = 70, kOutPad = 80;
  std::mt19937 rng(7);
  std::vector<uint8_t> q(static_cast<size_t>(kRows) * kPad, 0);
  std::vector<int8_t> w(static_cast<size_t>(kOutPad) * kPad, 0);
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < kIn; ++i) q[static_cast<size_t>(r * kPad + i)] = static_cast<uint8_t>(rng() & 0xFF);
  for (int o = 0; o < kOut; ++o)
    for (int i = 0; i < kIn; ++i) {
      const int8_t v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
      w[static_cast<size_t>((((o / kLanes) * (kPad / 4) + i / 4) * kLanes + o % kLanes) * 4 + i % 4)] = v;
    }
  std::vector<float> row_scale(kRows), row_min(kRows), ones(kOutPad, 1.0f), zeros(kOutPad, 0.0f);
  for (int r = 0; r < kRows; ++r) {
    row_scale[static_cast<size_t>(r)] = 1.0f;
    row_min[static_cast<size_t>(r)] = 0.0f;
  }
  const Int8Epilogue e{row_scale.data(), row_min.data(), ones.data(), zeros.data(), zeros.data(), false, nullptr};
  std::vector<float> expected(static_cast<size_t>(kRows) * kOut), got(expected.size());
  Avx512Ops().gemm_int8(q.data(), kPad, kRows, kPad, w.data(), kOut, e, expected.data(), kOut);
  GemmInt8(q.data(), kPad, kRows, kPad, w.data(), kOut, e, got.data(), kOut);
  return std::memcmp(expected.data(), got.data(), expected.size() * sizeof(float)) == 0;
}

}  // namespace vivace::kernels

#else  // not x86-64 Linux: no AMX level

#include "kernels/mlp_kernels.h"

namespace vivace::kernels {
const LevelOps& AmxOps() { return Avx512Ops(); }
bool AmxSelfTest() { return false; }
}  // namespace vivace::kernels

#endif
