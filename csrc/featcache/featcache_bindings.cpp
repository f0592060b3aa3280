// Python face of the feature cache: FeatureCache (one per store per process) and
// FeatureLookup (a bound list of view:feature columns) whose get() returns numpy arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "featcache/featcache.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace vivace {
namespace {

using featcache::FeatureCache;
using featcache::FeatureLookup;

int64_t NowArg(const py::object& now_us) {
  return now_us.is_none() ? featcache::kNowFromClock : now_us.cast<int64_t>();
}

// Entity ids as a contiguous int64 array: ints, sequences of ints or integer arrays.
// Floats, strings and bools are refused rather than silently converted.
py::array_t<int64_t, py::array::c_style> EntityIds(py::handle ids) {
  if (PyLong_Check(ids.ptr()) && !PyBool_Check(ids.ptr())) {
    py::array_t<int64_t, py::array::c_style> one(1);
    *one.mutable_data() = ids.cast<int64_t>();
    return one;
  }
  py::array arr = py::array::ensure(ids);
  if (!arr) throw py::type_error("entity ids must be an int or a sequence/array of ints");
  const char kind = arr.dtype().kind();
  if (kind != 'i' && kind != 'u')
    throw py::type_error("entity ids must be int64 join keys, got an array of dtype " +
                         py::str(arr.dtype()).cast<std::string>());
  if (arr.ndim() != 1) throw py::value_error("entity ids must be one-dimensional");
  return py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
}

py::tuple Get(FeatureLookup& lookup, py::handle ids, const py::object& now_us) {
  auto keys = EntityIds(ids);
  const auto n = static_cast<py::ssize_t>(keys.size());
  const auto width = static_cast<py::ssize_t>(lookup.num_features());
  py::array_t<float> values({n, width});
  py::array_t<bool> found(n);
  const int64_t now = NowArg(now_us);
  {
    py::gil_scoped_release release;
    lookup.LookupInto(keys.data(), static_cast<size_t>(n), values.mutable_data(),
                      reinterpret_cast<uint8_t*>(found.mutable_data()), now);
  }
  return py::make_tuple(std::move(values), std::move(found));
}

void LookupIntoArrays(FeatureLookup& lookup, py::handle ids, py::array_t<float, py::array::c_style> out,
                      py::array_t<bool, py::array::c_style> found, const py::object& now_us) {
  auto keys = EntityIds(ids);
  const size_t n = static_cast<size_t>(keys.size());
  if (static_cast<size_t>(out.size()) < n * lookup.num_features() || static_cast<size_t>(found.size()) < n)
    throw py::value_error("output buffers are smaller than [n, num_features] and [n]");
  if (!out.writeable() || !found.writeable()) throw py::value_error("output buffers must be writable");
  const int64_t now = NowArg(now_us);
  py::gil_scoped_release release;
  lookup.LookupInto(keys.data(), n, out.mutable_data(), reinterpret_cast<uint8_t*>(found.mutable_data()), now);
}

}  // namespace

void BindFeatcache(py::module_& m) {
  py::register_exception<featcache::FeatureCacheError>(m, "FeatureCacheError", PyExc_RuntimeError);

  py::class_<FeatureCache, std::shared_ptr<FeatureCache>>(
      m, "FeatureCache", "The LMDB online store of a Vivace home, opened read-only once per process.")
      .def(py::init(&FeatureCache::Open), "path"_a, "cache_capacity"_a = 0,
           "Open (or share) the store in folder `path`; cache_capacity > 0 keeps that many rows in memory.")
      .def_property_readonly("path", &FeatureCache::path)
      .def_property_readonly("cache_capacity", &FeatureCache::cache_capacity)
      .def("indexed_rows", &FeatureCache::IndexedRows, "view"_a,
           "Rows of the view in the in-memory row index of its current snapshot (0: reads go through LMDB "
           "cursors; a snapshot is indexed once a few batches have read it)")
      .def("generation", &FeatureCache::Generation, py::call_guard<py::gil_scoped_release>(),
           "Number of the latest committed materialization.");

  py::class_<FeatureLookup, std::shared_ptr<FeatureLookup>>(
      m, "FeatureLookup", "A fixed list of (view, feature) columns read for batches of entity keys.")
      .def(py::init<std::shared_ptr<FeatureCache>, std::vector<std::pair<std::string, std::string>>>(),
           "cache"_a, "columns"_a)
      .def_property_readonly("num_features", &FeatureLookup::num_features)
      .def_property_readonly("columns", &FeatureLookup::columns)
      .def("get", &Get, "entity_ids"_a, "now_us"_a = py::none(),
           "entity ids (int or int array) -> (values float32 [n, F], found bool [n]); NaN where missing, "
           "stale (older than the view's TTL at now_us, default: the clock) or null.")
      .def("lookup_into", &LookupIntoArrays, "entity_ids"_a, "out"_a, "found"_a, "now_us"_a = py::none(),
           "Like get(), into preallocated float32 [n, F] and bool [n] arrays.");
}

}  // namespace vivace
