// Python face of the kernels: vivace._core.NativeMLP and CPU level queries.
//
// forward/forward_into take any C-contiguous float32 buffer (numpy array, memoryview...).
// The GIL is released around the kernel when the call does enough work to repay it
// (rows * MACs per row >= kReleaseGilMacs); a batch-1 call on a small MLP keeps it, as
// releasing and re-taking the GIL would cost more than the MLP itself.
// For native callers without the GIL, `native_handle()` returns a capsule holding the
// NativeMlp* and `_core.NATIVE_MLP_FORWARD` a capsule holding the C function
// vivace_native_mlp_forward(model, x, rows, out); the model must outlive such use.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cpu_features.h"
#include "kernels/mlp.h"

namespace py = pybind11;

namespace vivace {
namespace {

using kernels::NativeMlp;

constexpr int64_t kReleaseGilMacs = int64_t{1} << 18;

// A C-contiguous float32 view of a Python buffer; releases it on destruction.
class FloatView {
 public:
  FloatView(PyObject* obj, bool writable, const char* what) {
    const int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &view_, flags) != 0) {
      PyErr_Clear();
      throw py::type_error(std::string(what) + " must be a C-contiguous" + (writable ? " writable" : "") +
                           " float32 buffer (e.g. a numpy array)");
    }
    const char* f = view_.format;
    if (f != nullptr && (f[0] == '<' || f[0] == '=' || f[0] == '@')) ++f;
    if (view_.itemsize != 4 || f == nullptr || std::strcmp(f, "f") != 0) {
      PyBuffer_Release(&view_);
      throw py::type_error(std::string(what) + " must have dtype float32");
    }
  }
  ~FloatView() { PyBuffer_Release(&view_); }
  FloatView(const FloatView&) = delete;
  FloatView& operator=(const FloatView&) = delete;

  float* data() const { return static_cast<float*>(view_.buf); }
  int ndim() const { return view_.ndim; }
  int64_t dim(int i) const { return static_cast<int64_t>(view_.shape[i]); }

  // Rows of a [rows, width] (or [width] as one row) buffer; throws on another shape.
  int64_t Rows(int64_t width, const char* what) const {
    if (ndim() == 2 && dim(1) == width) return dim(0);
    if (ndim() == 1 && dim(0) == width) return 1;
    std::string shape = "(";
    for (int i = 0; i < ndim(); ++i) shape += (i ? ", " : "") + std::to_string(dim(i));
    throw py::value_error(std::string(what) + " must have shape [rows, " + std::to_string(width) + "], got " +
                          shape + ")");
  }

 private:
  Py_buffer view_{};
};

// A new C-contiguous float32 array [rows, cols], from NumPy's constructor directly: pybind11's
// array_t constructor builds shape and stride vectors on the heap first.
py::array_t<float> NewFloatArray(int64_t rows, int64_t cols) {
  auto& api = py::detail::npy_api::get();
  const Py_intptr_t shape[2] = {static_cast<Py_intptr_t>(rows), static_cast<Py_intptr_t>(cols)};
  PyObject* descr = api.PyArray_DescrFromType_(py::detail::npy_api::NPY_FLOAT_);  // stolen below
  PyObject* array = api.PyArray_NewFromDescr_(api.PyArray_Type_, descr, 2, shape, nullptr, nullptr, 0, nullptr);
  if (array == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::array_t<float>>(array);
}

void Run(const NativeMlp& mlp, const float* x, int64_t rows, float* out) {
  if (rows * mlp.macs_per_row() >= kReleaseGilMacs) {
    py::gil_scoped_release release;
    mlp.Forward(x, rows, out);
  } else {
    mlp.Forward(x, rows, out);
  }
}

std::vector<float> ToFloats(const py::handle& obj, const std::string& what) {
  auto arr = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(obj);
  if (!arr) throw py::type_error(what + " must be an array of numbers");
  return std::vector<float>(arr.data(), arr.data() + arr.size());
}

std::unique_ptr<NativeMlp> Make(const py::list& weights, const py::object& biases, const std::vector<std::string>& activations,
                                const std::string& precision, const py::object& input_ranges,
                                const std::optional<std::string>& level, int num_threads) {
  const size_t n = weights.size();
  if (activations.size() != n)
    throw py::value_error("activations must have one entry per layer (" + std::to_string(n) + "), got " +
                          std::to_string(activations.size()));
  std::vector<kernels::LayerSpec> specs(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string where = "layer " + std::to_string(i) + ": ";
    auto w = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(weights[i]);
    if (!w || w.ndim() != 2) throw py::value_error(where + "weight must be a 2-D array [out_features, in_features]");
    auto& s = specs[i];
    s.out_features = static_cast<int>(w.shape(0));
    s.in_features = static_cast<int>(w.shape(1));
    s.weight.assign(w.data(), w.data() + w.size());
    if (!biases.is_none()) {
      py::list bl = biases;
      if (bl.size() != n) throw py::value_error("biases must have one entry (or None) per layer");
      if (!bl[i].is_none()) s.bias = ToFloats(bl[i], where + "bias");
    }
    s.activation = kernels::ParseActivation(activations[i]);
    if (!input_ranges.is_none()) {
      py::list rl = input_ranges;
      if (rl.size() != n) throw py::value_error("input_ranges must have one (min, max) entry (or None) per layer");
      if (!rl[i].is_none()) {
        auto range = rl[i].cast<std::pair<float, float>>();
        s.has_input_range = true;
        s.input_min = range.first;
        s.input_max = range.second;
      }
    }
  }
  const auto prec = kernels::ParsePrecision(precision);
  if (!input_ranges.is_none() && prec != kernels::Precision::kInt8)
    throw py::value_error("input_ranges (static activation scales) apply to precision 'int8' only");
  const auto lvl = kernels::ResolveLevel(level.value_or(""));
  return std::make_unique<NativeMlp>(specs, prec, lvl, num_threads);
}

}  // namespace

