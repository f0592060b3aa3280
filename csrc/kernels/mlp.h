// A prepacked multi-layer perceptron run in one call: Linear(+bias) layers with
// identity/ReLU/GELU/sigmoid/tanh, in fp32 or int8 (per-output-channel weight scales,
// activations quantised per row, or with calibrated static ranges).
//
// Thread safety: a NativeMlp is immutable after construction; Forward may be called from
// any number of threads at once. Each call borrows a scratch slot from a pool owned by the
// model (a new slot is allocated only when more calls run concurrently than ever before;
// up to 64 are kept), so steady-state calls allocate nothing. Forward never touches
// Python: callers may (and for long batches should) release the GIL around it.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kernels/cpu_features.h"
#include "kernels/mlp_kernels.h"

namespace vivace::kernels {

enum class Activation : int { kIdentity = 0, kRelu, kGelu, kSigmoid, kTanh };
enum class Precision : int { kFp32 = 0, kInt8 };

Activation ParseActivation(const std::string& name);  // throws std::invalid_argument
const char* ActivationName(Activation activation);
Precision ParsePrecision(const std::string& name);    // "fp32" or "int8"
const char* PrecisionName(Precision precision);

struct LayerSpec {
  int in_features = 0;
  int out_features = 0;
  std::vector<float> weight;  // [out_features][in_features], row-major, fp32
  std::vector<float> bias;    // [out_features], or empty for no bias
  Activation activation = Activation::kIdentity;
  // int8 only: a calibrated range of this layer's input; values outside it saturate.
  // Ignored for layers with <= 4 outputs, which run as fp32 dot products at any precision.
  bool has_input_range = false;
  float input_min = 0.0f;
  float input_max = 0.0f;
};

class NativeMlp {
 public:
  // Validates and prepacks the layers for `level` (weights are quantised here for int8).
  // num_threads > 1 splits a batch worth splitting across that many threads (a pool owned
  // here): by rows, or for a few rows of a wide model by each layer's outputs.
  NativeMlp(const std::vector<LayerSpec>& layers, Precision precision, CpuLevel level, int num_threads = 1);
  ~NativeMlp();
  NativeMlp(const NativeMlp&) = delete;
  NativeMlp& operator=(const NativeMlp&) = delete;

  // out[rows][out_features] = mlp(x[rows][in_features]); both C-contiguous fp32.
  // NaN/±Inf in a row: fp32 follows IEEE arithmetic (as torch does); int8 makes that
  // row's outputs NaN. Other rows are never affected.
  void Forward(const float* x, int64_t rows, float* out) const;

  int in_features() const { return in_features_; }
  int out_features() const { return out_features_; }
  CpuLevel level() const { return level_; }
  Precision precision() const { return precision_; }
  int num_threads() const { return num_threads_; }
  int64_t macs_per_row() const { return macs_per_row_; }
  size_t num_layers() const;

 private:
  struct Layer;
  struct Scratch;
  class ThreadPool;

  struct Columns {
    int begin, end;  // outputs [begin, end) of a layer
  };
  struct ColumnWork;

  std::unique_ptr<Scratch> NewScratch() const;
  std::unique_ptr<Scratch> BorrowScratch() const;
  void ReturnScratch(std::unique_ptr<Scratch> scratch) const;
  // Outputs of `unit` when the layer's panels are cut into `units` ranges.
  Columns UnitColumns(const Layer& layer, int unit, int units) const;
  void QuantizeInput(const Layer& layer, const float* x, int64_t ldx, int64_t rows, Scratch& scratch) const;
  void RunLayer(const Layer& layer, const float* x, int64_t ldx, int64_t rows, float* y, int64_t ldy,
                const Columns& columns, const Scratch& scratch) const;
  // A layer whose `requantizes`: its outputs become `next`'s quantised input in the scratch.
  void RequantizeLayer(const Layer& layer, const Layer& next, int64_t rows, Scratch& scratch) const;
  // All layers for rows of x; with `shared`, only the column units this thread claims.
  void RunRows(const float* x, int64_t rows, float* out, Scratch& scratch, ColumnWork* shared) const;

  const LevelOps* ops_;
  CpuLevel level_;
  Precision precision_;
  int num_threads_;
  int in_features_ = 0;
  int out_features_ = 0;
  int64_t macs_per_row_ = 0;
  int64_t chunk_rows_ = 0;
  bool requantizes_ = false;  // some layer requantises its outputs (Scratch gets q_next)
  int64_t column_steps_ = 0;  // most layer steps of a batch split by columns (0: never split)
  int64_t act_ld_ = 0;   // leading dimension of the hidden activation buffers
  int64_t q_ld_ = 0;     // leading dimension (elements) of the quantised activations
  std::vector<Layer> layers_;
  // Scratch slots between calls, taken and put back by atomic exchange: no lock is held at a
  // fork, so a child forked while another thread was in Forward still runs. A slot that finds
  // every place taken is freed.
  static constexpr int kFreeScratchPlaces = 64;
  mutable std::array<std::atomic<Scratch*>, kFreeScratchPlaces> free_scratch_{};
  std::unique_ptr<ThreadPool> pool_;
};

// Multiply-adds per second of `level`'s int8 inner-loop instructions on one core of this
// CPU, from registers only (LevelOps::int8_peak_loop), best of five ~20 ms windows: what no
// int8 GEMM on those instructions (ours at that level, or a peer's with the same mix) can
// exceed. nullopt for a level without a probe (portable, amx).
std::optional<double> Int8PeakMacsPerSecond(CpuLevel level);

}  // namespace vivace::kernels

// C entry point for native callers (e.g. the batcher's executor thread): no Python, no GIL.
// `model` is a vivace::kernels::NativeMlp*. Returns 0.
extern "C" int vivace_native_mlp_forward(const void* model, const float* x, int64_t rows, float* out);
