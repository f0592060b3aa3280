// Per-batch work wired into a Batcher in C++, so no Python runs per batch for it: the
// native kernel that is the model, the feature lookup that serves by entity id (before
// the model), and the drift sketches (after it). The Python bindings only unwrap their
// arguments and call these; the checks that need only the batcher's layout live here.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "batcher/batcher.h"

namespace vivace {

class DriftSketch;
namespace featcache {
class FeatureLookup;
}

// A native kernel's C entry point: forward(model, input rows, rows, output rows) returns
// 0 on success. It reads the batcher's first input buffer and writes its first output.
struct NativeForward {
  using Fn = int (*)(const void* model, const float* input, int64_t rows, float* output);
  const void* model = nullptr;
  Fn fn = nullptr;

  explicit operator bool() const { return fn != nullptr; }
  // Runs one batch; throws std::runtime_error when the kernel reports a failure.
  void Run(Batcher& batcher, int executor, int64_t rows) const;
};

// Serving by entity id: before each batch, the INT64 keys in the first input are looked up
// into feature_rows[executor] (float32 [max_batch_size, lookup.num_features()], what the
// model reads) and the found flags written into the last output (BOOL [-1, 1]). Throws
// std::invalid_argument when the batcher's layout does not fit.
void AttachFeatureLookup(Batcher& batcher, std::shared_ptr<featcache::FeatureLookup> lookup,
                         std::vector<float*> feature_rows);

// After each batch, count its model inputs into `inputs` and its first output into
// `outputs` (either may be null). The inputs are feature_rows[executor] when serving by
// entity id (row width `input_stride`), else the first input buffer. Throws
// std::invalid_argument when a sketch would read past a row.
void AttachDriftSketches(Batcher& batcher, std::shared_ptr<DriftSketch> inputs,
                         std::shared_ptr<DriftSketch> outputs, std::vector<float*> feature_rows,
                         int64_t input_stride);

}  // namespace vivace