void BindKernels(py::module_& m) {
  m.def(
      "cpu_levels",
      [] {
        std::vector<std::string> names;
        for (auto l : kernels::SupportedLevels()) names.emplace_back(kernels::LevelName(l));
        return names;
      },
      "Kernel levels this CPU supports, most portable first (portable, avx2, avx512, amx).");
  m.def(
      "cpu_level", [](const std::string& requested) { return std::string(kernels::LevelName(kernels::ResolveLevel(requested))); },
      py::arg("requested") = "",
      "The level a NativeMLP would use: `requested`, else $VIVACE_CPU_LEVEL, else the best one; "
      "raises ValueError for a level this CPU lacks.");
  m.def(
      "int8_peak",
      [](const std::string& level) {
        const auto lvl = kernels::ResolveLevel(level);
        py::gil_scoped_release release;
        return kernels::Int8PeakMacsPerSecond(lvl);
      },
      py::arg("level") = "",
      "Int8 multiply-adds per second that `level`'s inner-loop instructions reach on one core of "
      "this CPU from registers alone (~0.1 s): the bound for int8 kernels on those instructions. None "
      "for a level without a probe (portable, amx).");
  m.attr("NATIVE_MLP_RELEASE_GIL_MACS") = kReleaseGilMacs;
  m.attr("NATIVE_MLP_FORWARD") =
      py::capsule(reinterpret_cast<void*>(&vivace_native_mlp_forward), "vivace.kernels.native_mlp_forward");

  py::class_<NativeMlp>(m, "NativeMLP", R"doc(
A prepacked MLP (Linear+bias layers with identity/relu/gelu/sigmoid/tanh) run in one
native call, fp32 or int8. Thread-safe: forward may run from several threads at once.

NativeMLP(weights, biases, activations, *, precision="fp32", input_ranges=None,
          level=None, num_threads=1)
  weights: list of float32 [out, in] arrays; biases: list of [out] arrays or None;
  activations: one name per layer; precision: "fp32" or "int8" (weights quantised per
  output channel here; activations per row, or with input_ranges: one (min, max) per
  layer or None, values outside saturate); level: portable|avx2|avx512 (default
  $VIVACE_CPU_LEVEL or the best the CPU has); num_threads: threads for large batches.
)doc")
      .def(py::init(&Make), py::arg("weights"), py::arg("biases"), py::arg("activations"), py::kw_only(),
           py::arg("precision") = "fp32", py::arg("input_ranges") = py::none(), py::arg("level") = py::none(),
           py::arg("num_threads") = 1)
      .def(
          "forward",
          [](const NativeMlp& self, py::handle x) {
            FloatView in(x.ptr(), false, "x");
            const int64_t rows = in.Rows(self.in_features(), "x");
            py::array_t<float> out = NewFloatArray(rows, self.out_features());
            Run(self, in.data(), rows, out.mutable_data());
            return out;
          },
          py::arg("x"), "Returns mlp(x) as a new float32 array [rows, out_features].")
      .def(
          "forward_into",
          [](const NativeMlp& self, py::handle x, py::handle out) {
            FloatView in(x.ptr(), false, "x");
            FloatView dst(out.ptr(), true, "out");
            const int64_t rows = in.Rows(self.in_features(), "x");
            const int64_t out_rows = dst.Rows(self.out_features(), "out");
            if (out_rows != rows)
              throw py::value_error("out has " + std::to_string(out_rows) + " rows, x has " + std::to_string(rows));
            Run(self, in.data(), rows, dst.data());
          },
          py::arg("x"), py::arg("out"), "Writes mlp(x) into `out` (float32 [rows, out_features]); allocates nothing.")
      .def(
          "native_handle",
          [](const NativeMlp& self) {
            return py::capsule(const_cast<void*>(static_cast<const void*>(&self)), "vivace.kernels.NativeMlp");
          },
          "Capsule with the NativeMlp* for native callers of NATIVE_MLP_FORWARD (valid while this object lives).")
      .def_property_readonly("in_features", &NativeMlp::in_features)
      .def_property_readonly("out_features", &NativeMlp::out_features)
      .def_property_readonly("num_layers", &NativeMlp::num_layers)
      .def_property_readonly("num_threads", &NativeMlp::num_threads)
      .def_property_readonly("macs_per_row", &NativeMlp::macs_per_row)
      .def_property_readonly("level", [](const NativeMlp& self) { return kernels::LevelName(self.level()); })
      .def_property_readonly("precision", [](const NativeMlp& self) { return kernels::PrecisionName(self.precision()); });
}

}  // namespace vivace
