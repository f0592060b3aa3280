// The compiled core, `vivace._core`. Each subsystem (csrc/<name>/, listed in
// CMakeLists.txt) registers its own bindings.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace vivace {
void BindBatcher(py::module_& m);
void BindFeatcache(py::module_& m);
void BindKernels(py::module_& m);
void BindSketch(py::module_& m);
void BindFrontend(py::module_& m);
}  // namespace vivace

PYBIND11_MODULE(_core, m) {
  m.doc() = "Vivace native core: dynamic batcher, HTTP front end, kernels, feature cache, drift sketches";
  vivace::BindBatcher(m);
  vivace::BindFeatcache(m);
  vivace::BindKernels(m);
  vivace::BindSketch(m);
  vivace::BindFrontend(m);
}
