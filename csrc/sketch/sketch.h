// Drift sketches: per-feature histogram counts (and per-bin value sums, for the
// Wasserstein estimate) over a reference profile's bin edges, updated per batch by the serving path, kept over a sliding window of sub-window
// buckets (by row count or by time); and the sorting/merging kernels behind the exact
// offline statistics (two-sample KS, Wasserstein-1).
//
// Nothing here knows about Python: the batcher's executor calls DriftSketch::Update on
// its batch buffer directly; the pybind11 face is sketch_bindings.cpp.
#pragma once

#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

namespace vivace {

// One tracked feature of a row. Numeric: bin i holds values in (edges[i-1], edges[i]]
// (the reference profile's convention), the first and last bins are open-ended (values beyond the reference range land there
// and are also counted as below/above). Categorical: the value is a category code;
// bin k counts code k, codes outside [0, num_categories) count as out of range.
struct SketchFeature {
  std::vector<double> edges;  // numeric: interior edges, strictly increasing
  int64_t num_categories = 0;  // > 0 marks a categorical feature
  double low = 0.0, high = 0.0;  // numeric: reference min/max for below/above counts
  int64_t column = 0;           // column of the row this feature reads
};

struct SketchWindow {
  enum class Kind { kRows, kTime } kind = Kind::kRows;
  int64_t bucket_span = 10000;  // rows per bucket, or nanoseconds per bucket
  int64_t buckets = 6;          // the window is the newest `buckets` buckets
};

// Counts summed over the live window. Per feature f, bins[bin_offset[f] ..
// bin_offset[f+1]) are its histogram and sums[...] the sum of the values counted in each
// numeric bin (the Wasserstein estimate needs each bin's mean); nan/below/above are per
// feature.
struct SketchSnapshot {
  std::vector<int64_t> bin_offset;
  std::vector<uint64_t> bins, nan, below, above;
  std::vector<double> sums;
  uint64_t rows = 0;
};

class DriftSketch {
 public:
  DriftSketch(std::vector<SketchFeature> features, SketchWindow window);

  // Adds `rows` rows of a row-major batch; row r starts at data + r * row_stride
  // (elements). Thread-safe: concurrent executors serialize on one mutex per sketch,
  // which costs far less than the counting. `now_ns` (steady clock) places the rows
  // of a time window; a negative value means "now".
  void Update(const float* data, int64_t rows, int64_t row_stride, int64_t now_ns = -1);
  void Update(const double* data, int64_t rows, int64_t row_stride, int64_t now_ns = -1);

  SketchSnapshot Snapshot(int64_t now_ns = -1) const;
  void Reset();

  int64_t num_features() const { return static_cast<int64_t>(features_.size()); }
  int64_t min_row_stride() const { return min_row_stride_; }
  const SketchWindow& window() const { return window_; }
  const std::vector<int64_t>& bin_offset() const { return bin_offset_; }

 private:
  struct Bucket {
    int64_t epoch = -1;  // time windows: the bucket's time slot; rows: its sequence number
    uint64_t rows = 0;
    std::vector<uint64_t> bins, nan, below, above;
    std::vector<double> sums;
  };
  template <typename T>
  void UpdateImpl(const T* data, int64_t rows, int64_t row_stride, int64_t now_ns);
  template <typename T>
  void CountRows(Bucket& bucket, const T* data, int64_t rows, int64_t row_stride) const;
  Bucket& BucketForEpoch(int64_t epoch);
  bool Live(const Bucket& b, int64_t now_ns) const;

  std::vector<SketchFeature> features_;
  SketchWindow window_;
  std::vector<int64_t> bin_offset_;
  // Numeric edges padded with +inf to a power of two per feature, for branchless search.
  std::vector<double> padded_edges_;
  std::vector<int64_t> padded_offset_, padded_size_;
  int64_t min_row_stride_ = 0;

  mutable std::mutex mu_;
  std::vector<Bucket> ring_;
  int64_t row_epoch_ = 0;  // rows windows: sequence number of the bucket being filled
  int64_t newest_epoch_ = std::numeric_limits<int64_t>::min() / 2;  // time windows
};

// Offline kernels. SortFiniteColumns writes each column's finite values (NaN and +-inf
// dropped) ascending into row f of out (out_stride elements apart), NaN-padded, and their
// count into finite[f]; columns are strided (stride in elements). out holds the doubles'
// bit patterns (uint64 slots double as radix keys, so no scratch per column). LSD radix sort on the
// order-preserving integer image of the doubles; columns are split over `threads`
// threads, the caller's included.
void SortFiniteColumns(const std::vector<const double*>& columns, const std::vector<int64_t>& sizes,
                       const std::vector<int64_t>& strides, uint64_t* out, int64_t out_stride,
                       int64_t* finite, int threads);

struct KsWasserstein {
  double ks = 0.0;           // sup |F_a - F_b|, as scipy.stats.ks_2samp
  double wasserstein = 0.0;  // integral |F_a - F_b|, as scipy.stats.wasserstein_distance
};
// Both inputs sorted ascending and non-empty; one linear merge.
KsWasserstein CompareSorted(const double* a, int64_t na, const double* b, int64_t nb);

}  // namespace vivace
