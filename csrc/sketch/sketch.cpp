#include "sketch/sketch.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>

namespace vivace {
namespace {

int64_t SteadyNowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int64_t FloorDiv(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// Order-preserving map of a double onto uint64: negative values have every bit flipped,
// the others only the sign bit; unsigned order of keys is then numeric order.
constexpr uint64_t kSignBit = uint64_t{1} << 63;

inline uint64_t SortKey(double v) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u & kSignBit) ? ~u : (u | kSignBit);
}

inline double FromSortKey(uint64_t k) {
  const uint64_t u = (k & kSignBit) ? (k & ~kSignBit) : ~k;
  double v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

}  // namespace

DriftSketch::DriftSketch(std::vector<SketchFeature> features, SketchWindow window)
    : features_(std::move(features)), window_(window) {
  if (features_.empty()) throw std::invalid_argument("a drift sketch needs at least one feature");
  if (window_.bucket_span <= 0 || window_.buckets <= 0)
    throw std::invalid_argument("sketch window: bucket_span and buckets must be positive");
  bin_offset_.push_back(0);
  padded_offset_.reserve(features_.size());
  for (size_t f = 0; f < features_.size(); ++f) {
    const SketchFeature& feat = features_[f];
    if (feat.column < 0) throw std::invalid_argument("sketch feature " + std::to_string(f) + ": negative column");
    min_row_stride_ = std::max(min_row_stride_, feat.column + 1);
    int64_t bins = 0;
    if (feat.num_categories > 0) {
      if (!feat.edges.empty())
        throw std::invalid_argument("sketch feature " + std::to_string(f) + ": categorical with bin edges");
      bins = feat.num_categories;
    } else {
      for (size_t i = 0; i < feat.edges.size(); ++i) {
        if (!std::isfinite(feat.edges[i]) || (i > 0 && !(feat.edges[i] > feat.edges[i - 1])))
          throw std::invalid_argument("sketch feature " + std::to_string(f) +
                                      ": bin edges must be finite and strictly increasing");
      }
      bins = static_cast<int64_t>(feat.edges.size()) + 1;
    }
    bin_offset_.push_back(bin_offset_.back() + bins);
    // Pad to a power of two >= edges + 1 with +inf, which no value reaches.
    int64_t size = 1;
    while (size < static_cast<int64_t>(feat.edges.size()) + 1) size *= 2;
    padded_offset_.push_back(static_cast<int64_t>(padded_edges_.size()));
    padded_size_.push_back(size);
    padded_edges_.insert(padded_edges_.end(), feat.edges.begin(), feat.edges.end());
    padded_edges_.resize(padded_edges_.size() + static_cast<size_t>(size) - feat.edges.size(),
                         std::numeric_limits<double>::infinity());
  }
  ring_.resize(static_cast<size_t>(window_.buckets));
  for (Bucket& b : ring_) {
    b.bins.assign(static_cast<size_t>(bin_offset_.back()), 0);
    b.sums.assign(static_cast<size_t>(bin_offset_.back()), 0.0);
    b.nan.assign(features_.size(), 0);
    b.below.assign(features_.size(), 0);
    b.above.assign(features_.size(), 0);
  }
}

DriftSketch::Bucket& DriftSketch::BucketForEpoch(int64_t epoch) {
  Bucket& b = ring_[static_cast<size_t>(epoch % window_.buckets)];
  if (b.epoch != epoch) {
    b.epoch = epoch;
    b.rows = 0;
    std::fill(b.bins.begin(), b.bins.end(), 0);
    std::fill(b.sums.begin(), b.sums.end(), 0.0);
    std::fill(b.nan.begin(), b.nan.end(), 0);
    std::fill(b.below.begin(), b.below.end(), 0);
    std::fill(b.above.begin(), b.above.end(), 0);
  }
  return b;
}

template <typename T>
void DriftSketch::CountRows(Bucket& bucket, const T* data, int64_t rows, int64_t row_stride) const {
  // Feature-major: each feature's edges stay in registers/L1 while its column is read.
  for (size_t f = 0; f < features_.size(); ++f) {
    const SketchFeature& feat = features_[f];
    const T* col = data + feat.column;
    uint64_t* bins = bucket.bins.data() + bin_offset_[f];
    double* sums = bucket.sums.data() + bin_offset_[f];
    uint64_t nan = 0, below = 0, above = 0;
    if (feat.num_categories > 0) {
      const double k = static_cast<double>(feat.num_categories);
      for (int64_t r = 0; r < rows; ++r) {
        const double v = static_cast<double>(col[r * row_stride]);
        if (v != v) {
          ++nan;
        } else if (v >= 0.0 && v < k && v == std::floor(v)) {
          ++bins[static_cast<int64_t>(v)];
        } else {
          ++above;  // unknown category code
        }
      }
    } else {
      const double* edges = padded_edges_.data() + padded_offset_[f];
      const int64_t top = padded_size_[f] >> 1;
      const double low = feat.low, high = feat.high;
      for (int64_t r = 0; r < rows; ++r) {
        const double v = static_cast<double>(col[r * row_stride]);
        if (v != v) {
          ++nan;
          continue;
        }
        int64_t pos = 0;  // number of edges < v, branch-free: bins are (e[i-1], e[i]]
        for (int64_t step = top; step > 0; step >>= 1) pos += (edges[pos + step - 1] < v) ? step : 0;
        ++bins[pos];
        sums[pos] += v;
        below += v < low;
        above += v > high;
      }
    }
    bucket.nan[f] += nan;
    bucket.below[f] += below;
    bucket.above[f] += above;
  }
  bucket.rows += static_cast<uint64_t>(rows);
}

template <typename T>
void DriftSketch::UpdateImpl(const T* data, int64_t rows, int64_t row_stride, int64_t now_ns) {
  if (rows <= 0) return;
  if (row_stride < min_row_stride_)
    throw std::invalid_argument("sketch update: rows have " + std::to_string(row_stride) +
                                " columns, the sketch reads column " + std::to_string(min_row_stride_ - 1));
  std::lock_guard<std::mutex> lock(mu_);
  if (window_.kind == SketchWindow::Kind::kTime) {
    if (now_ns < 0) now_ns = SteadyNowNs();
    const int64_t epoch = FloorDiv(now_ns, window_.bucket_span);
    // Rows stamped before the window of the newest rows seen are dropped; counting them
    // would reset a ring slot that holds newer rows.
    if (epoch <= newest_epoch_ - window_.buckets) return;
    newest_epoch_ = std::max(newest_epoch_, epoch);
    CountRows(BucketForEpoch(epoch), data, rows, row_stride);
    return;
  }
  // Row windows: fill the current bucket up to bucket_span rows; the next one opens only
  // when a row arrives for it, so the newest bucket is never empty and the window holds
  // between (buckets - 1) * bucket_span + 1 and buckets * bucket_span rows.
  while (rows > 0) {
    Bucket* b = &BucketForEpoch(row_epoch_);
    if (static_cast<int64_t>(b->rows) >= window_.bucket_span) b = &BucketForEpoch(++row_epoch_);
    const int64_t take = std::min(rows, window_.bucket_span - static_cast<int64_t>(b->rows));
    CountRows(*b, data, take, row_stride);
    data += take * row_stride;
    rows -= take;
  }
}

void DriftSketch::Update(const float* data, int64_t rows, int64_t row_stride, int64_t now_ns) {
  UpdateImpl(data, rows, row_stride, now_ns);
}

void DriftSketch::Update(const double* data, int64_t rows, int64_t row_stride, int64_t now_ns) {
  UpdateImpl(data, rows, row_stride, now_ns);
}

bool DriftSketch::Live(const Bucket& b, int64_t now_ns) const {
  if (b.epoch < 0) return false;
  if (window_.kind == SketchWindow::Kind::kRows) return b.epoch > row_epoch_ - window_.buckets;
  const int64_t now_epoch = FloorDiv(now_ns, window_.bucket_span);
  return b.epoch <= now_epoch && b.epoch > now_epoch - window_.buckets;
}

SketchSnapshot DriftSketch::Snapshot(int64_t now_ns) const {
  if (now_ns < 0) now_ns = SteadyNowNs();
  SketchSnapshot s;
  s.bin_offset = bin_offset_;
  s.bins.assign(static_cast<size_t>(bin_offset_.back()), 0);
  s.sums.assign(static_cast<size_t>(bin_offset_.back()), 0.0);
  s.nan.assign(features_.size(), 0);
  s.below.assign(features_.size(), 0);
  s.above.assign(features_.size(), 0);
  std::lock_guard<std::mutex> lock(mu_);
  for (const Bucket& b : ring_) {
    if (!Live(b, now_ns)) continue;
    s.rows += b.rows;
    for (size_t i = 0; i < s.bins.size(); ++i) {
      s.bins[i] += b.bins[i];
      s.sums[i] += b.sums[i];
    }
    for (size_t f = 0; f < features_.size(); ++f) {
      s.nan[f] += b.nan[f];
      s.below[f] += b.below[f];
      s.above[f] += b.above[f];
    }
  }
  return s;
}

void DriftSketch::Reset() {
  std::lock_guard<std::mutex> lock(mu_);
  for (Bucket& b : ring_) b.epoch = -1;
  row_epoch_ = 0;
  newest_epoch_ = std::numeric_limits<int64_t>::min() / 2;
}

namespace {

// LSD radix sort of keys on bits [20, 64) in four 11-bit digits, then each run of keys
// sharing those 44 bits (rare for continuous data: ties, or values within 2^-32 of each
// other) is finished with a comparison sort. Saves two of six scatter passes. Count is
// the histogram counter type: 32-bit counters keep the four tables in L1.
template <typename Count>
void RadixSortKeys(uint64_t* keys, uint64_t* tmp, int64_t m) {
  constexpr int kBits = 11;
  constexpr int kLowBits = 20;
  constexpr int kDigits = 4;  // 20 + 4 * 11 == 64
  constexpr int64_t kRadix = int64_t{1} << kBits;
  constexpr uint64_t kMask = static_cast<uint64_t>(kRadix - 1);
  std::vector<Count> hist(static_cast<size_t>(kDigits * kRadix), 0);
  for (int64_t i = 0; i < m; ++i) {
    const uint64_t k = keys[i];
    for (int d = 0; d < kDigits; ++d)
      ++hist[static_cast<size_t>(d * kRadix) + ((k >> (kLowBits + d * kBits)) & kMask)];
  }
  uint64_t* src = keys;
  uint64_t* dst = tmp;
  for (int d = 0; d < kDigits; ++d) {
    Count* h = hist.data() + d * kRadix;
    const int shift = kLowBits + d * kBits;
    if (static_cast<int64_t>(h[(src[0] >> shift) & kMask]) == m) continue;  // one shared digit
    Count sum = 0;
    for (int64_t b = 0; b < kRadix; ++b) {
      const Count c = h[b];
      h[b] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < m; ++i) dst[h[(src[i] >> shift) & kMask]++] = src[i];
    std::swap(src, dst);
  }
  if (src != keys) std::copy(src, src + m, keys);
  for (int64_t i = 0; i < m;) {
    const uint64_t prefix = keys[i] >> kLowBits;
    int64_t j = i + 1;
    bool sorted = true;
    while (j < m && (keys[j] >> kLowBits) == prefix) {
      sorted = sorted && keys[j - 1] <= keys[j];
      ++j;
    }
    if (!sorted) std::sort(keys + i, keys + j);
    i = j;
  }
}

}  // namespace

void SortFiniteColumns(const std::vector<const double*>& columns, const std::vector<int64_t>& sizes,
                       const std::vector<int64_t>& strides, uint64_t* out, int64_t out_stride,
                       int64_t* finite, int threads) {
  const size_t count = columns.size();
  // Gather keys into the output rows in row blocks, all columns at once: columns that
  // are strided views of one row-major array then share each cache line they read.
  constexpr int64_t kBlock = 2048;
  int64_t longest = 0;
  for (size_t f = 0; f < count; ++f) {
    finite[f] = 0;
    longest = std::max(longest, sizes[f]);
  }
  for (int64_t r0 = 0; r0 < longest; r0 += kBlock) {
    for (size_t f = 0; f < count; ++f) {
      const int64_t r1 = std::min(sizes[f], r0 + kBlock);
      const double* x = columns[f];
      uint64_t* k = out + static_cast<int64_t>(f) * out_stride;
      int64_t mf = finite[f];
      for (int64_t r = r0; r < r1; ++r) {
        const double v = x[r * strides[f]];
        if (std::isfinite(v)) k[mf++] = SortKey(v);
      }
      finite[f] = mf;
    }
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  uint64_t nan_bits;
  std::memcpy(&nan_bits, &nan, sizeof nan_bits);
  auto work = [&](size_t first, size_t step) {
    std::unique_ptr<uint64_t[]> tmp(new uint64_t[static_cast<size_t>(std::max<int64_t>(out_stride, 1))]);
    for (size_t f = first; f < count; f += step) {
      uint64_t* k = out + static_cast<int64_t>(f) * out_stride;
      const int64_t m = finite[f];
      if (m > 0xffffffffLL) {
        RadixSortKeys<uint64_t>(k, tmp.get(), m);
      } else if (m > 0) {
        RadixSortKeys<uint32_t>(k, tmp.get(), m);
      }
      for (int64_t i = 0; i < m; ++i) {
        const double v = FromSortKey(k[i]);
        std::memcpy(&k[i], &v, sizeof v);
      }
      std::fill(k + m, k + out_stride, nan_bits);
    }
  };
  const size_t workers = std::max<size_t>(1, std::min<size_t>(static_cast<size_t>(std::max(threads, 1)), count));
  std::vector<std::thread> pool;
  for (size_t t = 1; t < workers; ++t) pool.emplace_back(work, t, workers);
  work(0, workers);
  for (std::thread& t : pool) t.join();
}

KsWasserstein CompareSorted(const double* a, int64_t na, const double* b, int64_t nb) {
  // Branch-free merge, one element per step. The CDF gap is tracked exactly in integers,
  // |i*nb - j*na|, and counts only where the next value is larger (ties consumed); the
  // Wasserstein term is zero across ties anyway. The KS value is then computed as scipy
  // does, i/na - j/nb, at the maximising (i, j).
  KsWasserstein r;
  const double inf = std::numeric_limits<double>::infinity();
  const double scale = 1.0 / (static_cast<double>(na) * static_cast<double>(nb));
  int64_t i = 0, j = 0, best = 0, best_i = 0, best_j = 0;
  double x = a[0], y = b[0], w = 0.0;
  for (int64_t k = 0, total = na + nb; k < total; ++k) {
    const bool take_a = x <= y;
    const double v = take_a ? x : y;
    i += take_a;
    j += !take_a;
    x = i < na ? a[i] : inf;
    y = j < nb ? b[j] : inf;
    const double next = std::min(x, y);
    const int64_t gap = std::abs(i * nb - j * na);
    const bool better = next > v && gap > best;
    best = better ? gap : best;
    best_i = better ? i : best_i;
    best_j = better ? j : best_j;
    w += next < inf ? static_cast<double>(gap) * (next - v) : 0.0;
  }
  r.ks = std::fabs(static_cast<double>(best_i) / static_cast<double>(na) -
                   static_cast<double>(best_j) / static_cast<double>(nb));
  r.wasserstein = w * scale;
  return r;
}

}  // namespace vivace
