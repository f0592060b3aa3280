// Python face of the drift sketches and the offline drift kernels. Every call that
// touches rows releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "sketch/sketch.h"

namespace py = pybind11;

namespace vivace {
namespace {

template <typename T>
py::array_t<T> ToArray(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

std::shared_ptr<DriftSketch> MakeSketch(const std::vector<std::vector<double>>& edges,
                                        const std::vector<int64_t>& num_categories,
                                        const std::vector<double>& low, const std::vector<double>& high,
                                        const std::vector<int64_t>& columns, const std::string& window,
                                        int64_t bucket_span, int64_t buckets) {
  const size_t n = edges.size();
  if (num_categories.size() != n || low.size() != n || high.size() != n || columns.size() != n)
    throw std::invalid_argument("DriftSketch: edges, num_categories, low, high and columns differ in length");
  std::vector<SketchFeature> features(n);
  for (size_t f = 0; f < n; ++f) {
    features[f].edges = edges[f];
    features[f].num_categories = num_categories[f];
    features[f].low = low[f];
    features[f].high = high[f];
    features[f].column = columns[f];
  }
  SketchWindow w;
  if (window == "rows") {
    w.kind = SketchWindow::Kind::kRows;
  } else if (window == "time") {
    w.kind = SketchWindow::Kind::kTime;
  } else {
    throw std::invalid_argument("DriftSketch: window must be 'rows' or 'time', got '" + window + "'");
  }
  w.bucket_span = bucket_span;
  w.buckets = buckets;
  return std::make_shared<DriftSketch>(std::move(features), w);
}

template <typename T>
void UpdateFrom(DriftSketch& sketch, const py::buffer_info& info, int64_t now_ns) {
  const auto item = static_cast<py::ssize_t>(sizeof(T));
  if (info.ndim != 2) throw std::invalid_argument("DriftSketch.update: batch must be 2-D [rows, columns]");
  if (info.strides[1] != item || info.strides[0] % item != 0 || info.strides[0] < info.shape[1] * item)
    throw std::invalid_argument("DriftSketch.update: batch rows must be contiguous (row-major)");
  if (info.shape[1] < sketch.min_row_stride())
    throw std::invalid_argument("DriftSketch.update: batch has " + std::to_string(info.shape[1]) +
                                " columns, the sketch reads " + std::to_string(sketch.min_row_stride()));
  const T* data = static_cast<const T*>(info.ptr);
  const int64_t rows = info.shape[0], stride = info.strides[0] / item;
  py::gil_scoped_release release;
  sketch.Update(data, rows, stride, now_ns);
}

int ResolveThreads(int threads) {
  if (threads > 0) return threads;
  return static_cast<int>(std::min(4u, std::max(1u, std::thread::hardware_concurrency())));
}

}  // namespace

void BindSketch(py::module_& m) {
  py::class_<DriftSketch, std::shared_ptr<DriftSketch>>(m, "DriftSketch", R"doc(
Per-feature histogram counts (and per-bin value sums) over reference bin edges, over a
sliding window.

Built by vivace.monitor.sketch.sketch_for_profile from a reference profile. Numeric
feature f: bin i counts values in (edges[i-1], edges[i]], outer bins open-ended; values
below low / above high are also counted in `below` / `above`. Categorical feature
(num_categories > 0): the value is a category code; unknown codes count in `above`.
window "rows": buckets of bucket_span rows; "time": buckets of bucket_span nanoseconds
(steady clock, as time.monotonic_ns). The window is the newest `buckets` buckets.
)doc")
      .def(py::init(&MakeSketch), py::arg("edges"), py::arg("num_categories"), py::arg("low"),
           py::arg("high"), py::arg("columns"), py::arg("window") = "rows",
           py::arg("bucket_span") = 10000, py::arg("buckets") = 6)
      .def(
          "update",
          [](DriftSketch& self, py::buffer batch, int64_t now_ns) {
            py::buffer_info info = batch.request();
            if (info.format == py::format_descriptor<float>::format()) {
              UpdateFrom<float>(self, info, now_ns);
            } else if (info.format == py::format_descriptor<double>::format()) {
              UpdateFrom<double>(self, info, now_ns);
            } else {
              throw std::invalid_argument("DriftSketch.update: batch must be float32 or float64, got format '" +
                                          info.format + "'");
            }
          },
          py::arg("batch"), py::arg("now_ns") = -1,
          "Count a row-major [rows, columns] float32/float64 batch (GIL released).")
      .def(
          "snapshot",
          [](const DriftSketch& self, int64_t now_ns) {
            SketchSnapshot s;
            {
              py::gil_scoped_release release;
              s = self.Snapshot(now_ns);
            }
            py::dict d;
            d["bins"] = ToArray(s.bins);
            d["sums"] = ToArray(s.sums);
            d["bin_offset"] = ToArray(s.bin_offset);
            d["nan"] = ToArray(s.nan);
            d["below"] = ToArray(s.below);
            d["above"] = ToArray(s.above);
            d["rows"] = s.rows;
            return d;
          },
          py::arg("now_ns") = -1,
          "Counts over the live window: dict of bins and per-bin value sums (flat, split by bin_offset),\n"
          "nan, below, above, rows.")
      .def("reset", &DriftSketch::Reset, "Forget every counted row.")
      .def_property_readonly("num_features", &DriftSketch::num_features)
      .def_property_readonly("min_columns", &DriftSketch::min_row_stride);

  m.def(
      "drift_count_categories",
      [](py::array_t<uint8_t, py::array::c_style> rows) {
        if (rows.ndim() != 2) throw std::invalid_argument("drift_count_categories: expects [n, width] bytes");
        const int64_t n = rows.shape(0), width = rows.shape(1);
        const char* base = reinterpret_cast<const char*>(rows.data());
        std::vector<int64_t> first, counts;
        {
          py::gil_scoped_release release;
          // Hash counting: categorical columns have few distinct values, so one lookup per
          // row beats sorting the column (numpy.unique).
          std::unordered_map<std::string_view, size_t> index;
          for (int64_t r = 0; r < n; ++r) {
            const std::string_view key(base + r * width, static_cast<size_t>(width));
            auto [it, inserted] = index.try_emplace(key, first.size());
            if (inserted) {
              first.push_back(r);
              counts.push_back(0);
            }
            ++counts[it->second];
          }
        }
        return py::make_tuple(ToArray(first), ToArray(counts));
      },
      py::arg("rows"),
      "Distinct fixed-width byte rows: (index of each one's first row, count), in first-seen order.");

  m.def(
      "drift_sort_finite",
      [](const std::vector<py::array_t<double, py::array::forcecast>>& columns, int threads) {
        int64_t width = 0;
        std::vector<const double*> ptrs;
        std::vector<int64_t> sizes, strides;
        for (const auto& c : columns) {
          if (c.ndim() != 1) throw std::invalid_argument("drift_sort_finite: columns must be 1-D");
          width = std::max<int64_t>(width, c.shape(0));
          ptrs.push_back(c.data());
          sizes.push_back(c.shape(0));
          strides.push_back(c.strides(0) / static_cast<py::ssize_t>(sizeof(double)));
        }
        threads = ResolveThreads(threads);
        const auto count = static_cast<py::ssize_t>(columns.size());
        py::array_t<uint64_t> sorted({count, static_cast<py::ssize_t>(width)});
        py::array_t<int64_t> finite(count);
        uint64_t* out = sorted.mutable_data();
        int64_t* fin = finite.mutable_data();
        {
          py::gil_scoped_release release;
          SortFiniteColumns(ptrs, sizes, strides, out, width, fin, threads);
        }
        return py::make_tuple(sorted.attr("view")("float64"), finite);
      },
      py::arg("columns"), py::arg("threads") = 0,
      "Sort each column's finite values: ([columns, max_len] float64 padded with NaN, finite counts).\n"
      "threads <= 0: up to 4, as many as the machine has.");

  m.def(
      "drift_compare_sorted",
      [](py::array_t<double, py::array::c_style> a, py::array_t<int64_t, py::array::c_style> na,
         py::array_t<double, py::array::c_style> b, py::array_t<int64_t, py::array::c_style> nb, int threads) {
        if (a.ndim() != 2 || b.ndim() != 2 || na.ndim() != 1 || nb.ndim() != 1 || a.shape(0) != b.shape(0) ||
            na.shape(0) != a.shape(0) || nb.shape(0) != a.shape(0))
          throw std::invalid_argument("drift_compare_sorted: expects [F, n] arrays and [F] counts");
        const py::ssize_t f_count = a.shape(0);
        for (py::ssize_t f = 0; f < f_count; ++f) {
          if (na.at(f) <= 0 || nb.at(f) <= 0 || na.at(f) > a.shape(1) || nb.at(f) > b.shape(1))
            throw std::invalid_argument("drift_compare_sorted: column " + std::to_string(f) +
                                        " has no values or a count beyond its row");
        }
        py::array_t<double> ks(f_count), w(f_count);
        double* ks_out = ks.mutable_data();
        double* w_out = w.mutable_data();
        const double* ad = a.data();
        const double* bd = b.data();
        const int64_t* nad = na.data();
        const int64_t* nbd = nb.data();
        const int64_t wa = a.shape(1), wb = b.shape(1);
        {
          py::gil_scoped_release release;
          auto work = [&](py::ssize_t first, py::ssize_t step) {
            for (py::ssize_t f = first; f < f_count; f += step) {
              const KsWasserstein r = CompareSorted(ad + f * wa, nad[f], bd + f * wb, nbd[f]);
              ks_out[f] = r.ks;
              w_out[f] = r.wasserstein;
            }
          };
          const py::ssize_t workers = std::max<py::ssize_t>(1, std::min<py::ssize_t>(ResolveThreads(threads), f_count));
          std::vector<std::thread> pool;
          for (py::ssize_t t = 1; t < workers; ++t) pool.emplace_back(work, t, workers);
          work(0, workers);
          for (std::thread& t : pool) t.join();
        }
        return py::make_tuple(ks, w);
      },
      py::arg("a"), py::arg("a_counts"), py::arg("b"), py::arg("b_counts"), py::arg("threads") = 0,
      "Per row of two sorted [F, n] arrays: (KS statistic, Wasserstein-1 distance).\n"
      "threads <= 0: up to 4, as many as the machine has.");
}

}  // namespace vivace
