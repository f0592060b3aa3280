// libFuzzer harness for the drift sketch update (csrc/sketch/sketch.cpp): the serving path
// counts every batch's rows, i.e. client-chosen numbers (NaN, infinities, huge or
// fractional category codes), into histograms built from a reference profile. Besides
// sanitizer reports, the harness aborts when the counts break their invariant: every row
// of the window lands in exactly one bin or in the NaN count (numeric features), or in one
// bin, the NaN count or the unknown-code count (categorical features).
//
// Input layout: byte 0 the window (bit 0: time window; bits 1-3: buckets - 1; bits 4-7:
// bucket span - 1), byte 1 the features (bits 0-1: count - 1; bit 2: float64 rows;
// bits 3-7: edges / categories per feature), then the rows' bytes; a time window takes
// a little-endian int64 timestamp from the front of each chunk of rows.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "sketch/sketch.h"

namespace {

template <typename T>
void UpdateAll(vivace::DriftSketch& sketch, const uint8_t* data, size_t size, int64_t columns, bool time_window) {
  while (size > 0) {
    int64_t now_ns = 0;
    if (time_window && size >= 8) {
      std::memcpy(&now_ns, data, 8);
      data += 8;
      size -= 8;
    }
    const size_t chunk = size < 256 ? size : 256;
    const int64_t rows = static_cast<int64_t>(chunk / (sizeof(T) * static_cast<size_t>(columns)));
    if (rows == 0) return;
    std::vector<T> batch(static_cast<size_t>(rows * columns));  // aligned copy of the bytes
    std::memcpy(batch.data(), data, batch.size() * sizeof(T));
    // Negative stamps mean "now" (the clock); the fuzzer's stamps stay non-negative.
    sketch.Update(batch.data(), rows, columns, now_ns & INT64_MAX);
    data += chunk;
    size -= chunk;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  vivace::SketchWindow window;
  window.kind = (data[0] & 1) ? vivace::SketchWindow::Kind::kTime : vivace::SketchWindow::Kind::kRows;
  window.buckets = 1 + ((data[0] >> 1) & 7);
  window.bucket_span = 1 + (data[0] >> 4);
  const int64_t n_features = 1 + (data[1] & 3);
  const bool doubles = data[1] & 4;
  const int64_t per_feature = data[1] >> 3;
  std::vector<vivace::SketchFeature> features(static_cast<size_t>(n_features));
  for (int64_t f = 0; f < n_features; ++f) {
    auto& feat = features[static_cast<size_t>(f)];
    feat.column = n_features - 1 - f;
    if (f % 2 == 1 && per_feature > 0) {
      feat.num_categories = per_feature;
    } else {
      for (int64_t i = 0; i < per_feature; ++i) feat.edges.push_back(static_cast<double>(i) - per_feature / 2.0);
      feat.low = -1.0;
      feat.high = 1.0;
    }
  }
  vivace::DriftSketch sketch(std::move(features), window);
  if (doubles)
    UpdateAll<double>(sketch, data + 2, size - 2, n_features, window.kind == vivace::SketchWindow::Kind::kTime);
  else
    UpdateAll<float>(sketch, data + 2, size - 2, n_features, window.kind == vivace::SketchWindow::Kind::kTime);

  // Rows windows are read as of their newest rows; time windows as of the latest stamp
  // would need the clock, so only their totals' consistency is checked.
  const vivace::SketchSnapshot snap = sketch.Snapshot(INT64_MAX / 2);
  for (int64_t f = 0; f < n_features; ++f) {
    uint64_t counted = snap.nan[static_cast<size_t>(f)];
    for (int64_t b = snap.bin_offset[static_cast<size_t>(f)]; b < snap.bin_offset[static_cast<size_t>(f) + 1]; ++b)
      counted += snap.bins[static_cast<size_t>(b)];
    if (f % 2 == 1 && per_feature > 0) counted += snap.above[static_cast<size_t>(f)];
    if (counted != snap.rows) abort();
  }
  return 0;
}
